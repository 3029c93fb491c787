"""Loads the train / val subsets named by the ``data`` config section, in any supported format,
generating the built-in dataset first when it is configured and its folder is missing or empty.

A user's data is read-only: a folder that holds anything but the built-in dataset is never
written to, whatever ``data.synthetic.generate`` says (design.md, "A user's data is read-only").

**Category ids** (``data.category_ids``, design.md "Your classes' ids"): a COCO file of new
classes is usually numbered from 1, where an imported COCO detector already uses 1..90. With
``auto`` (the default) each category of the experiment's files (train file, then validation
files) takes the id of the known class of the same name (the imported detector's
``categories``, or a file read before), else its own id when no other class has it, else the
next id above every id in use or in a file. A mapping ``{name: id}`` pins classes first;
``file`` keeps the files' ids (a collision is then an error). Matching by name, not by offset,
is what makes one class keep one id across the old classes' validation file, the new data and
the detector. The changes are logged, applied to every record read, and written to each step's
``metrics.json`` (:func:`data_record`).

**Several validation files** (``data.val`` a list of ``{images, annotations}``): typically the old
classes' own file and the new data's. Each image is evaluated for the classes its file lists
(:class:`~incdet.data.records.AnnotatedBy`); image ids colliding between files are shifted.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from incdet.base.errors import UserError, check_choice
from incdet.data import synthetic
from incdet.data.coco import load_coco
from incdet.data.records import AnnotatedBy, ImageRecord
from incdet.data.voc import load_voc

log = logging.getLogger(__name__)


@dataclass
class Subset:
    categories: list[dict]
    records: list[ImageRecord]
    source: str  # the annotation file (several validation files: joined with " + ")
    # the annotation files read and the category ids each lists (after data.category_ids)
    files: dict[str, list[int]] | None = None


def subset_parts(dcfg: dict, subset: str) -> list[dict]:
    """The ``{images, annotations}`` entries of ``data.<subset>``: one, or (validation, COCO)
    a list of them."""
    part = dcfg[subset]
    parts = part if isinstance(part, list) else [part]
    if isinstance(part, list) and (subset != "val" or dcfg["format"] != "coco" or not part):
        raise UserError(f"data.{subset}: a list of annotation files is supported for COCO "
                        "validation data only (data.val: [{images, annotations}, ...])")
    for i, p in enumerate(parts):
        where = f"data.{subset}" + (f"[{i}]" if isinstance(part, list) else "")
        if not isinstance(p, dict) or not {"images", "annotations"} <= set(p) or \
                not all(isinstance(p[k], str) for k in ("images", "annotations")):
            raise UserError(f"{where}: expected {{images: FOLDER, annotations: FILE}} (paths "
                            f"relative to data.root), got {p!r}")
    return parts


def annotation_files(dcfg: dict) -> list[Path]:
    """Every annotation file the data config reads: train first, then validation."""
    root = Path(dcfg["root"])
    return [root / p["annotations"] for subset in ("train", "val")
            for p in subset_parts(dcfg, subset)]


_CATEGORIES: dict[tuple, list[dict]] = {}  # (path, size, mtime): the file's categories


def _file_key(path: Path) -> tuple:
    st = os.stat(path)
    return str(path), st.st_size, st.st_mtime_ns


def file_categories(path: Path) -> list[dict]:
    """A COCO file's ``[{id, name}]`` (remembered from :func:`load_subset`, else read)."""
    key = _file_key(path)
    if key not in _CATEGORIES:
        try:
            cats = json.loads(path.read_text(encoding="utf-8"))["categories"]
            _CATEGORIES[key] = [{"id": int(c["id"]), "name": str(c["name"])} for c in cats]
        except (OSError, ValueError, KeyError, TypeError):
            return load_coco(path, path.parent, check_files=False)[0]  # its error names the file
    return _CATEGORIES[key]


def assign_category_ids(files: list[tuple[str, list[dict]]], known: list[dict] | None,
                        mode) -> dict[str, dict[int, int]]:
    """``{file: {file id: experiment id}}`` for the ids that change (module docstring).
    ``files``: ``(name, categories)`` in reading order; ``known``: the config's ``categories``;
    ``mode``: ``auto`` | ``file`` | ``{name: id}``."""
    if mode == "file":
        return {}
    if not (mode == "auto" or isinstance(mode, dict)):
        raise UserError(f"data.category_ids: {mode!r}; expected auto, file or a mapping "
                        "{class name: id}")
    id_of: dict[str, int] = {}
    name_of: dict[int, str] = {}

    def take(name: str, cid: int, where: str) -> None:
        if name_of.get(cid, name) != name:
            raise UserError(f"{where}: id {cid} is {name_of[cid]!r} already, not {name!r}; give "
                            f"{name!r} another id in data.category_ids")
        id_of[name], name_of[cid] = cid, name

    for c in known or []:
        take(str(c["name"]), int(c["id"]), "categories (the imported detector's classes)")
    for name, cid in (mode.items() if isinstance(mode, dict) else ()):
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 1:
            raise UserError(f"data.category_ids: {name!r}: {cid!r} is not a positive integer id")
        if name in id_of and id_of[name] != cid:
            raise UserError(f"data.category_ids: {name!r} -> {cid}, but {name!r} is id "
                            f"{id_of[name]} among the imported detector's classes")
        take(str(name), cid, "data.category_ids")
    # first every class that keeps its file's id (a known name, or an id no other class has),
    # then the others, in reading order, above every id in use or in a file: no shifted class
    # lands on the id of another file's class
    for source, cats in files:
        for c in cats:
            if c["name"] not in id_of and c["id"] not in name_of:
                take(c["name"], c["id"], source)
    top = max(list(name_of) + [c["id"] for _, cats in files for c in cats], default=0)
    changes: dict[str, dict[int, int]] = {}
    for source, cats in files:
        for c in cats:
            if c["name"] not in id_of:
                top += 1
                take(c["name"], top, source)
            if id_of[c["name"]] != c["id"]:
                changes.setdefault(source, {})[c["id"]] = id_of[c["name"]]
    return changes


