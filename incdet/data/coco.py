"""COCO-format datasets: an image folder plus an annotation JSON, read into :class:`ImageRecord`s.

Malformed files and unknown category ids are :class:`UserError`s naming the file; zero or negative
size boxes are dropped and boxes partly outside the image are clipped, with counts in a warning.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from incdet.base.errors import UserError
from incdet.data.records import CleanReport, ImageRecord, clean_boxes

log = logging.getLogger(__name__)


def _require(obj: dict, key: str, where: str, path: Path):
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f"{path}: {where} has no '{key}' field; is this a COCO annotation file?")
    return obj[key]


_NUMBER = (int, float)  # the JSON number types (a JSON true is a bool, never one of these)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _size(img: dict, key: str, iid, path: Path) -> int:
    v = img[key]
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            v = None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 1:
        raise UserError(f"{path}: image {iid!r} has {key} {img[key]!r}; expected a positive "
                        "number of pixels")
    return int(v)


def load_coco(annotation_file: str | os.PathLike, image_dir: str | os.PathLike,
              check_files: bool = True) -> tuple[list[dict], list[ImageRecord], CleanReport]:
    """Read a COCO annotation file. Returns ``(categories, records, cleaning report)``.

    ``categories`` is ``[{"id", "name"}]`` sorted by id; records are in the file's image order.
    """
    path = Path(annotation_file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read annotation file ({e.strerror}); check data.root "
                        "and the annotations path in the config") from None
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix or regenerate the file") from None
    del text  # the text of a COCO-size file is 0.2-0.5 GB: not kept while records are built
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with images, annotations, categories")
    cats_raw = _require(data, "categories", "the file", path)
    images_raw = _require(data, "images", "the file", path)
    anns_raw = data.get("annotations", [])
    if not all(isinstance(v, list) for v in (cats_raw, images_raw, anns_raw)):
        raise UserError(f"{path}: 'categories', 'images' and 'annotations' must be lists")
    categories = []
    for c in cats_raw:
        cid, name = _require(c, "id", "a category", path), _require(c, "name", "a category", path)
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise UserError(f"{path}: category id {cid!r} is not an integer")
        categories.append({"id": cid, "name": str(name)})
    cat_ids = {c["id"] for c in categories}
    if len(cat_ids) != len(categories):
        raise UserError(f"{path}: two categories share an id")
    categories.sort(key=lambda c: c["id"])

    image_dir = Path(image_dir)
    by_id: dict[int, dict] = {}  # image id -> {"img", "w", "h", "pos": its place in the file}
    for img in images_raw:
        iid = _require(img, "id", "an image", path)
        for key in ("file_name", "width", "height"):
            _require(img, key, f"image {iid!r}", path)
        if not _is_int(iid) or iid in by_id:
            raise UserError(f"{path}: image id {iid!r} is not an integer or is repeated; image "
                            "ids must be unique integers")
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            raise UserError(f"{path}: image {iid!r} has file_name {img['file_name']!r}; expected "
                            "a path relative to the image folder")
        w, h = _size(img, "width", iid, path), _size(img, "height", iid, path)
        by_id[iid] = {"img": img, "w": w, "h": h, "pos": len(by_id)}
    isfinite = math.isfinite
    # One pass over the annotations into flat columns (COCO train2017 has 860,000 of them: this
    # loop and the JSON parser are the load time; the cleaning below is vectorised over them).
    pos_of = {iid: e["pos"] for iid, e in by_id.items()}
    image_pos, cats, crowd, coords, areas = [], [], [], [], []
    for ann in anns_raw:
        try:
            iid, cid, bbox = ann["image_id"], ann["category_id"], ann["bbox"]
        except (KeyError, TypeError, IndexError):
            for key in ("image_id", "category_id", "bbox"):
                _require(ann, key, "an annotation", path)
            raise
        pos = pos_of.get(iid) if type(iid) is int else None  # JSON: int is never a bool here
        if pos is None:
            raise UserError(f"{path}: annotation {ann.get('id')!r} refers to unknown image id "
                            f"{iid!r}")
        if type(cid) is not int or cid not in cat_ids:
            raise UserError(f"{path}: annotation {ann.get('id')!r} has unknown category id "
                            f"{cid!r}; add it to 'categories' or fix the annotation")
        if type(bbox) is list and len(bbox) == 4:
            x, y, w, h = bbox
            finite = (type(x) in _NUMBER and type(y) in _NUMBER and type(w) in _NUMBER
                      and type(h) in _NUMBER and isfinite(x) and isfinite(y) and isfinite(w)
                      and isfinite(h))
        else:
            finite = False
        if not finite:
            raise UserError(f"{path}: annotation {ann.get('id')!r} has bbox {bbox!r}; expected "
                            "[x, y, width, height] numbers")
        image_pos.append(pos)
        cats.append(cid)
        crowd.append(bool(ann.get("iscrowd", 0)))
        coords.append(bbox)
        area = ann.get("area")
        areas.append(float(area) if type(area) in _NUMBER and isfinite(area) and area >= 0
                     else float(w) * float(h))

    # group the boxes by image (file order within an image) and clean them all at once
    image_pos = np.asarray(image_pos, np.int64)
    order = np.argsort(image_pos, kind="stable")
    xywh = np.asarray(coords, np.float64).reshape(-1, 4)[order]
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1).astype(np.float32)
    entries = list(by_id.values())
    sizes = np.array([[e["w"], e["h"]] for e in entries], np.int64).reshape(-1, 2)
    box_size = sizes[image_pos[order]]
    boxes, keep, report = clean_boxes(xyxy, box_size[:, 0], box_size[:, 1])
    cats_kept = np.asarray(cats, np.int64)[order][keep]
    crowd_kept = np.asarray(crowd, bool)[order][keep]
    areas_kept = np.asarray(areas, np.float32)[order][keep]
    ends = np.cumsum(np.bincount(image_pos[order][keep], minlength=len(entries))).tolist()

    records, missing, start = [], [], 0
    for e, end in zip(entries, ends):
        file_path = image_dir / str(e["img"]["file_name"])
        if check_files and not file_path.is_file():
            missing.append(str(file_path))
        else:
            records.append(ImageRecord(
                id=e["img"]["id"], path=str(file_path), width=e["w"], height=e["h"],
                boxes=boxes[start:end], category_ids=cats_kept[start:end],
                iscrowd=crowd_kept[start:end], areas=areas_kept[start:end]))
        start = end
    if missing:
        raise UserError(f"{path}: {len(missing)} image files are missing, first {missing[0]}; "
                        "check data.root and the images path in the config")
    msg = report.message(str(path))
    if msg:
        log.warning(msg)
    return categories, records, report
