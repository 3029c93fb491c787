"""COCO-scale bookkeeping: the COCO-like generator, the vectorised loading and splitting, and the
memory's candidate bound (memory.candidates_per_class)."""
import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from incdet.base.config import DEFAULTS
from incdet.base.errors import UserError
from incdet.bench import scale
from incdet.data.classes import ClassSpace
from incdet.data.coco import load_coco
from incdet.data.coco_like import coco_categories, coco_like, write_coco_like
from incdet.data.records import ImageRecord, clean_boxes, filter_for_classes
from incdet.experiment import exemplars
from incdet.tools.make_dataset import main as make_dataset

COCO_GAPS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


@pytest.fixture(scope="module")
def small():
    return coco_like(num_images=3000, seed=1)


def test_generator_has_coco_ids_gaps_and_box_counts(small):
    ids = [c["id"] for c in small["categories"]]
    assert len(ids) == 80 and min(ids) == 1 and max(ids) == 90
    assert set(range(1, 91)) - set(ids) == COCO_GAPS
    assert small["categories"][0]["name"] == "person"
    images, anns = small["images"], small["annotations"]
    assert len(images) == 3000
    image_ids = [im["id"] for im in images]
    assert len(set(image_ids)) == 3000 and max(image_ids) <= 581_929
    assert {a["category_id"] for a in anns} <= set(ids)
    assert len({a["id"] for a in anns}) == len(anns)
    counts = {}
    for a in anns:
        counts[a["image_id"]] = counts.get(a["image_id"], 0) + 1
    per_image = np.array([counts.get(i, 0) for i in image_ids])
    assert 6.5 < per_image.mean() < 8.0  # COCO: 7.27 boxes per image, empty images included
    assert 0 < (per_image == 0).mean() < 0.03 and per_image.max() <= 93
    freq = np.bincount([a["category_id"] for a in anns])
    assert freq.argmax() == 1  # person is the most frequent class, as in COCO
    size = {im["id"]: (im["width"], im["height"]) for im in images}
    for a in anns[:2000]:
        x, y, w, h = a["bbox"]
        assert w >= 0 and h >= 0 and x >= 0 and y >= 0
        assert x + w <= size[a["image_id"]][0] + 0.01 and y + h <= size[a["image_id"]][1] + 0.01
    assert coco_like(num_images=50, seed=1) == coco_like(num_images=50, seed=1)


def test_make_dataset_coco_like_is_read_by_load_coco_like_pycocotools(tmp_path):
    assert make_dataset(["--out-dir", str(tmp_path), "--coco-like", "--train", "400"]) == 0
    path = tmp_path / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    cats, records, report = load_coco(path, tmp_path / "images", check_files=False)
    assert [c["id"] for c in cats] == [c["id"] for c in coco_categories()]
    assert len(records) == 400
    assert sum(len(r.boxes) for r in records) + report.dropped == len(data["annotations"])
    assert scale.pycocotools_load(str(path))["boxes"] == len(data["annotations"])


def test_clean_boxes_per_box_sizes_equal_per_image_calls():
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (100, 80), (7, 9)]
    boxes = [rng.uniform(-20, 120, (n, 4)).astype(np.float32) for n in (5, 0, 6)]
    boxes[0][0] = [np.nan, 1, 2, 3]
    one = [clean_boxes(b, w, h) for b, (w, h) in zip(boxes, sizes)]
    w = np.repeat([s[0] for s in sizes], [len(b) for b in boxes])
    h = np.repeat([s[1] for s in sizes], [len(b) for b in boxes])
    together, keep, report = clean_boxes(np.concatenate(boxes), w, h)
    assert np.array_equal(together, np.concatenate([o[0] for o in one]))
    assert np.array_equal(keep, np.concatenate([o[1] for o in one]))
    assert report.dropped == sum(o[2].dropped for o in one) > 0
    assert report.clipped == sum(o[2].clipped for o in one) > 0


def _filter_one_by_one(records, class_ids, drop_crowd=True):
    """The per-record definition filter_for_classes must keep."""
    out = []
    for rec in records:
        keep = np.isin(rec.category_ids, np.asarray(sorted(class_ids), np.int64))
        if drop_crowd:
            keep &= ~rec.iscrowd
        if keep.any():
            out.append(replace(rec, boxes=rec.boxes[keep], category_ids=rec.category_ids[keep],
                               iscrowd=rec.iscrowd[keep],
                               areas=None if rec.areas is None else rec.areas[keep]))
    return out