def category_changes(dcfg: dict, known: list[dict] | None) -> dict[str, dict[int, int]]:
    """:func:`assign_category_ids` over the config's annotation files (COCO; VOC names its
    classes itself: no change)."""
    if dcfg["format"] != "coco":
        return {}
    files = [(str(p), file_categories(p)) for p in annotation_files(dcfg) if p.is_file()]
    return assign_category_ids(files, known, dcfg.get("category_ids", "auto"))


def data_record(dcfg: dict, known: list[dict] | None) -> dict:
    """What a step folder records about its data's classes: the id changes per file and, with
    several validation files, the files each class is evaluated on."""
    out: dict = {}
    changes = category_changes(dcfg, known)
    if changes:
        out["category_ids"] = {f: {str(a): b for a, b in sorted(c.items())}
                               for f, c in changes.items()}
    parts = subset_parts(dcfg, "val")
    if len(parts) > 1:
        evaluated_on: dict[str, list[str]] = {}
        for p in parts:
            path = str(Path(dcfg["root"]) / p["annotations"])
            for c in (file_categories(Path(path)) if Path(path).is_file() else []):
                cid = changes.get(path, {}).get(c["id"], c["id"])
                evaluated_on.setdefault(str(cid), []).append(path)
        out["val_files"] = dict(sorted(evaluated_on.items(), key=lambda kv: int(kv[0])))
    return out


def _remap(categories: list[dict], records: list[ImageRecord], change: dict[int, int]):
    if not change:
        return categories, records
    cats = sorted(({"id": change.get(c["id"], c["id"]), "name": c["name"]} for c in categories),
                  key=lambda c: c["id"])
    old = np.asarray(sorted(change), np.int64)
    new = np.asarray([change[k] for k in sorted(change)], np.int64)

    def ids(a: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(old, a)
        hit = (pos < len(old)) & (old[np.minimum(pos, len(old) - 1)] == a)
        return np.where(hit, new[np.minimum(pos, len(old) - 1)], a)

    return cats, [replace(r, category_ids=ids(r.category_ids)) for r in records]


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
        for part in subset_parts(dcfg, subset):
            ann = root / part["annotations"]
            if not ann.is_file():
                found = sorted(str(p.relative_to(root)) for p in root.glob("annotations/*.json"))
                hint = f" (found: {', '.join(found)})" if found else ""
                raise UserError(f"{ann}: no such annotation file{hint}; data.root holds other "
                                f"files, so incdet reads it as your dataset and writes nothing "
                                f"there: set data.{subset}.annotations to your file (relative to "
                                "data.root)")


def load_subset(dcfg: dict, subset: str,
                changes: dict[str, dict[int, int]] | None = None) -> Subset:
    """``subset`` is ``train`` or ``val``; ``changes``: :func:`category_changes` (logged here,
    where they are applied)."""
    root = Path(dcfg["root"])
    check_choice("data.format", dcfg["format"], ("coco", "voc"))
    parts = subset_parts(dcfg, subset)
    if dcfg["format"] != "coco":
        part = parts[0]
        cats, records, _ = load_voc(root, part["annotations"], part["images"])
        source = str(root / part["annotations"])
        files = {source: [c["id"] for c in cats]}
    else:
        by_id: dict[int, dict] = {}
        records, files, taken = [], {}, set()
        for part in parts:
            ann = root / part["annotations"]
            cats, recs, _ = load_coco(ann, root / part["images"])
            _CATEGORIES[_file_key(ann)] = cats
            change = (changes or {}).get(str(ann), {})
            if change:
                log.info("%s: category ids %s (data.category_ids)", ann,
                         ", ".join(f"{a} -> {b}" for a, b in sorted(change.items())))
            cats, recs = _remap(cats, recs, change)
            for c in cats:
                if by_id.setdefault(c["id"], c)["name"] != c["name"]:
                    raise UserError(f"{ann}: category id {c['id']} is {c['name']!r} there but "
                                    f"{by_id[c['id']]['name']!r} in another validation file; "
                                    "set data.category_ids: auto to number classes by name")
            if len(parts) > 1:
                mark = AnnotatedBy(str(ann), frozenset(c["id"] for c in cats))
                ids = {r.id for r in recs}
                shift = max(taken) + 1 - min(ids) if ids & taken else 0
                recs = [replace(r, id=r.id + shift, annotated_by=mark) for r in recs]
                taken |= {i + shift for i in ids}
            records += recs
            files[str(ann)] = [c["id"] for c in cats]
        cats = sorted(by_id.values(), key=lambda c: c["id"])
        source = " + ".join(files)
    if subset == "val" and dcfg.get("val_max_images"):
        records = records[: int(dcfg["val_max_images"])]
    return Subset(cats, records, source, files)
