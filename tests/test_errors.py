"""Bad input: one line naming the file or key and the fix, exit code 2, no traceback, and no step
folder claimed complete (no metrics.json)."""
import importlib.util
import json
import shutil

import pytest

from conftest import ROOT


def _train_step():
    spec = importlib.util.spec_from_file_location("train_step", ROOT / "tools" / "train_step.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    return root


def _config(tmp_path, root, extra=""):
    path = tmp_path / "c.yaml"
    path.write_text(f"""
data: {{root: {root}, synthetic: {{generate: false}}}}
split: "4+3+3"
model: {{min_size: 64, max_size: 64, fpn_channels: 16, head_convs: 1}}
train: {{max_iters: 2, batch_size: 4, num_workers: 1, warmup_iters: 1}}
{extra}
""")
    return path


def _run(capsys, cfg, work, *sets, step=0):
    from incdet.tools.cli import main_guard

    args = ["--config", str(cfg), "--step", str(step), "--work-dir", str(work), "--no-progress"]
    for s in sets:
        args += ["--set", s]
    rc = main_guard(lambda: _train_step().main(args))
    err = capsys.readouterr().err
    return rc, err


def _edit_train_json(root, fn):
    path = root / "annotations" / "train.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))
    return path


def _assert_clear_error(rc, err, work, *needles):
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in last, last
    assert not list(work.glob("step_*/metrics.json"))


def test_malformed_annotation_json(dataset_copy, tmp_path, capsys):
    ann = dataset_copy / "annotations" / "train.json"
    ann.write_text('{"images": [')
    rc, err = _run(capsys, _config(tmp_path, dataset_copy), tmp_path / "w")
    _assert_clear_error(rc, err, tmp_path / "w", str(ann), "not valid JSON")


def test_missing_image_file(dataset_copy, tmp_path, capsys):
    gone = dataset_copy / "images" / "train" / "000003.png"
    gone.unlink()
    rc, err = _run(capsys, _config(tmp_path, dataset_copy), tmp_path / "w")
    _assert_clear_error(rc, err, tmp_path / "w", "image files are missing", str(gone))


def test_unreadable_image_file_read_in_a_loader_worker(dataset_copy, tmp_path, capsys):
    for png in (dataset_copy / "images" / "train").glob("*.png"):
        png.write_bytes(b"not a png")
    rc, err = _run(capsys, _config(tmp_path, dataset_copy), tmp_path / "w")
    _assert_clear_error(rc, err, tmp_path / "w", "cannot read image", "replace or remove it")
    assert "images/train/" in err.strip().splitlines()[-1]


def test_unknown_category_id(dataset_copy, tmp_path, capsys):
    ann = _edit_train_json(dataset_copy, lambda d: d["annotations"][0].update(category_id=99))
    rc, err = _run(capsys, _config(tmp_path, dataset_copy), tmp_path / "w")
    _assert_clear_error(rc, err, tmp_path / "w", str(ann), "unknown category id 99")


def test_negative_and_outside_boxes_are_dropped_or_clipped_not_fatal(
        dataset_copy, tmp_path, capsys, caplog):
    def edit(d):
        d["annotations"][0]["bbox"][2] = -5.0  # negative width: dropped
        box = d["annotations"][1]["bbox"]
        box[0] = -box[2] / 2  # half left of the image: clipped

    _edit_train_json(dataset_copy, edit)
    rc, err = _run(capsys, _config(tmp_path, dataset_copy), tmp_path / "w")
    assert rc == 0, err
    assert "dropped 1 boxes with zero or negative size, clipped 1 boxes" in caplog.text
    assert (tmp_path / "w" / "step_0" / "metrics.json").is_file()


def test_split_naming_unknown_classes(dataset_copy, tmp_path, capsys):
    rc, err = _run(capsys, _config(tmp_path, dataset_copy), tmp_path / "w",
                   "split=[[1, 2], [99]]")
    _assert_clear_error(rc, err, tmp_path / "w", "99")


def test_empty_training_set_for_a_step(dataset_copy, tmp_path, capsys):
    _edit_train_json(dataset_copy, lambda d: d.update(
        annotations=[a for a in d["annotations"] if a["category_id"] != 18]))
    rc, err = _run(capsys, _config(tmp_path, dataset_copy), tmp_path / "w",
                   "split=[[18], [1, 2, 4, 5, 7, 9, 11, 14, 16]]")
    _assert_clear_error(rc, err, tmp_path / "w", "step 0 has no training image", "[18]")


def test_misspelled_config_key_in_the_file(dataset_copy, tmp_path, capsys):
    cfg = _config(tmp_path, dataset_copy, "eval: {batch_sise: 4}")
    rc, err = _run(capsys, cfg, tmp_path / "w")
    _assert_clear_error(rc, err, tmp_path / "w", str(cfg), "eval.batch_sise")
    assert not (tmp_path / "w").exists()


def test_checkpoint_of_another_step(dataset_copy, tmp_path, capsys):
    cfg = _config(tmp_path, dataset_copy)
    work = tmp_path / "w"
    assert _run(capsys, cfg, work)[0] == 0
    shutil.copytree(work / "step_0", work / "step_1")
    (work / "step_1" / "metrics.json").unlink()
    rc, err = _run(capsys, cfg, work, step=2)
    assert rc == 2 and "checkpoint is of step 0, expected step 1" in err.strip().splitlines()[-1]
    assert not (work / "step_2" / "metrics.json").exists()


def test_non_finite_loss_stops_with_the_terms(dataset_copy, tmp_path, capsys):
    rc, err = _run(capsys, _config(tmp_path, dataset_copy), tmp_path / "w",
                   "loss.weights.loss_box=.nan")
    _assert_clear_error(rc, err, tmp_path / "w", "non-finite loss at iteration 0", "loss_cls=",
                        "loss_box=", "last good checkpoint is kept")
