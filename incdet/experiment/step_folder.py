"""The step folder's one writer and its one reader of completeness.

Every step folder, trained (:mod:`incdet.experiment.step`), merged
(:mod:`incdet.experiment.merge`) or imported (:mod:`incdet.experiment.importer`), is written by
:func:`write_step`: ``memory.json`` (when there is one), ``checkpoint.pt``, the resolved
``config.yaml`` and, last, ``metrics.json``, each atomically, so a folder is complete exactly when
it has ``metrics.json`` and its files always belong together. ``metrics.json`` has one schema for
all three (docs/design.md, "The files of a step"), including ``config_digest`` (of the resolved
config, without the settings that cannot change a result), ``data_files`` (the sha256 of each
annotation file read) and the library versions.

:func:`completed` is how every writer asks whether a step is already done: the same config and
data give the stored metrics at once; another config or changed data is a :class:`UserError`
naming what differs and the two ways out, never a stale result.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torchvision
import yaml

from incdet.base.config import differing_keys, dump_config, strip_private
from incdet.base.errors import UserError
from incdet.base.io import atomic_write_json, sha256_file
from incdet.base.version import __version__
from incdet.data.sources import annotation_files, data_record
from incdet.model.checkpoint import save_checkpoint
from incdet.train.engine import device_record

# settings that cannot change what a step learns or measures: left out of the digest, so that a
# rerun with more threads or another logging interval returns the completed step
NOT_IN_DIGEST = ("train.log_every", "train.checkpoint_every", "train.threads", "eval.batch_size",
                 "eval.every_iters", "data.synthetic")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _digest_view(cfg: dict) -> dict[str, Any]:
    flat = _flat(strip_private(cfg))
    return {k: v for k, v in flat.items()
            if not any(k == n or k.startswith(n + ".") for n in NOT_IN_DIGEST)}


def config_digest(cfg: dict) -> str:
    """sha256 of the resolved config, without :data:`NOT_IN_DIGEST`."""
    text = json.dumps(_digest_view(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def data_files(cfg: dict) -> dict[str, str]:
    """sha256 of each annotation file the config reads (COCO json; VOC: the image-set list)."""
    return {str(path): sha256_file(path) for path in annotation_files(cfg["data"])
            if path.is_file()}


def check_same_config(where: Path, saved: dict | None, cfg: dict, state: str) -> None:
    """A :class:`UserError` naming the keys that differ when the config a step ``state`` with
    (``saved``; None: unknown) is not ``cfg``, up to :data:`NOT_IN_DIGEST`."""
    before, now = _digest_view(saved or {}), _digest_view(cfg)
    if saved is not None and before == now:
        return
    keys = differing_keys(before, now)
    shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys[:4]) \
        if saved is not None else "its config.yaml is gone"
    more = f" and {len(keys) - 4} more" if saved is not None and len(keys) > 4 else ""
    raise UserError(f"{where}: this step {state} with another config ({shown}{more}); use "
                    "another --work-dir, or --force to train it again")


def completed(step_dir: Path, cfg: dict, force: bool = False) -> dict | None:
    """The metrics of the completed step in ``step_dir`` when it was made with ``cfg`` (and the
    same annotation files); None when the folder is not complete. ``force``: the completed
    result is removed (the folder is incomplete until the new run writes its metrics), None.
    A completed step of another config or data is a :class:`UserError` naming the keys."""
    metrics_path = step_dir / "metrics.json"
    if not metrics_path.is_file():
        return None
    if force:
        metrics_path.unlink()
        return None
    metrics = json.loads(metrics_path.read_text())
    stored = metrics.get("config_digest")
    if stored is not None and stored != config_digest(cfg):
        cfg_path = step_dir / "config.yaml"
        check_same_config(step_dir, yaml.safe_load(cfg_path.read_text())
                          if cfg_path.is_file() else None, cfg, "is complete")
    changed = [p for p, h in (metrics.get("data_files") or {}).items()
               if data_files(cfg).get(p, h) != h]
    if changed:
        raise UserError(f"{step_dir}: this step is complete, but {changed[0]} changed since it "
                        "was made; use another --work-dir, or --force to train it again")
    return metrics


def write_step(step_dir: Path, cfg: dict, ckpt: dict, metrics: dict, device, train: dict,
               memory: dict | None = None) -> dict:
    """Write the step folder ``step_dir`` (module docstring); returns the metrics as written.

    ``ckpt``: the model's part of the checkpoint (``model``, ``class_order``, ``steps``,
    ``names``, the head record, ``history``); ``step``, ``method``, the config and an empty
    ``train_state`` are added. ``metrics``: ``step``, ``method``, ``classes``, ``map``,
    ``groups``, ``per_class_ap``, ``forgetting`` and any section of the method's own
    (``memory``, ``merge``, ``imported``, ``curve``, ``joint_budget``); ``train``: seconds,
    iterations, images_per_second, images and skipped_steps; the device, precision, digests and
    versions are added here. ``memory``: the JSON of the memory the step selected."""
    step_dir.mkdir(parents=True, exist_ok=True)
    tcfg = cfg["train"]
    out = {"step": metrics["step"], "method": metrics["method"],
           # which images a step trains on: each at every step of its classes, or at one only
           "protocol": "disjoint" if cfg["data"].get("disjoint_steps") else "standard"}
    out.update({k: v for k, v in metrics.items() if k not in out})
    out["train"] = {"seconds": round(float(train.get("seconds", 0.0)), 2),
                    "iterations": int(train.get("iterations", 0)),
                    "skipped_steps": int(train.get("skipped_steps", 0)),
                    "images_per_second": round(float(train.get("images_per_second", 0.0)), 2),
                    "images": int(train.get("images", 0)),
                    **device_record(device, tcfg),
                    "keep_freed_memory": bool(train.get("keep_freed_memory", False)),
                    "deterministic": bool(tcfg.get("deterministic"))}
    out["config_digest"] = config_digest(cfg)
    out["data_files"] = data_files(cfg)
    out.update(data_record(cfg["data"], cfg.get("categories")))  # ids changed, val files
    out["versions"] = {"incdet": __version__, "torch": torch.__version__,
                       "torchvision": torchvision.__version__}
    if memory is not None:
        atomic_write_json(step_dir / "memory.json", memory)
    save_checkpoint(step_dir / "checkpoint.pt",
                    dict(ckpt, step=metrics["step"], method=metrics["method"],
                         config=strip_private(cfg), train_state=None))
    dump_config(cfg, step_dir / "config.yaml")
    atomic_write_json(step_dir / "metrics.json", out)  # last: the step is complete
    return out
