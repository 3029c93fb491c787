"""Loads the train / val subsets named by the ``data`` config section, in any supported format,
generating the built-in dataset first when it is configured and its folder is missing or empty.

A user's data is read-only: a folder that holds anything but the built-in dataset is never
written to, whatever ``data.synthetic.generate`` says (design.md, "A user's data is read-only").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from incdet.base.errors import UserError, check_choice
from incdet.data import synthetic
from incdet.data.coco import load_coco
from incdet.data.records import ImageRecord
from incdet.data.voc import load_voc

log = logging.getLogger(__name__)


@dataclass
class Subset:
    categories: list[dict]
    records: list[ImageRecord]
    source: str


def ensure_builtin(dcfg: dict, progress: bool = True) -> None:
    """Generate the built-in dataset at ``data.root`` if it is configured and the folder is
    missing or empty (or an interrupted generation); never write into anything else.

    A folder with other files in it is the user's dataset and read-only: a missing annotation file
    there is a :class:`UserError` naming the file, raised before anything is written (a broken
    one is reported by :func:`load_coco` when it is read).
    """
    syn = dcfg.get("synthetic") or {}
    if dcfg["format"] != "coco":
        return
    root = Path(dcfg["root"])
    state = synthetic.folder_state(root)
    if syn.get("generate") and state in ("missing", "empty", "partial"):
        log.info("generating the built-in dataset at %s", root)
        synthetic.generate(root, num_train=syn["num_train"], num_val=syn["num_val"],
                           image_size=syn["image_size"], seed=syn["seed"], progress=progress)
        return
    if state in ("missing", "empty"):
        raise UserError(f"data.root {root} is {'empty' if state == 'empty' else 'missing'}; "
                        "point data.root at your dataset, or set data.synthetic.generate: true "
                        "to generate the built-in dataset there")
    for subset in ("train", "val"):
        ann = root / dcfg[subset]["annotations"]
        if not ann.is_file():
            found = sorted(str(p.relative_to(root)) for p in root.glob("annotations/*.json"))
            hint = f" (found: {', '.join(found)})" if found else ""
            raise UserError(f"{ann}: no such annotation file{hint}; data.root holds other files, "
                            f"so incdet reads it as your dataset and writes nothing there: set "
                            f"data.{subset}.annotations to your file (relative to data.root)")


def load_subset(dcfg: dict, subset: str) -> Subset:
    """``subset`` is ``train`` or ``val``."""
    root = Path(dcfg["root"])
    part = dcfg[subset]
    check_choice("data.format", dcfg["format"], ("coco", "voc"))
    if dcfg["format"] == "coco":
        ann = root / part["annotations"]
        cats, records, _ = load_coco(ann, root / part["images"])
        source = str(ann)
    else:
        cats, records, _ = load_voc(root, part["annotations"], part["images"])
        source = str(root / part["annotations"])
    if subset == "val" and dcfg.get("val_max_images"):
        records = records[: int(dcfg["val_max_images"])]
    return Subset(cats, records, source)
