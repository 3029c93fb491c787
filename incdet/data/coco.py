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
    by_id: dict[int, dict] = {}
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
        by_id[iid] = {"img": img, "w": w, "h": h, "boxes": [], "cats": [], "crowd": [],
                      "areas": []}
    for ann in anns_raw:
        iid = _require(ann, "image_id", "an annotation", path)
        cid = _require(ann, "category_id", "an annotation", path)
        bbox = _require(ann, "bbox", "an annotation", path)
        if not _is_int(iid) or iid not in by_id:
            raise UserError(f"{path}: annotation {ann.get('id')!r} refers to unknown image id "
                            f"{iid!r}")
        if not _is_int(cid) or cid not in cat_ids:
            raise UserError(f"{path}: annotation {ann.get('id')!r} has unknown category id "
                            f"{cid!r}; add it to 'categories' or fix the annotation")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           and math.isfinite(v) for v in bbox)):
            raise UserError(f"{path}: annotation {ann.get('id')!r} has bbox {bbox!r}; expected "
                            "[x, y, width, height] numbers")
        x, y, w, h = (float(v) for v in bbox)
        entry = by_id[iid]
        entry["boxes"].append([x, y, x + w, y + h])
        entry["cats"].append(cid)
        entry["crowd"].append(bool(ann.get("iscrowd", 0)))
        area = ann.get("area")
        valid_area = isinstance(area, (int, float)) and not isinstance(area, bool) and \
            math.isfinite(area) and area >= 0
        entry["areas"].append(float(area) if valid_area else w * h)

    records, report = [], CleanReport()
    missing = []
    for iid, e in by_id.items():
        file_path = image_dir / str(e["img"]["file_name"])
        if check_files and not file_path.is_file():
            missing.append(str(file_path))
            continue
        boxes, keep, rep = clean_boxes(np.array(e["boxes"], np.float32), e["w"], e["h"])
        report.add(rep)
        records.append(ImageRecord(
            id=iid, path=str(file_path), width=e["w"], height=e["h"], boxes=boxes,
            category_ids=np.array(e["cats"], np.int64).reshape(-1)[keep],
            iscrowd=np.array(e["crowd"], bool).reshape(-1)[keep],
            areas=np.array(e["areas"], np.float32).reshape(-1)[keep]))
    if missing:
        raise UserError(f"{path}: {len(missing)} image files are missing, first {missing[0]}; "
                        "check data.root and the images path in the config")
    msg = report.message(str(path))
    if msg:
        log.warning(msg)
    return categories, records, report
