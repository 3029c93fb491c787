import json

import numpy as np
import pytest
from PIL import Image

from incdet.base.errors import UserError
from incdet.data.coco import load_coco
from incdet.data.records import ImageRecord, clean_boxes, filter_for_classes, to_coco_dict

from conftest import write_coco


def test_clean_boxes_drops_degenerate_and_clips():
    boxes = np.array([[10, 10, 20, 20],     # fine
                      [5, 5, 5, 9],         # zero width -> dropped
                      [8, 8, 4, 12],        # negative width -> dropped
                      [-5, 2, 10, 12],      # partly outside -> clipped
                      [90, 90, 130, 120],   # partly outside -> clipped
                      [120, 3, 140, 9],     # entirely outside -> dropped
                      [np.nan, 0, 3, 3]],   # not finite -> dropped
                     np.float32)
    kept, keep, report = clean_boxes(boxes, 100, 100)
    assert keep.tolist() == [True, False, False, True, True, False, False]
    assert report.dropped == 4 and report.clipped == 2
    np.testing.assert_allclose(kept, [[10, 10, 20, 20], [0, 2, 10, 12], [90, 90, 100, 100]])
    assert ((kept[:, 2:] - kept[:, :2]) >= 1).all()


def _rec(cats, crowd=None):
    n = len(cats)
    return ImageRecord(id=1, path="x.png", width=50, height=50,
                       boxes=np.tile(np.array([[1, 1, 10, 10]], np.float32), (n, 1)),
                       category_ids=np.array(cats, np.int64),
                       iscrowd=np.array(crowd or [False] * n, bool))


def test_filter_for_classes_keeps_only_step_boxes_and_drops_crowd():
    recs = [_rec([1, 4, 4]), _rec([2]), _rec([4, 9], crowd=[True, False])]
    out = filter_for_classes(recs, [4])
    assert len(out) == 1  # the crowd-only image has no trainable box of class 4
    assert out[0].category_ids.tolist() == [4, 4]
    # the originals are untouched
    assert recs[0].category_ids.tolist() == [1, 4, 4]


def _image(tmp_path, name="a.png", size=(40, 30)):
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", size).save(tmp_path / "img" / name)


def test_load_coco_cleans_and_reports(tmp_path):
    _image(tmp_path)
    ann = write_coco(tmp_path / "ann.json",
                     [{"id": 7, "file_name": "a.png", "width": 40, "height": 30}],
                     [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 1, 10, 10]},
                      {"id": 2, "image_id": 7, "category_id": 3, "bbox": [1, 1, 0, 10]},
                      {"id": 3, "image_id": 7, "category_id": 5, "bbox": [35, 20, 20, 20],
                       "iscrowd": 1}],
                     [{"id": 5, "name": "b"}, {"id": 3, "name": "a"}])
    cats, recs, report = load_coco(ann, tmp_path / "img")
    assert [c["id"] for c in cats] == [3, 5]
    assert report.dropped == 1 and report.clipped == 1
    (rec,) = recs
    assert rec.category_ids.tolist() == [3, 5] and rec.iscrowd.tolist() == [False, True]
    np.testing.assert_allclose(rec.boxes[1], [35, 20, 40, 30])
    gt = to_coco_dict(recs, cats)
    assert gt["annotations"][1]["iscrowd"] == 1 and gt["annotations"][0]["bbox"] == [1, 1, 10, 10]


@pytest.mark.parametrize("content,msg", [
    ("{not json", "not valid JSON"),
    ("[]", "expected a JSON object"),
    (json.dumps({"images": []}), "no 'categories' field"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                 "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [0, 0, 1, 1]}],
                 "categories": [{"id": 1, "name": "a"}]}), "unknown category id 9"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
                 "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": "x"}],
                 "categories": [{"id": 1, "name": "a"}]}), "expected \\[x, y, width, height\\]"),
    (json.dumps({"images": [{"id": 1, "file_name": "gone.png", "width": 40, "height": 30}],
                 "annotations": [], "categories": [{"id": 1, "name": "a"}]}), "missing"),
])
def test_load_coco_errors_name_the_file(tmp_path, content, msg):
    _image(tmp_path)
    ann = tmp_path / "ann.json"
    ann.write_text(content)
    with pytest.raises(UserError, match=msg) as e:
        load_coco(ann, tmp_path / "img")
    assert str(ann) in str(e.value)
