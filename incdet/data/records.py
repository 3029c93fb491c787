"""The internal form every dataset format is read into, box cleaning, and step filtering.

An :class:`ImageRecord` holds one image's path, size and boxes (``xyxy``, pixels) with their
category ids and crowd flags. COCO and VOC readers produce records; training sets, evaluation
ground truth and the exemplar memory are all built from records.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from pycocotools.coco import COCO


@dataclass(frozen=True)
class AnnotatedBy:
    """The annotation file an image comes from and the classes that file annotates: a
    validation image of one of several files is evaluated for those classes only (an old-class
    file says nothing about new-class objects in its images, and the other way round)."""

    file: str
    classes: frozenset


@dataclass
class ImageRecord:
    """One annotated image. ``boxes`` (N, 4) float32 xyxy; ``category_ids`` (N,);
    ``iscrowd`` (N,); ``annotated_by``: None when the image is annotated for every class of the
    experiment (one annotation file), else its file and that file's classes."""

    id: int
    path: str
    width: int
    height: int
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    category_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    iscrowd: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))
    areas: np.ndarray | None = None  # COCO "area" (segment area) when given, else box area
    annotated_by: AnnotatedBy | None = None


@dataclass
class CleanReport:
    """What box cleaning changed; reported to the user, never silently."""

    dropped: int = 0  # zero or negative size, or nothing left inside the image
    clipped: int = 0  # partly outside the image

    def add(self, other: "CleanReport") -> None:
        self.dropped += other.dropped
        self.clipped += other.clipped

    def message(self, source: str) -> str | None:
        if not (self.dropped or self.clipped):
            return None
        return (f"{source}: dropped {self.dropped} boxes with zero or negative size, "
                f"clipped {self.clipped} boxes to the image")


def clean_boxes(boxes: np.ndarray, width, height,
                min_size: float = 1.0) -> tuple[np.ndarray, np.ndarray, CleanReport]:
    """Clip ``xyxy`` boxes to the image and drop those narrower or lower than ``min_size`` px.

    ``width`` and ``height`` are the image's, or (N,) arrays of each box's image (boxes of many
    images cleaned at once). Returns ``(clipped boxes, keep mask over the input, report)``.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if np.ndim(width):  # per box: (N, 1) against the (N, 2) x or y coordinates
        width, height = np.reshape(width, (-1, 1)), np.reshape(height, (-1, 1))
    report = CleanReport()
    finite = np.isfinite(boxes).all(1)
    valid = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    clipped = boxes.copy()
    clipped[:, [0, 2]] = np.clip(np.nan_to_num(clipped[:, [0, 2]]), 0, width)
    clipped[:, [1, 3]] = np.clip(np.nan_to_num(clipped[:, [1, 3]]), 0, height)
    changed = valid & (np.abs(clipped - np.nan_to_num(boxes)) > 1e-6).any(1)
    keep = valid & (clipped[:, 2] - clipped[:, 0] >= min_size) & \
        (clipped[:, 3] - clipped[:, 1] >= min_size)
    report.dropped = int((~keep).sum())
    report.clipped = int((changed & keep).sum())
    return clipped[keep], keep, report


def filter_for_classes(records: Iterable[ImageRecord], class_ids: Sequence[int],
                       drop_crowd: bool = True) -> list[ImageRecord]:
    """The training set of a step: images with at least one box of ``class_ids``, keeping only
    those boxes (objects of other classes in those images go unlabelled, the standard protocol).
    Crowd boxes are left out of training."""
    records = list(records)
    if not records:
        return []
    wanted = np.asarray(sorted(class_ids), np.int64)
    # one membership test over every box of every record (COCO: 860,000 boxes), then a cut per
    # record; records with nothing to keep are skipped without touching their arrays
    counts = [len(rec.category_ids) for rec in records]
    keep = np.isin(np.concatenate([rec.category_ids.reshape(-1) for rec in records]), wanted)
    if drop_crowd:
        keep &= ~np.concatenate([rec.iscrowd.reshape(-1) for rec in records])
    ends = np.cumsum(counts).tolist()
    kept = np.bincount(np.repeat(np.arange(len(records)), counts)[keep],
                       minlength=len(records)).tolist()
    out, start = [], 0
    for rec, end, k in zip(records, ends, kept):
        if k:
            mask = keep[start:end]
            out.append(ImageRecord(id=rec.id, path=rec.path, width=rec.width, height=rec.height,
                                   boxes=rec.boxes[mask], category_ids=rec.category_ids[mask],
                                   iscrowd=rec.iscrowd[mask],
                                   areas=None if rec.areas is None else rec.areas[mask]))
        start = end
    return out


def to_coco_dict(records: Sequence[ImageRecord], categories: Sequence[dict]) -> dict:
    """Records as a COCO ground-truth dict (boxes xywh) for pycocotools."""
    images, anns = [], []
    for rec in records:
        images.append({"id": rec.id, "width": rec.width, "height": rec.height,
                       "file_name": rec.path})
        for j, (box, cid, crowd) in enumerate(zip(rec.boxes, rec.category_ids, rec.iscrowd)):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            area = float(rec.areas[j]) if rec.areas is not None else w * h
            anns.append({"id": len(anns) + 1, "image_id": rec.id, "category_id": int(cid),
                         "bbox": [float(box[0]), float(box[1]), w, h], "area": area,
                         "iscrowd": int(crowd)})
    return {"images": images, "annotations": anns,
            "categories": [{"id": int(c["id"]), "name": c["name"]} for c in categories]}


def coco_api(dataset: dict):
    """A ``pycocotools.coco.COCO`` built from a dict, without its chatter on stdout."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
