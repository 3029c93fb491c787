"""Training augmentation with albumentations, as in End-to-End Incremental Learning: horizontal
flip, scale jitter, a random crop that keeps every box, brightness and contrast.

Boxes are ``pascal_voc`` (``xyxy`` pixels) with labels as ``np.int64`` arrays (albumentations 2.x
returns a list of labels as floats). Boxes that leave the image are clipped, those with less than
30 % left visible are dropped, and :func:`~incdet.data.records.clean_boxes` runs again afterwards
so that no box under one pixel wide or high reaches the model.
"""
from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402
import cv2  # noqa: E402

from incdet.data.records import clean_boxes  # noqa: E402


def build_train_transform(aug: dict) -> A.Compose | None:
    """The augmentation pipeline from the ``augment`` config section (None when all are off)."""
    ops = []
    if aug.get("scale") and aug.get("scale_p", 0) > 0:
        lo, hi = aug["scale"]
        ops.append(A.Affine(scale=(float(lo), float(hi)), keep_ratio=True, p=aug["scale_p"],
                            border_mode=cv2.BORDER_CONSTANT, fill=114))
    if aug.get("crop_p", 0) > 0:
        ops.append(A.BBoxSafeRandomCrop(erosion_rate=0.0, p=aug["crop_p"]))
    if aug.get("hflip", 0) > 0:
        ops.append(A.HorizontalFlip(p=aug["hflip"]))
    if aug.get("brightness_contrast_p", 0) > 0:
        ops.append(A.RandomBrightnessContrast(brightness_limit=aug.get("brightness", 0.2),
                                              contrast_limit=aug.get("contrast", 0.2),
                                              p=aug["brightness_contrast_p"]))
    if not ops:
        return None
    return A.Compose(ops, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"],
                                                   clip=True, filter_invalid_bboxes=True,
                                                   min_visibility=0.3, min_width=1,
                                                   min_height=1))


def apply_transform(transform: A.Compose | None, image: np.ndarray, boxes: np.ndarray,
                    labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``transform`` on an HWC uint8 image with (N, 4) xyxy boxes; returns valid boxes only."""
    if transform is not None:
        out = transform(image=image, bboxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                        labels=np.asarray(labels, np.int64))
        image = out["image"]
        boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
        labels = np.asarray(out["labels"], np.int64).reshape(-1)
    h, w = image.shape[:2]
    boxes, keep, _ = clean_boxes(boxes, w, h)
    return image, boxes, labels[keep]
