"""Loads the train / val subsets named by the ``data`` config section, in any supported format,
generating the built-in dataset first when it is configured and missing."""
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
    """Generate the built-in dataset at ``data.root`` if it is configured and missing."""
    syn = dcfg.get("synthetic") or {}
    if dcfg["format"] != "coco" or not syn.get("generate"):
        return
    root = Path(dcfg["root"])
    if synthetic.is_complete(root):
        return
    if root.exists() and any(root.iterdir()) and not (root / "images").exists():
        raise UserError(f"data.root {root} exists and is not a built-in dataset; point data.root "
                        "elsewhere or set data.synthetic.generate to false")
    log.info("generating the built-in dataset at %s", root)
    synthetic.generate(root, num_train=syn["num_train"], num_val=syn["num_val"],
                       image_size=syn["image_size"], seed=syn["seed"], progress=progress)


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
