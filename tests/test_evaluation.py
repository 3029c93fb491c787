import contextlib
import io

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from incdet.data.records import coco_api
from incdet.evaluation.coco_eval import METRIC_KEYS, coco_evaluate


def _gt_and_results(seed=0):
    rng = np.random.default_rng(seed)
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 3, 8, 20)]
    images, anns, results = [], [], []
    for i in range(1, 13):
        images.append({"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"})
        for _ in range(rng.integers(1, 4)):
            c = int(rng.choice([1, 3, 8]))  # class 20 has no ground truth
            x, y = rng.uniform(0, 60, 2)
            w, h = rng.uniform(8, 40, 2)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c,
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            if rng.random() < 0.8:
                jitter = rng.normal(0, 3, 4)
                results.append({"image_id": i, "category_id": c if rng.random() < 0.85 else 1,
                                "bbox": [x + jitter[0], y + jitter[1], w + jitter[2],
                                         h + jitter[3]], "score": float(rng.random())})
    results.append({"image_id": 1, "category_id": 20, "bbox": [0, 0, 10, 10], "score": 0.9})
    return {"images": images, "annotations": anns, "categories": cats}, results


def _direct(gt, results, cat_ids):
    coco = coco_api(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("group", [[8, 1], [3], [1, 3, 8, 20]])
def test_group_metrics_equal_direct_pycocotools(group):
    gt, results = _gt_and_results()
    out = coco_evaluate(gt, results, [20, 8, 3, 1], {"g": group})
    stats = _direct(gt, results, group)
    for k, expected in zip(METRIC_KEYS, stats[:6]):
        got = out["groups"]["g"][k]
        if expected == -1:
            assert got is None
        else:
            assert got == pytest.approx(expected, abs=1e-9), k


def test_per_class_ap_excludes_classes_without_ground_truth():
    gt, results = _gt_and_results()
    out = coco_evaluate(gt, results, [1, 3, 8, 20], {"all": [1, 3, 8, 20]})
    assert out["per_class_ap"]["20"] is None
    for c in (1, 3, 8):
        assert out["per_class_ap"][str(c)] == pytest.approx(_direct(gt, results, [c])[0])


def test_no_detections_gives_zero_not_a_crash():
    gt, _ = _gt_and_results()
    out = coco_evaluate(gt, [], [1, 3, 20], {"old": [], "new": [1, 3], "none": [20]})
    assert out["groups"]["new"]["AP"] == 0.0
    assert out["groups"]["old"]["AP"] is None and out["groups"]["none"]["AP"] is None
    assert out["per_class_ap"] == {"1": 0.0, "3": 0.0, "20": None}
