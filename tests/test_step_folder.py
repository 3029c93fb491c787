"""The step folder: one writer for trained, merged and imported steps, and never a stale result
(a completed step of another config or data is an error naming what differs)."""
import json
import shutil

import pytest
from test_errors import _run, _train_step

from incdet.base.config import load_config
from incdet.experiment.protocol import run_protocol
from incdet.experiment.step import run_step
from incdet.experiment.step_folder import config_digest
from incdet.tools.cli import main_guard


def test_same_config_returns_at_once_another_is_an_error_force_retrains(
        tiny_config, tmp_path, capsys):
    work = tmp_path / "w"
    rc, err = _run(capsys, tiny_config, work)
    assert rc == 0, err
    metrics_path = work / "step_0" / "metrics.json"
    first = json.loads(metrics_path.read_text())
    assert first["config_digest"] == config_digest(load_config(tiny_config))
    assert set(first["versions"]) == {"incdet", "torch", "torchvision"}
    assert all(len(h) == 64 for h in first["data_files"].values()) and first["data_files"]
    mtime = metrics_path.stat().st_mtime_ns
    # the same config (and a setting that cannot change a result): the completed step, at once
    rc, err = _run(capsys, tiny_config, work, "train.log_every=7")
    assert rc == 0 and metrics_path.stat().st_mtime_ns == mtime, err
    # another learning rate: one line naming the key, both values and the two ways out
    rc, err = _run(capsys, tiny_config, work, "train.lr=0.01")
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "complete with another config (train.lr: 0.007 -> 0.01)" in last, err
    assert "--work-dir" in last and "--force" in last
    assert metrics_path.stat().st_mtime_ns == mtime
    # --force trains it again with the new config
    rc = main_guard(lambda: _train_step().main(
        ["--config", str(tiny_config), "--step", "0", "--work-dir", str(work), "--no-progress",
         "--set", "train.lr=0.01", "--force"]))
    again = json.loads(metrics_path.read_text())
    assert rc == 0 and again["config_digest"] == config_digest(
        load_config(tiny_config, ["train.lr=0.01"])) != first["config_digest"]


def test_changed_annotations_make_a_completed_step_an_error(tiny_dataset, tiny_config, tmp_path):
    from incdet.base.errors import UserError

    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    cfg = load_config(tiny_config, [f"data.root={root}"])
    run_step(cfg, 0, tmp_path / "w", progress=False)
    ann = root / "annotations" / "val.json"
    data = json.loads(ann.read_text())
    data["annotations"] = data["annotations"][1:]
    ann.write_text(json.dumps(data))
    with pytest.raises(UserError, match=rf"{ann} changed since it was made.*--force"):
        run_step(cfg, 0, tmp_path / "w", progress=False)


def test_protocol_force_retrains_and_without_it_another_config_is_an_error(
        tiny_config, tmp_path):
    from incdet.base.errors import UserError

    cfg = load_config(tiny_config, ["split=[[1, 2, 4, 5], [7, 9, 11]]"])
    variants = {"finetune": ["incremental.method=finetune", "memory.budget=0"]}
    first = run_protocol(cfg, tmp_path / "p", variants, progress=False)
    other = load_config(tiny_config, ["split=[[1, 2, 4, 5], [7, 9, 11]]", "train.lr=0.002"])
    with pytest.raises(UserError, match="train.lr: 0.007 -> 0.002"):
        run_protocol(other, tmp_path / "p", variants, progress=False)
    forced = run_protocol(other, tmp_path / "p", variants, progress=False, force=True)
    assert [m["config_digest"] for m in forced["finetune"]] == [config_digest(
        load_config(tiny_config, ["split=[[1, 2, 4, 5], [7, 9, 11]]", "train.lr=0.002",
                                  "incremental.method=finetune", "memory.budget=0"]))] * 2
    assert forced["finetune"][0]["config_digest"] != first["finetune"][0]["config_digest"]


def test_an_interrupted_step_resumes_only_with_its_own_config(tiny_config, tmp_path):
    from incdet.base.errors import UserError
    from incdet.model.checkpoint import load_checkpoint, save_checkpoint

    cfg = load_config(tiny_config)
    run_step(cfg, 0, tmp_path / "w", progress=False)
    step = tmp_path / "w" / "step_0"
    # an interrupted run of another config: its last.pt, no metrics.json
    ckpt = load_checkpoint(step / "checkpoint.pt")
    other = load_config(tiny_config, ["train.lr=0.003"])
    ckpt.update(config={k: v for k, v in other.items() if not k.startswith("_")},
                train_state={})
    save_checkpoint(step / "last.pt", ckpt)
    (step / "metrics.json").unlink()
    with pytest.raises(UserError, match=r"last.pt: this step was interrupted with another "
                                        r"config \(train.lr: 0.003 -> 0.007\)"):
        run_step(cfg, 0, tmp_path / "w", resume=True, progress=False)
