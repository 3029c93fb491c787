"""Pascal VOC (VOCdevkit) read into the same :class:`ImageRecord` form as COCO.

The 20 classes get category ids 1..20 in the standard order. ``difficult`` objects are kept out of
training and marked crowd (pycocotools' "ignore") for evaluation: a detection on them neither
counts as a true nor as a false positive. VOC boxes are 1-based inclusive pixel coordinates; they
are converted to 0-based ``xyxy`` (``x0 - 1, y0 - 1, x1, y1``).
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from incdet.base.errors import UserError
from incdet.data.records import CleanReport, ImageRecord, clean_boxes

log = logging.getLogger(__name__)

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
VOC_CATEGORIES = [{"id": i + 1, "name": n} for i, n in enumerate(VOC_CLASSES)]


def parse_voc_xml(xml_path: str | os.PathLike) -> dict:
    """One annotation file ->
    ``{"filename", "width", "height", "objects": [(name, box, difficult)]}``."""
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as e:
        raise UserError(f"{xml_path}: cannot parse VOC annotation ({e}); fix the file") from None
    try:
        size = root.find("size")
        width, height = int(size.find("width").text), int(size.find("height").text)
        objects = []
        for obj in root.findall("object"):
            name = obj.find("name").text.strip()
            bb = obj.find("bndbox")
            box = [float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
            diff = obj.find("difficult")
            objects.append((name, [box[0] - 1, box[1] - 1, box[2], box[3]],
                            diff is not None and diff.text.strip() == "1"))
        filename = root.find("filename").text.strip()
    except (AttributeError, TypeError, ValueError):
        raise UserError(f"{xml_path}: missing or non-numeric size, filename or bndbox field") \
            from None
    return {"filename": filename, "width": width, "height": height, "objects": objects}


def load_voc(root: str | os.PathLike, list_file: str | os.PathLike,
             image_dir: str | os.PathLike | None = None,
             ) -> tuple[list[dict], list[ImageRecord], CleanReport]:
    """Read the images named in ``list_file`` (e.g. ``ImageSets/Main/trainval.txt``), their XML in
    ``root/Annotations`` and their pictures in ``image_dir`` (default ``root/JPEGImages``).

    ``root`` is a ``VOCdevkit/VOC2007``-style folder. Image ids are the line numbers (1-based).
    """
    root = Path(root)
    list_file = root / list_file
    image_dir = root / (image_dir or "JPEGImages")
    try:
        names = [n.strip() for n in list_file.read_text().splitlines() if n.strip()]
    except OSError as e:
        raise UserError(f"{list_file}: cannot read image list ({e.strerror}); data.root must be a "
                        "VOCdevkit/VOC20xx folder") from None
    cat_of = {c["name"]: c["id"] for c in VOC_CATEGORIES}
    records, report = [], CleanReport()
    for i, name in enumerate(names):
        xml_path = root / "Annotations" / f"{name}.xml"
        ann = parse_voc_xml(xml_path)
        boxes, cats, crowd = [], [], []
        for obj_name, box, difficult in ann["objects"]:
            if obj_name not in cat_of:
                raise UserError(f"{xml_path}: unknown VOC class {obj_name!r}")
            boxes.append(box)
            cats.append(cat_of[obj_name])
            crowd.append(difficult)
        image_path = image_dir / ann["filename"]
        if not image_path.is_file():
            raise UserError(f"{xml_path}: image {image_path} is missing; check data.root")
        clean, keep, rep = clean_boxes(np.array(boxes, np.float32), ann["width"], ann["height"])
        report.add(rep)
        records.append(ImageRecord(id=i + 1, path=str(image_path), width=ann["width"],
                                   height=ann["height"], boxes=clean,
                                   category_ids=np.array(cats, np.int64).reshape(-1)[keep],
                                   iscrowd=np.array(crowd, bool).reshape(-1)[keep]))
    msg = report.message(str(root))
    if msg:
        log.warning(msg)
    return list(VOC_CATEGORIES), records, report
