import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from incdet.base.errors import UserError
from incdet.data.records import ImageRecord
from incdet.train.memory import (
    Memory,
    build_memory,
    closest_rank,
    herding_rank,
    quotas,
    select_images,
)


def brute_force_herding(x: np.ndarray, limit: int) -> list[int]:
    mu = x.mean(0)
    picked: list[int] = []
    for _ in range(limit):
        best, best_d = None, None
        for i in range(len(x)):
            if i in picked:
                continue
            d = np.linalg.norm(mu - x[picked + [i]].mean(0))
            if best_d is None or d < best_d:
                best, best_d = i, d
        picked.append(best)
    return picked


@pytest.mark.parametrize("seed", range(4))
def test_herding_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(25, 6))
    assert herding_rank(torch.from_numpy(x), 25) == brute_force_herding(x, 25)


def test_first_pick_is_closest_to_mean_and_running_mean_converges():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(300, 8)))
    order = herding_rank(x, 64)
    assert order[0] == closest_rank(x)[0]
    assert len(set(order)) == 64
    mu = x.mean(0)
    dists = [float(torch.linalg.norm(x[order[:k]].mean(0) - mu)) for k in range(1, 65)]
    # Herding is not strictly monotone pick by pick (small bumps happen on Gaussian data), but
    # its running mean approaches the class mean monotonically at every doubling of the picks,
    # and far faster than random subsets of the same size.
    for k in (1, 2, 4, 8, 16, 32):
        assert dists[2 * k - 1] < dists[k - 1]
    random_means = [float(torch.linalg.norm(x[rng.permutation(300)[:32]].mean(0) - mu))
                    for _ in range(50)]
    assert dists[31] < min(random_means)
    assert dists[-1] < 0.1 * dists[0]


def test_quotas_rules():
    assert quotas([5, 1, 9], budget=10) == {5: 4, 1: 3, 9: 3}
    assert quotas([5, 1], per_class=2) == {5: 2, 1: 2}
    with pytest.raises(UserError, match="exactly one"):
        quotas([1], budget=3, per_class=2)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 12), st.lists(st.integers(1, 5), min_size=1, max_size=5),
       st.integers(0, 60), st.integers(0, 2**16))
def test_budget_never_exceeded_and_truncation_keeps_prefixes(num_images_factor, step_sizes,
                                                             budget, seed):
    rng = np.random.default_rng(seed)
    num_images = 4 * num_images_factor
    memory, seen, next_class = None, [], 0
    full_rankings = {}
    for size in step_sizes:
        new = list(range(next_class, next_class + size))
        next_class += size
        seen += new
        # each class ranks a random subset of images (an image may serve several classes)
        new_rankings = {c: rng.permutation(num_images)[:rng.integers(0, num_images + 1)].tolist()
                        for c in new}
        full_rankings.update(new_rankings)
        records = {i: ImageRecord(id=i, path=f"{i}.png", width=8, height=8) for i in
                   range(num_images)}
        memory = build_memory(memory, new_rankings, records, new, seen, {"budget": budget})
        q = quotas(seen, budget=budget)
        assert len(memory) <= budget
        assert sum(q.values()) == budget
        for c in seen:
            kept = memory.rankings[c]
            assert len(kept) <= q[c]
            assert kept == full_rankings[c][:len(kept)]  # a prefix of the original ranking
            assert set(kept) <= set(memory.records)
        assert set(memory.records) == set(select_images(memory.rankings, q))


def test_memory_json_round_trip(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    recs = {}
    for i in (3, 8):
        Image.new("RGB", (20, 10)).save(tmp_path / "images" / f"{i}.png")
        recs[i] = ImageRecord(id=i, path=str(tmp_path / "images" / f"{i}.png"), width=20,
                              height=10, boxes=np.array([[1, 2, 5, 9]], np.float32),
                              category_ids=np.array([4 if i == 3 else 7]),
                              iscrowd=np.zeros(1, bool))
    mem = build_memory(None, {4: [3], 7: [8, 3]}, recs, [4, 7], [4, 7], {"per_class": 1})
    data = mem.to_json(tmp_path, [{"id": 4, "name": "a"}, {"id": 7, "name": "b"}], step=0)
    assert data["images"][0]["file_name"] == "images/3.png"
    path = tmp_path / "memory.json"
    path.write_text(json.dumps(data))
    again = Memory.from_json(path, tmp_path)
    assert again.rankings == mem.rankings == {4: [3], 7: [8]}
    assert again.label_spaces == {3: [4, 7], 8: [4, 7]}
    np.testing.assert_allclose(again.records[8].boxes, [[1, 2, 5, 9]])
    (tmp_path / "images" / "8.png").unlink()
    with pytest.raises(UserError, match="8.png is missing"):
        Memory.from_json(path, tmp_path)
