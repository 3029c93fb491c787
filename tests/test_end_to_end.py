"""End-to-end runs of tools/train_step.py and the step runner on a tiny generated dataset."""
import contextlib
import io
import json
import shutil
import subprocess
import sys

import pytest
import torch
from pycocotools.cocoeval import COCOeval

from incdet.base.config import load_config
from incdet.data.records import coco_api, to_coco_dict
from incdet.data.sources import load_subset
from incdet.evaluation.coco_eval import METRIC_KEYS, predict
from incdet.experiment.step import run_step
from incdet.model.checkpoint import load_checkpoint, model_from_checkpoint

from conftest import ROOT


def _tool(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _check_metrics_schema(m, step):
    assert m["step"] == step
    assert set(m["classes"]) == {"old", "new"}
    assert set(m["map"]) == {"old", "new", "all"}
    for group in m["map"].values():
        assert set(group) == set(METRIC_KEYS)
        for v in group.values():
            assert v is None or 0.0 <= v <= 1.0
    if step == 0:
        assert m["classes"]["old"] == [] and all(v is None for v in m["map"]["old"].values())
    assert set(m["train"]) >= {"seconds", "iterations", "images_per_second"}
    assert m["train"]["iterations"] > 0 and m["train"]["images_per_second"] > 0
    assert all(isinstance(k, str) for k in m["per_class_ap"])


def test_train_step_0_tool_matches_direct_pycocotools(tiny_config, tmp_path):
    work = tmp_path / "w"
    r = _tool("tools/train_step.py", "--config", str(tiny_config), "--step", "0", "--work-dir",
              str(work), "--no-progress", "--set", "model.score_thresh=0.001")
    assert r.returncode == 0, r.stderr
    step_dir = work / "step_0"
    assert {"checkpoint.pt", "metrics.json", "config.yaml", "log.jsonl"} <= \
        {p.name for p in step_dir.iterdir()}
    assert not (step_dir / "last.pt").exists()
    metrics = json.loads((step_dir / "metrics.json").read_text())
    _check_metrics_schema(metrics, 0)
    assert metrics["classes"]["new"] == [1, 2, 4, 5]
    assert sorted(metrics["per_class_ap"]) == ["1", "2", "4", "5"]

    # the checkpoint is data-only and re-evaluates to exactly the recorded figures
    ckpt = torch.load(step_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["class_order"] == [1, 2, 4, 5, 7, 9, 11, 14, 16, 18]
    assert ckpt["step"] == 0 and ckpt["head_layout"] == [4]
    cfg = load_config(tiny_config, ["model.score_thresh=0.001"])
    model = model_from_checkpoint(ckpt, cfg)
    val = load_subset(cfg["data"], "val")
    results = predict(model, val.records, ckpt["class_order"][:4], 8, "cpu", progress=False)
    assert results, "expected detections at score_thresh 0.001"
    assert {r["category_id"] for r in results} <= {1, 2, 4, 5}
    coco = coco_api(to_coco_dict(val.records, val.categories))
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.params.catIds = [1, 2, 4, 5]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for k, v in zip(METRIC_KEYS, ev.stats[:6]):
        expected = None if v == -1 else v
        assert metrics["map"]["new"][k] == pytest.approx(expected, abs=1e-6)
        assert metrics["map"]["all"][k] == pytest.approx(expected, abs=1e-6)

    # tools/evaluate.py prints the same table
    r = _tool("tools/evaluate.py", "--checkpoint", str(step_dir / "checkpoint.pt"), "--config",
              str(tiny_config), "--set", "model.score_thresh=0.001", "--no-progress")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("new"))
    assert line.split()[1] == f"{metrics['map']['new']['AP']:.3f}"

    # without --config, --set changes the config saved in the checkpoint (it used to be ignored):
    # no score passes a threshold above 1, so every AP is 0
    assert metrics["map"]["new"]["AP"] > 0
    out = tmp_path / "eval.json"
    r = _tool("tools/evaluate.py", "--checkpoint", str(step_dir / "checkpoint.pt"), "--set",
              "model.score_thresh=1.01", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr
    evaluation = json.loads(out.read_text())
    assert evaluation["groups"]["new"]["AP"] == 0.0
    assert set(evaluation["per_class_ap"].values()) == {0.0}
    r = _tool("tools/evaluate.py", "--checkpoint", str(step_dir / "checkpoint.pt"), "--set",
              "model.score_tresh=0.3", "--no-progress")
    assert r.returncode != 0
    assert "unknown config key 'model.score_tresh'" in r.stderr


def test_three_step_incdet_run(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    work = tmp_path / "w"
    for t in range(3):
        m = run_step(cfg, t, work, progress=False)
        _check_metrics_schema(m, t)
        assert set(m["forgetting"]) == {f"step_{s}" for s in range(t)}
        assert set(m["groups"]) == {f"step_{s}" for s in range(t + 1)}
    order = [1, 2, 4, 5, 7, 9, 11, 14, 16, 18]
    for t, layout in enumerate([[4], [4, 3], [4, 3, 3]]):
        ckpt = load_checkpoint(work / f"step_{t}" / "checkpoint.pt")
        assert ckpt["class_order"] == order and ckpt["head_layout"] == layout
        assert ckpt["steps"] == [[1, 2, 4, 5], [7, 9, 11], [14, 16, 18]]
        # the student's weights only: the teacher is never saved
        model = model_from_checkpoint(ckpt, cfg)
        assert set(ckpt["model"]) == set(model.state_dict())
        assert not any("teacher" in k for k in ckpt)
    last = json.loads((work / "step_2" / "metrics.json").read_text())
    assert last["classes"] == {"old": [1, 2, 4, 5, 7, 9, 11], "new": [14, 16, 18]}
    assert sorted(last["per_class_ap"], key=int) == [str(c) for c in order]


@pytest.mark.parametrize("method", ["finetune", "joint"])
def test_baseline_methods_run_a_step(tiny_config, tmp_path, method):
    cfg = load_config(tiny_config, [f"incremental.method={method}", "split=5+5"])
    work = tmp_path / method
    run_step(cfg, 0, work, progress=False)
    m = run_step(cfg, 1, work, progress=False)
    _check_metrics_schema(m, 1)
    assert m["method"] == method
    assert load_checkpoint(work / "step_1" / "checkpoint.pt")["head_layout"] == [5, 5]


def test_completed_step_is_not_retrained(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    m = run_step(cfg, 0, tmp_path, progress=False)
    before = (tmp_path / "step_0" / "checkpoint.pt").stat().st_mtime_ns
    assert run_step(cfg, 0, tmp_path, progress=False) == m
    assert (tmp_path / "step_0" / "checkpoint.pt").stat().st_mtime_ns == before


def test_user_errors_are_one_line_exit_2(tiny_config, tmp_path):
    r = _tool("tools/train_step.py", "--config", str(tiny_config), "--step", "1", "--work-dir",
              str(tmp_path), "--no-progress")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "step_0/checkpoint.pt: missing" in r.stderr
    r = _tool("tools/train_step.py", "--config", str(tiny_config), "--step", "0", "--work-dir",
              str(tmp_path), "--set", "train.epoch=2")
    assert r.returncode == 2 and "unknown config key 'train.epoch'" in r.stderr
    assert not (tmp_path / "step_0").exists()


def test_checkpoint_of_another_split_is_refused(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    run_step(cfg, 0, tmp_path, progress=False)
    shutil.copytree(tmp_path / "step_0", tmp_path / "y" / "step_0")
    reordered = load_config(tiny_config, ["split=[[5, 4, 2, 1], [7, 9, 11], [14, 16, 18]]"])
    from incdet.base.errors import UserError

    with pytest.raises(UserError, match="another class order or split"):
        run_step(reordered, 1, tmp_path / "y", progress=False)


def test_memory_is_selected_within_budget_and_replayed_with_its_label_space(
        tiny_config, tmp_path):
    from incdet.data.records import filter_for_classes
    from incdet.experiment.loaders import load_experiment, train_loader
    from incdet.train.memory import Memory

    cfg = load_config(tiny_config, ["memory.budget=6", "split=5+5", "memory.replay_mode=add",
                                    "memory.replay_loss=separate"])
    run_step(cfg, 0, tmp_path, progress=False)
    mem_json = json.loads((tmp_path / "step_0" / "memory.json").read_text())
    assert len(mem_json["images"]) <= 6
    assert set(mem_json["rankings"]) == {"1", "2", "4", "5", "7"}
    assert all(len(v) <= q for v, q in zip(mem_json["rankings"].values(),
                                           mem_json["quotas"].values()))
    memory = Memory.from_json(tmp_path / "step_0" / "memory.json", cfg["data"]["root"])

    train_set, _, classes = load_experiment(cfg, progress=False)
    new_records = filter_for_classes(train_set.records, classes.step(1).new)
    space = tuple(classes.labels([9, 11, 14, 16, 18]))
    loader = train_loader(cfg, classes, new_records, space, memory, seed=1)
    ds = loader.dataset
    new_ids = {r.id for r in new_records}
    # every image once: a memory image that also has new-class boxes is not drawn twice
    assert sorted(r.id for r in ds.records) == sorted(new_ids | set(memory.records))
    assert not new_ids <= set(memory.records)
    num_new = len(new_ids - set(memory.records))
    assert ds.first_replayed == num_new  # the whole memory is the replayed pool
    assert {r.id for r in ds.records[num_new:]} == set(memory.records)
    assert any(i in new_ids for i in memory.records)  # the case the pool rule is about
    for i in range(num_new, len(ds)):
        rec, got = ds.records[i], set(ds.label_spaces[i].tolist())
        old_space = set(classes.labels(memory.label_spaces[rec.id]))
        assert old_space <= {0, 1, 2, 3, 4}  # memory images are annotated for step-0 classes
        assert ds[i][1]["replayed"] is True  # the loss tells them apart
        if rec.id in new_ids:  # also a new image: annotated for both steps, with both boxes
            assert got == old_space | {5, 6, 7, 8, 9}
            new_rec = next(r for r in new_records if r.id == rec.id)
            assert len(rec.boxes) == len(new_rec.boxes) + len(memory.records[rec.id].boxes)
        else:  # memory only: its own label space; later classes are not background on it
            assert got == old_space
            assert set(rec.category_ids.tolist()) <= {1, 2, 4, 5, 7}
    for i, r in enumerate(ds.records):
        assert set(classes.labels(r.category_ids.tolist())) <= set(ds.label_spaces[i].tolist())
    # every batch mixes in memory images, on top of a full batch of new ones
    batches = list(loader.batch_sampler)
    assert all(any(j >= num_new for j in b) for b in batches)
    bs = cfg["train"]["batch_size"]
    assert all(sum(j < num_new for j in b) == min(bs, num_new) for b in batches[:-1])
    assert sorted(j for b in batches for j in b if j < num_new) == list(range(num_new))
    assert ds[0][1]["replayed"] is False
    # when every new image is in the memory, they stay new images (annotated for both) and the
    # memory's other images are replayed
    sub = [r for r in new_records if r.id in memory.records]
    ds = train_loader(cfg, classes, sub, space, memory, seed=1).dataset
    assert [r.id for r in ds.records[:len(sub)]] == [r.id for r in sub]
    assert ds.first_replayed == len(sub)
    assert {r.id for r in ds.records[len(sub):]} == set(memory.records) - new_ids
    assert all(set(ds.label_spaces[i].tolist()) >= {5, 6, 7, 8, 9} for i in range(len(sub)))

    m1 = run_step(cfg, 1, tmp_path, progress=False)
    assert m1["memory"]["replayed_from_previous"] == len(memory)
    assert m1["memory"]["images"] <= 6
