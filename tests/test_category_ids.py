"""Category ids of a user's files (data.category_ids) and validation from several annotation
files: ids are given by name, recorded in the step folder, and each validation image is
evaluated for the classes of its own file."""
import json

import numpy as np
import pytest

from incdet.base.config import load_config
from incdet.base.errors import UserError
from incdet.data.records import ImageRecord
from incdet.data.sources import assign_category_ids, data_record
from incdet.evaluation.coco_eval import evaluate_model
from incdet.experiment.loaders import load_experiment

from conftest import write_coco

KNOWN = [{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}]
NEW = [{"id": 1, "name": "platypus"}, {"id": 2, "name": "person"}, {"id": 5, "name": "kiwi"}]


def test_auto_numbers_by_name_then_keeps_a_free_id_then_takes_the_next_free_one():
    changes = assign_category_ids([("new.json", NEW), ("val.json", [NEW[0]])], KNOWN, "auto")
    # platypus collides with person (1): the next id above all in use or in a file, 6; person
    # is 1 by name; kiwi's 5 is free and stays; the second file's platypus follows the first's
    assert changes == {"new.json": {1: 6, 2: 1}, "val.json": {1: 6}}
    assert assign_category_ids([("new.json", NEW)], KNOWN, "file") == {}
    pinned = assign_category_ids([("new.json", NEW)], KNOWN, {"platypus": 91})
    assert pinned == {"new.json": {1: 91, 2: 1}}


@pytest.mark.parametrize("mode, message", [
    ({"person": 7}, "'person' -> 7, but 'person' is id 1 among the imported detector's"),
    ({"platypus": 2}, "id 2 is 'bicycle' already, not 'platypus'"),
    ({"platypus": "a"}, "'platypus': 'a' is not a positive integer id"),
    ("by-name", "data.category_ids: 'by-name'; expected auto, file or a mapping"),
])
def test_bad_category_ids_are_one_error_naming_the_key(mode, message):
    with pytest.raises(UserError, match=message):
        assign_category_ids([("new.json", NEW)], KNOWN, mode)


def _split_dataset(tiny_dataset, tmp_path):
    """The tiny built-in dataset as a user would have it: the old classes' validation file
    (circle..hexagon, the built-in ids 1, 2, 4, 5) and the new classes' files numbered from 1."""
    train = json.loads((tiny_dataset / "annotations" / "train.json").read_text())
    val = json.loads((tiny_dataset / "annotations" / "val.json").read_text())
    old_ids, new_ids = [1, 2, 4, 5], [7, 9, 11]
    renumber = {cid: i + 1 for i, cid in enumerate(new_ids)}  # star.. -> 1..

    def part(data, ids, numbers, name):
        cats = [dict(c, id=numbers.get(c["id"], c["id"])) for c in data["categories"]
                if c["id"] in ids]
        anns = [dict(a, category_id=numbers.get(a["category_id"], a["category_id"]))
                for a in data["annotations"] if a["category_id"] in ids]
        return write_coco(tmp_path / "user" / "annotations" / name, data["images"], anns, cats)

    part(train, new_ids, renumber, "new_train.json")
    part(val, new_ids, renumber, "new_val.json")
    part(val, old_ids, {}, "old_val.json")
    (tmp_path / "user" / "images").symlink_to(tiny_dataset / "images")
    return tmp_path / "user", [c for c in train["categories"] if c["id"] in old_ids]