@pytest.mark.parametrize("drop_crowd", [True, False])
def test_filter_for_classes_equals_the_per_record_definition(drop_crowd):
    rng = np.random.default_rng(1)
    records = []
    for i in range(60):
        n = int(rng.integers(0, 5))
        records.append(ImageRecord(
            id=i, path=f"{i}.jpg", width=50, height=50,
            boxes=rng.uniform(0, 50, (n, 4)).astype(np.float32),
            category_ids=rng.choice([1, 3, 7, 90], n).astype(np.int64),
            iscrowd=rng.random(n) < 0.2,
            areas=None if i % 3 else rng.uniform(1, 9, n).astype(np.float32)))
    for ids in ([3], [1, 90], [5], [1, 3, 7, 90]):
        got = filter_for_classes(iter(records), ids, drop_crowd)
        want = _filter_one_by_one(records, ids, drop_crowd)
        assert [r.id for r in got] == [r.id for r in want]
        for a, b in zip(got, want):
            for f in ("boxes", "category_ids", "iscrowd"):
                assert np.array_equal(getattr(a, f), getattr(b, f))
            assert (a.areas is None) == (b.areas is None)
    assert filter_for_classes([], [1]) == []


def _records(num=40):
    rng = np.random.default_rng(2)
    out = []
    for i in range(num):
        cats = rng.choice([5, 8, 9], int(rng.integers(1, 4)))
        out.append(ImageRecord(id=100 + i, path=f"{i}.jpg", width=64, height=64,
                               boxes=np.tile([[1, 1, 20, 20]], (len(cats), 1)).astype(np.float32),
                               category_ids=cats.astype(np.int64),
                               iscrowd=np.zeros(len(cats), bool)))
    return out


def test_candidate_ids_are_a_bounded_seeded_sample_of_the_class_holders():
    records = _records()
    holders = {c: {r.id for r in records if c in r.category_ids} for c in (5, 8, 9)}
    assert exemplars.candidate_ids(records, (5, 8, 9), None, 0) == holders
    cand = exemplars.candidate_ids(records, (5, 8, 9), 4, 0)
    for c in (5, 8, 9):
        assert len(cand[c]) == min(4, len(holders[c])) and cand[c] <= holders[c]
    assert cand == exemplars.candidate_ids(records, (5, 8, 9), 4, 0)
    assert cand != exemplars.candidate_ids(records, (5, 8, 9), 4, 1)
    assert exemplars.candidate_ids(records, (5, 8), 1000, 0) == {c: holders[c] for c in (5, 8)}
    assert exemplars.candidate_ids(records, (4,), 3, 0) == {4: set()}
    for bad in (0, -1, True, "10"):
        with pytest.raises(UserError, match="candidates_per_class"):
            exemplars.candidate_ids(records, (5,), bad, 0)


@pytest.mark.parametrize("bound", [None, 3])
def test_the_bound_limits_the_images_whose_features_are_computed(monkeypatch, bound):
    records = _records()
    computed = []

    def fake_features(model, recs, batch_size, device, size, progress):
        computed.extend(r.id for r in recs)
        g = torch.Generator().manual_seed(0)
        return {(r.id, int(c)): torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
                for r in recs for c in set(r.category_ids.tolist())}

    monkeypatch.setattr(exemplars, "roi_features", fake_features)
    cfg = copy.deepcopy(DEFAULTS)
    cfg["memory"].update(budget=None, per_class=2, candidates_per_class=bound)
    classes = ClassSpace([{"id": c, "name": str(c)} for c in (5, 8, 9)], [[5, 8, 9]])
    sc = classes.step(0)
    memory = exemplars.select_memory(cfg, None, records, None, sc, "cpu", False)
    if bound is None:
        assert len(computed) == len(records)
    else:
        cand = exemplars.candidate_ids(records, sc.new, bound, int(cfg["train"]["seed"]))
        assert len(computed) <= bound * len(sc.new)
        assert set(computed) == set().union(*cand.values())
        for c in sc.new:
            assert set(memory.rankings[c]) <= cand[c]
    assert all(len(memory.rankings[c]) == 2 for c in sc.new) and len(memory) <= 6


def test_bookkeeping_counts_on_a_small_coco_like_file(tmp_path):
    path = write_coco_like(tmp_path / "a.json", num_images=600, seed=2)
    r = scale.bookkeeping(str(path), str(tmp_path), candidates=5)
    assert r["images"] == 600 and r["categories"] == 80
    for split, steps in (("40+40", 2), ("40+10x4", 5)):
        s = r["splits"][split]["steps"]
        assert [v["classes"] for v in s] == ([40, 40] if steps == 2 else [40, 10, 10, 10, 10])
        for v in s:
            assert v["feature_images_bounded"] <= min(5 * v["classes"], v["feature_images_all"])
    assert 0 < r["memory_images"] <= scale.MEMORY_BUDGET
    assert r["loader"]["memory_images"] == r["memory_images"]
    assert r["peak_gib"] > 0
