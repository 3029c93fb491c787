"""COCO-style evaluation (pycocotools) restricted to the classes seen so far, summarised per
class group (``old`` / ``new`` / ``all`` and one entry per step), with per-class AP.

Group figures are computed from one ``COCOeval`` run over all seen classes, by averaging its
precision array over the group's classes exactly as ``COCOeval.summarize`` does (so a group's AP
equals a pycocotools run with ``params.catIds`` set to the group; the tests check this).
A class without ground truth has precision -1 and is left out; a group with no such class has
null figures.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from incdet.data.dataset import DetectionDataset, make_loader
from incdet.data.records import ImageRecord, coco_api, to_coco_dict

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@torch.no_grad()
def predict(model, records: Sequence[ImageRecord], order: Sequence[int], batch_size: int,
            device, num_workers: int = 0, progress: bool = True) -> list[dict]:
    """Detections as COCO results ``[{"image_id", "category_id", "bbox" (xywh), "score"}]``.

    ``order[label]`` is the category id of model label ``label``.
    """
    model.eval()
    # boxes are not needed to predict: the dataset gets the images only
    images_only = [replace(r, boxes=np.zeros((0, 4), np.float32),
                           category_ids=np.zeros((0,), np.int64), iscrowd=np.zeros((0,), bool))
                   for r in records]
    dataset = DetectionDataset(images_only, {}, [[] for _ in records], transform=None)
    loader = make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, seed=0,
                         device=device)
    order_t = torch.as_tensor(list(order), dtype=torch.int64)
    results = []
    for images, targets in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
        outputs = model([img.to(device, non_blocking=True) for img in images])
        for out, t in zip(outputs, targets):
            boxes = out["boxes"].cpu()
            if boxes.numel() == 0:
                continue
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
            cats = order_t[out["labels"].cpu()].tolist()
            for b, c, s in zip(xywh, cats, out["scores"].cpu().tolist()):
                results.append({"image_id": int(t["image_id"]), "category_id": int(c),
                                "bbox": [round(v, 3) for v in b], "score": round(s, 5)})
    return results


def _summ(precision: np.ndarray, k_idx: Sequence[int], t: int | None = None,
          area: int = 0) -> float | None:
    """Mean precision over IoU thresholds (or threshold index ``t``), recall points and the
    classes ``k_idx``, for an area range at 100 detections; -1 entries (no ground truth) skipped."""
    iou = slice(None) if t is None else slice(t, t + 1)
    s = precision[iou][:, :, list(k_idx), area, -1]
    s = s[s > -1]
    return float(np.mean(s)) if s.size else None


def summarize(precision: np.ndarray, k_idx: Sequence[int]) -> dict:
    """COCOeval.summarize's six box metrics for a subset of class indices (None if empty)."""
    if len(k_idx) == 0:
        return {k: None for k in METRIC_KEYS}
    return {"AP": _summ(precision, k_idx), "AP50": _summ(precision, k_idx, t=0),
            "AP75": _summ(precision, k_idx, t=5), "APs": _summ(precision, k_idx, area=1),
            "APm": _summ(precision, k_idx, area=2), "APl": _summ(precision, k_idx, area=3)}


def coco_evaluate(gt: dict, results: list[dict], class_ids: Sequence[int],
                  groups: dict[str, Sequence[int]]) -> dict:
    """Evaluate ``results`` against the COCO dict ``gt`` on ``class_ids``.

    Returns ``{"groups": {name: metrics}, "per_class_ap": {str(id): AP or None}}``.
    """
    class_ids = sorted(int(c) for c in class_ids)
    coco_gt = coco_api(gt)
    has_gt = {c: len(coco_gt.getAnnIds(catIds=[c], iscrowd=False)) > 0 for c in class_ids}
    results = [r for r in results if r["category_id"] in set(class_ids)]
    if not results:
        # pycocotools cannot load an empty result list: nothing detected means AP 0 wherever
        # there is ground truth
        per_class = {str(c): (0.0 if has_gt[c] else None) for c in class_ids}
        out_groups = {}
        for name, ids in groups.items():
            any_gt = any(has_gt.get(int(c), False) for c in ids)
            out_groups[name] = {k: (0.0 if any_gt else None) for k in METRIC_KEYS}
        return {"groups": out_groups, "per_class_ap": per_class}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.catIds = class_ids
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"]  # (T, R, K, A, M), K indexed like sorted(params.catIds)
    index = {c: i for i, c in enumerate(ev.params.catIds)}
    per_class = {str(c): _summ(precision, [index[c]]) for c in class_ids}
    out_groups = {name: summarize(precision, [index[int(c)] for c in ids])
                  for name, ids in groups.items()}
    return {"groups": out_groups, "per_class_ap": per_class}


def evaluate_model(model, records: Sequence[ImageRecord], categories: Sequence[dict],
                   order: Sequence[int], groups: dict[str, Sequence[int]], batch_size: int,
                   device, num_workers: int = 0, progress: bool = True) -> dict:
    """Predict on ``records`` and evaluate the model's classes (``order``) by group."""
    results = predict(model, records, order, batch_size, device, num_workers, progress)
    gt = to_coco_dict(records, categories)
    return coco_evaluate(gt, results, order, groups)


def format_table(evaluation: dict, names: dict[int, str] | None = None) -> str:
    """A plain-text table of group metrics, then per-class AP."""
    lines = [f"{'group':<10}" + "".join(f"{k:>8}" for k in METRIC_KEYS)]
    for name, m in evaluation["groups"].items():
        lines.append(f"{name:<10}" + "".join(
            f"{'-' if m[k] is None else format(m[k], '.3f'):>8}" for k in METRIC_KEYS))
    lines.append("")
    lines.append("per-class AP: " + ", ".join(
        f"{(names or {}).get(int(c), c)}={'-' if ap is None else format(ap, '.3f')}"
        for c, ap in evaluation["per_class_ap"].items()))
    return "\n".join(lines)