def test_new_classes_numbered_from_one_are_trained_and_evaluated_with_the_old_ones(
        tiny_dataset, tmp_path):
    root, old = _split_dataset(tiny_dataset, tmp_path)
    cfg = load_config(None, [
        f"data.root={root}", "data.train.annotations=annotations/new_train.json",
        "data.val=[{images: images/val, annotations: annotations/old_val.json}, "
        "{images: images/val, annotations: annotations/new_val.json}]",
        f"categories={json.dumps(old)}", "split=4+3"])
    train_set, val_set, classes = load_experiment(cfg, progress=False)
    names = {c["name"]: c["id"] for c in train_set.categories}
    # star (1) and cross (2) collide with the detector's circle and triangle: the next ids above
    # all in use; ring's 3 is free and stays
    assert names == {"star": 6, "cross": 7, "ring": 3}
    assert [list(s) for s in classes.steps] == [[1, 2, 4, 5], [3, 6, 7]]
    # both validation files, their images kept apart (the same pictures, other ids)
    old_file, new_file = (str(root / "annotations" / f) for f in ("old_val.json",
                                                                  "new_val.json"))
    assert len(val_set.records) == 32 and len({r.id for r in val_set.records}) == 32
    assert {r.annotated_by.file for r in val_set.records} == {old_file, new_file}
    for r in val_set.records:
        expected = {1, 2, 4, 5} if r.annotated_by.file == old_file else {3, 6, 7}
        assert set(r.category_ids.tolist()) <= expected == set(r.annotated_by.classes)
    record = data_record(cfg["data"], cfg["categories"])
    assert record["category_ids"][str(root / "annotations" / "new_train.json")] == \
        {"1": 6, "2": 7}
    assert record["val_files"]["1"] == [old_file] and record["val_files"]["6"] == [new_file]


def test_an_image_is_evaluated_for_the_classes_of_its_own_file_only(monkeypatch):
    """A new-class detection on an image of the old classes' file is no false positive (that
    file does not annotate new classes), but it is one on the new file's images."""
    from incdet.data.records import AnnotatedBy
    from incdet.evaluation import coco_eval

    box = np.array([[10, 10, 50, 50]], np.float32)
    old = AnnotatedBy("old.json", frozenset({1}))
    new = AnnotatedBy("new.json", frozenset({2}))
    records = [ImageRecord(1, "a.png", 64, 64, box, np.array([1]), np.zeros(1, bool), None, old),
               ImageRecord(2, "b.png", 64, 64, box, np.array([2]), np.zeros(1, bool), None, new),
               ImageRecord(3, "c.png", 64, 64, box + 5, np.array([2]), np.zeros(1, bool), None,
                           new)]

    def predict(model, recs, order, *args, **kwargs):  # class 2 on every image, high scores
        out = []
        for r in recs:
            x0, y0, x1, y1 = (float(v) for v in r.boxes[0])
            out.append({"image_id": r.id, "category_id": int(r.category_ids[0]),
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": 0.5})
            if r.id != 3:  # a class-2 box with a top score where no class-2 object is annotated
                out.append({"image_id": r.id, "category_id": 2, "score": 0.9,
                            "bbox": [x0 + 30, y0 + 30, 10, 10] if r.id == 2 else
                            [x0, y0, x1 - x0, y1 - y0]})
        return out

    monkeypatch.setattr(coco_eval, "predict", predict)
    cats = [{"id": 1, "name": "old"}, {"id": 2, "name": "new"}]
    groups = {"old": [1], "new": [2], "all": [1, 2]}
    ev = evaluate_model(None, records, cats, [1, 2], groups, 1, "cpu", progress=False)
    # class 1: one image, found: AP 1. class 2: evaluated on b and c only; the false box on a
    # (old file) does not count, the one on b (new file) does: the top-scored detection is false
    assert ev["per_class_ap"]["1"] == pytest.approx(1.0)
    assert ev["evaluated_on"] == {"1": ["old.json"], "2": ["new.json"]}
    evaluated_on_all = evaluate_model(None, [r.__class__(**{**r.__dict__, "annotated_by": None})
                                             for r in records], cats, [1, 2], groups, 1, "cpu",
                                      progress=False)
    assert ev["per_class_ap"]["2"] > evaluated_on_all["per_class_ap"]["2"]
    assert ev["per_class_ap"]["2"] < 1.0
