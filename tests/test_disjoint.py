"""Disjoint steps (``data.disjoint_steps``): every training image in one step only."""
import copy
import json
import random

import numpy as np

from incdet.base.config import DEFAULTS, load_config
from incdet.data.disjoint import _draw, assign_steps, training_records
from incdet.data.records import ImageRecord, filter_for_classes
from incdet.experiment.methods import incremental_iterations, training_budget
from incdet.experiment.protocol import method_variants, run_protocol
from incdet.experiment.report import build_summary, write_report

STEPS = [(1, 2), (3, 4), (5,)]


def record(image_id: int, classes, crowd=None) -> ImageRecord:
    n = len(classes)
    boxes = np.tile(np.array([[0, 0, 10, 10]], np.float32), (n, 1))
    iscrowd = np.zeros(n, bool) if crowd is None else np.asarray(crowd, bool)
    return ImageRecord(image_id, f"{image_id}.png", 32, 32, boxes, np.asarray(classes, np.int64),
                       iscrowd)


def mixed_records(n: int = 600, seed: int = 0) -> list[ImageRecord]:
    rng = random.Random(seed)
    out = []
    for i in range(1, n + 1):
        k = rng.randint(0, 4)  # some images hold no box at all
        out.append(record(i, [rng.choice([1, 2, 3, 4, 5]) for _ in range(k)]))
    return out


def test_every_training_image_belongs_to_exactly_one_step():
    records = mixed_records()
    owner = assign_steps(records, STEPS)
    labelled = [r for r in records if len(r.category_ids)]
    assert set(owner) == {r.id for r in labelled}
    for r in labelled:  # owned by a step whose classes it holds
        assert set(r.category_ids.tolist()) & set(STEPS[owner[r.id]])
    per_step = [training_records(records, STEPS, step, True) for step in STEPS]
    ids = [[r.id for r in recs] for recs in per_step]
    assert sum(map(len, ids)) == len(set().union(*map(set, ids))) == len(labelled)
    for s, recs in enumerate(per_step):  # each keeps only its own classes' boxes
        assert all(set(r.category_ids.tolist()) <= set(STEPS[s]) for r in recs)
        assert {c for r in recs for c in r.category_ids.tolist()} == set(STEPS[s])
    # joint at step 1 (the classes of steps 0 and 1): the images of steps 0 and 1, every box of
    # their seen classes; at the last step every image, as in the standard protocol
    joint1 = training_records(records, STEPS, STEPS[0] + STEPS[1], True)
    assert {r.id for r in joint1} == set(ids[0]) | set(ids[1])
    seen = {r.id: r for r in filter_for_classes(records, STEPS[0] + STEPS[1])}
    assert all(np.array_equal(r.category_ids, seen[r.id].category_ids) for r in joint1)
    every = sum(STEPS, ())
    assert [r.id for r in training_records(records, STEPS, every, True)] == \
        [r.id for r in filter_for_classes(records, every)]


def test_an_image_of_several_steps_goes_to_one_drawn_uniformly_from_its_id():
    # five boxes of step 0 and one of step 1: still an even draw between the two steps
    records = [record(i, [1, 1, 2, 2, 1, 3]) for i in range(1, 2001)]
    owner = assign_steps(records, STEPS)
    share = sum(s == 0 for s in owner.values()) / len(owner)
    assert 0.45 < share < 0.55
    assert set(owner.values()) == {0, 1}  # never step 2, whose class it does not hold
    assert all(owner[i] == int(_draw(i) * 2) for i in owner)
    # the same owners whatever the order of the records or the other images
    shuffled = records[::-1]
    assert assign_steps(shuffled, STEPS) == owner
    assert assign_steps(records[:10], STEPS) == {i: owner[i] for i in range(1, 11)}
    # crowd boxes do not make an image a step's: it can only go to step 1
    assert assign_steps([record(7, [1, 3], crowd=[True, False])], STEPS) == {7: 1}


def test_a_class_left_without_images_gets_one_back_where_possible():
    # class 5 (step 2) appears in one image only, beside class 1 (step 0), which has others
    only = next(i for i in range(1000, 2000) if int(_draw(i) * 2) == 0)  # drawn for step 0
    records = [record(i, [1, 2]) for i in range(1, 20)] + [record(only, [1, 5, 5])]
    assert assign_steps(records, STEPS)[only] == 2
    # where taking it back would leave step 0's class 2 without images, step 0 keeps it
    records = [record(i, [1]) for i in range(1, 20)] + [record(only, [2, 5])]
    assert assign_steps(records, STEPS)[only] == 0


