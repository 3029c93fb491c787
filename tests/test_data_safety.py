"""A user's data folder is read-only: incdet never writes into it, whatever the config says, and a
missing or broken annotation file there is one clear error with nothing written (issue 33)."""
import hashlib
import shutil

import pytest
from test_errors import _assert_clear_error, _run

from incdet.base.errors import UserError
from incdet.data import synthetic

from conftest import write_coco


def _snapshot(root):
    """Every file under ``root``: relative path -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def user_folder(tiny_dataset, tmp_path):
    """A user's COCO folder: their images (named as the built-in generator names its own), COCO's
    own annotation file names, a note of theirs."""
    root = tmp_path / "mydata"
    for sub in ("train", "val"):
        shutil.copytree(tiny_dataset / "images" / sub, root / "images" / sub)
        src = (tiny_dataset / "annotations" / f"{sub}.json").read_bytes()
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{sub}.json").write_bytes(src)
    (root / "README.txt").write_text("our photographs\n")
    return root


def _config(tmp_path, root, extra=""):
    path = tmp_path / "c.yaml"
    path.write_text(f"""
data: {{root: {root}, synthetic: {{generate: true, num_train: 8, num_val: 4, image_size: 64}}}}
split: "4+3+3"
model: {{min_size: 64, max_size: 64, fpn_channels: 16, head_convs: 1}}
train: {{max_iters: 1, batch_size: 4, num_workers: 0, warmup_iters: 1}}
{extra}
""")
    return path


def test_differently_named_annotations_are_an_error_and_nothing_is_written(
        user_folder, tmp_path, capsys):
    before = _snapshot(user_folder)
    rc, err = _run(capsys, _config(tmp_path, user_folder), tmp_path / "w")
    _assert_clear_error(rc, err, tmp_path / "w", str(user_folder / "annotations" / "train.json"),
                        "annotations/instances_train.json", "data.train.annotations")
    assert _snapshot(user_folder) == before


def test_malformed_annotation_beside_user_images_is_an_error_and_nothing_is_written(
        user_folder, tmp_path, capsys):
    ann = user_folder / "annotations"
    (ann / "train.json").write_text('{"images": [')
    shutil.copy(ann / "instances_val.json", ann / "val.json")
    before = _snapshot(user_folder)
    rc, err = _run(capsys, _config(tmp_path, user_folder), tmp_path / "w")
    _assert_clear_error(rc, err, tmp_path / "w", str(ann / "train.json"), "not valid JSON")
    assert _snapshot(user_folder) == before


def test_a_user_dataset_trains_and_stays_byte_identical(user_folder, tmp_path, capsys):
    before = _snapshot(user_folder)
    extra = ("data: {root: %s, synthetic: {generate: true},"
             " train: {annotations: annotations/instances_train.json},"
             " val: {annotations: annotations/instances_val.json}}" % user_folder)
    cfg = _config(tmp_path, user_folder)
    cfg.write_text(cfg.read_text().replace(cfg.read_text().splitlines()[1], extra))
    rc, err = _run(capsys, cfg, tmp_path / "w")
    assert rc == 0, err
    assert (tmp_path / "w" / "step_0" / "metrics.json").is_file()
    assert _snapshot(user_folder) == before


def test_builtin_data_is_generated_only_into_a_missing_or_empty_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = _run(capsys, _config(tmp_path, empty), tmp_path / "w")
    assert rc == 0, err
    assert synthetic.folder_state(empty) == "builtin"
    assert len(list((empty / "images" / "train").glob("*.png"))) == 8
    # a complete built-in dataset is read again, not rewritten
    before = {p: p.stat().st_mtime_ns for p in empty.rglob("*")}
    rc, err = _run(capsys, _config(tmp_path, empty), tmp_path / "w2")
    assert rc == 0, err
    assert {p: p.stat().st_mtime_ns for p in empty.rglob("*")} == before


def test_interrupted_generation_resumes_but_a_foreign_file_stops_it(tmp_path):
    root = tmp_path / "d"
    synthetic.generate(root, num_train=4, num_val=2, image_size=32, progress=False)
    (root / "annotations" / "val.json").unlink()  # as if killed before the last file
    assert synthetic.folder_state(root) == "partial"
    synthetic.generate(root, num_train=4, num_val=2, image_size=32, progress=False)
    assert synthetic.folder_state(root) == "builtin"
    (root / "notes.txt").write_text("mine")
    assert synthetic.folder_state(root) == "other"
    before = _snapshot(root)
    with pytest.raises(UserError, match="did not write"):
        synthetic.generate(root, num_train=4, num_val=2, image_size=32, progress=False)
    assert _snapshot(root) == before


def test_missing_root_without_generate_is_an_error(tmp_path, capsys):
    missing = tmp_path / "typo"
    cfg = _config(tmp_path, missing)
    cfg.write_text(cfg.read_text().replace("generate: true", "generate: false"))
    rc, err = _run(capsys, cfg, tmp_path / "w")
    _assert_clear_error(rc, err, tmp_path / "w", str(missing), "data.synthetic.generate: true")
    assert not missing.exists()


def test_annotation_files_numbered_like_the_generator_do_not_make_a_folder_builtin(tmp_path):
    root = tmp_path / "u"
    write_coco(root / "annotations" / "train.json", [], [], [{"id": 1, "name": "a"}])
    write_coco(root / "annotations" / "val.json", [], [], [{"id": 1, "name": "a"}])
    (root / "images").mkdir()
    (root / "labels.csv").write_text("x")
    assert synthetic.folder_state(root) == "other"
