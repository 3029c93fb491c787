"""COCO-style evaluation (pycocotools) restricted to the classes seen so far, summarised per
class group (``old`` / ``new`` / ``all`` and one entry per step), with per-class AP.

Group figures are computed from one ``COCOeval`` run over all seen classes, by averaging its
precision array over the group's classes exactly as ``COCOeval.summarize`` does (so a group's AP
equals a pycocotools run with ``params.catIds`` set to the group; the tests check this).
A class without ground truth has precision -1 and is left out; a group with no such class has
null figures.

Validation images of several annotation files (``ImageRecord.annotated_by``) are evaluated for
the classes of their own file only: one ``COCOeval`` run per set of images that a set of classes
shares, their precision arrays put side by side, then the same summary (with one file, one run,
as before). ``evaluated_on`` then says which files each class was evaluated on.
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


def _precision(coco_gt, results: list[dict], class_ids: list[int],
               class_images: dict[int, list[int]] | None) -> np.ndarray:
    """COCOeval's accumulated precision (T, R, K, A, M), K in ``class_ids`` order; with
    ``class_images`` each class is evaluated on its own images (module docstring)."""
    runs: dict[tuple, list[int]] = {}  # images -> the classes evaluated on exactly them
    for c in class_ids:
        runs.setdefault(tuple(class_images[c]) if class_images else (), []).append(c)
    out = None
    for images, cats in runs.items():
        wanted, shown = set(cats), set(images)
        own = [r for r in results if r["category_id"] in wanted and
               (not images or r["image_id"] in shown)]
        if not own:  # nothing detected: precision 0 where there is ground truth
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(coco_gt, coco_gt.loadRes(own), "bbox")
            ev.params.catIds = sorted(cats)
            if images:
                ev.params.imgIds = list(images)
            ev.evaluate()
            ev.accumulate()
        p = ev.eval["precision"]
        if out is None:
            out = np.full(p.shape[:2] + (len(class_ids),) + p.shape[3:], -2.0)
        for i, c in enumerate(ev.params.catIds):
            out[:, :, class_ids.index(c)] = p[:, :, i]
    return out


def coco_evaluate(gt: dict, results: list[dict], class_ids: Sequence[int],
                  groups: dict[str, Sequence[int]],
                  class_images: dict[int, list[int]] | None = None) -> dict:
    """Evaluate ``results`` against the COCO dict ``gt`` on ``class_ids``; ``class_images``:
    each class's validation images (None: every image).

    Returns ``{"groups": {name: metrics}, "per_class_ap": {str(id): AP or None}}``.
    """
    class_ids = sorted(int(c) for c in class_ids)
    coco_gt = coco_api(gt)
    has_gt = {c: len(coco_gt.getAnnIds(catIds=[c], iscrowd=False,
                                       imgIds=class_images[c] if class_images else [])) > 0
              for c in class_ids}
    results = [r for r in results if r["category_id"] in set(class_ids)]
    precision = _precision(coco_gt, results, class_ids, class_images) if results else None
    if precision is None:
        # pycocotools cannot load an empty result list: nothing detected means AP 0 wherever
        # there is ground truth
        per_class = {str(c): (0.0 if has_gt[c] else None) for c in class_ids}
        out_groups = {}
        for name, ids in groups.items():
            any_gt = any(has_gt.get(int(c), False) for c in ids)
            out_groups[name] = {k: (0.0 if any_gt else None) for k in METRIC_KEYS}
        return {"groups": out_groups, "per_class_ap": per_class}
    # a class without any detection: precision 0 where it has ground truth (-1 where none)
    for i, c in enumerate(class_ids):
        if (precision[:, :, i] == -2).all():
            precision[:, :, i] = 0.0 if has_gt[c] else -1.0
    index = {c: i for i, c in enumerate(class_ids)}
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
    marks = {r.annotated_by for r in records if r.annotated_by is not None}  # one per file
    if not marks:
        return coco_evaluate(gt, results, order, groups)
    class_images = {int(c): [r.id for r in records if r.annotated_by is None or
                             int(c) in r.annotated_by.classes] for c in order}
    out = coco_evaluate(gt, results, order, groups, class_images)
    out["evaluated_on"] = {str(c): sorted(m.file for m in marks if int(c) in m.classes)
                           for c in order}
    return out


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