def test_the_default_protocol_is_unchanged():
    assert DEFAULTS["data"]["disjoint_steps"] is False
    records = mixed_records()
    for classes in (STEPS[0], STEPS[1], STEPS[0] + STEPS[1]):
        std = training_records(records, STEPS, classes, False)
        ref = filter_for_classes(records, classes)
        assert [r.id for r in std] == [r.id for r in ref]
        assert all(np.array_equal(a.category_ids, b.category_ids) for a, b in zip(std, ref))


def test_joint_budget_counts_each_step_s_own_images_under_disjoint_steps(tiny_config):
    cfg = load_config(tiny_config, ["train.max_iters=null", "train.epochs=2",
                                    "train.batch_size=4", "incremental.method=joint"])
    from incdet.experiment.loaders import load_experiment

    train_set, _, classes = load_experiment(cfg, progress=False)
    recs = train_set.records
    last = classes.num_steps - 1
    disjoint = copy.deepcopy(cfg)
    disjoint["data"]["disjoint_steps"] = True
    owned = [len(training_records(recs, classes.steps, s, True)) for s in classes.steps]
    standard = [len(filter_for_classes(recs, s)) for s in classes.steps]
    assert sum(owned) < sum(standard)  # images of several steps count once
    assert incremental_iterations(disjoint, classes, recs, last) == sum(2 * (n // 4)
                                                                        for n in owned)
    assert incremental_iterations(cfg, classes, recs, last) == sum(2 * (n // 4)
                                                                   for n in standard)
    assert training_budget(disjoint, classes, recs, last, 99) == \
        incremental_iterations(disjoint, classes, recs, last)
    # a budget per class does not depend on the images: the same in both protocols
    for c in (cfg, disjoint):
        c["train"]["iters_per_class"] = 3
    assert incremental_iterations(disjoint, classes, recs, last) == \
        incremental_iterations(cfg, classes, recs, last) == 30


def test_steps_train_on_disjoint_images_and_the_report_names_the_protocol(
        tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["split=5+5", "memory.budget=4", "train.max_iters=1",
                                    "data.disjoint_steps=true"])
    variants = method_variants(["incdet", "finetune", "joint"])
    res = run_protocol(cfg, tmp_path, variants, progress=False, joint_last_only=True)
    from incdet.experiment.loaders import load_experiment

    train_set, _, classes = load_experiment(cfg, progress=False)
    owner = assign_steps(train_set.records, classes.steps)
    assert all(m["protocol"] == "disjoint" for steps in res.values() for m in steps)
    # finetune (no memory): step 0's and step 1's images together are every image once
    images = [m["train"]["images"] for m in res["finetune"]]
    assert images == [sum(s == t for s in owner.values()) for t in (0, 1)]
    assert res["joint"][-1]["train"]["images"] == len(owner) == sum(images)
    # the memory step 1 replays holds images of step 0 only, annotated for step 0's classes
    memory = json.loads((tmp_path / "incdet" / "step_0" / "memory.json").read_text())
    assert memory["images"] and all(owner[im["id"]] == 0 for im in memory["images"])
    assert {a["category_id"] for a in memory["annotations"]} <= set(classes.steps[0])
    # the report and the summary say which protocol ran
    summary = write_report(res, tmp_path, {}, config="tiny", split="5+5")
    assert summary["protocol"] == "disjoint"
    assert json.loads((tmp_path / "summary.json").read_text())["protocol"] == "disjoint"
    assert "Protocol: disjoint steps (data.disjoint_steps" in (tmp_path / "report.md").read_text()
    # metrics written before the setting existed are the standard protocol's; mixed runs say so
    old = {m: [{k: v for k, v in s.items() if k != "protocol"} for s in steps]
           for m, steps in res.items()}
    assert build_summary(old)["protocol"] == "standard"
    assert build_summary(dict(old, joint=res["joint"]))["protocol"] == \
        {"incdet": "standard", "finetune": "standard", "joint": "disjoint"}
