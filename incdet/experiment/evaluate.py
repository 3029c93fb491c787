"""Evaluating a step: the class groups its metrics report (old, new, all, each step's) and a
saved checkpoint evaluated on a config's validation set."""
from __future__ import annotations

from pathlib import Path

import torch

from incdet.base.config import apply_overrides, with_defaults
from incdet.base.devices import resolve_device
from incdet.data.classes import ClassSpace
from incdet.evaluation.coco_eval import evaluate_model
from incdet.experiment.loaders import load_experiment
from incdet.model.checkpoint import check_compatible, load_checkpoint, model_from_checkpoint


def metric_groups(classes: ClassSpace, t: int) -> dict[str, tuple[int, ...]]:
    sc = classes.step(t)
    groups = {"old": sc.old, "new": sc.new, "all": sc.seen}
    groups.update({f"step_{s}": g for s, g in enumerate(sc.groups)})
    return groups


def evaluate_checkpoint(ckpt_path: str | Path, cfg: dict | None = None,
                        progress: bool = True, overrides: list[str] | None = None,
                        device: str | torch.device | None = "auto") -> tuple[dict, ClassSpace]:
    """Evaluate a step's checkpoint on the validation set of ``cfg`` (default: the config saved
    in the checkpoint, with ``overrides``, ``key=value`` items as ``--set`` takes them, applied
    to it). Returns the evaluation (groups and per-class AP) and the class space.

    ``device``: where to evaluate (``auto``: CUDA when available, else CPU), never the
    ``train.device`` the checkpoint was trained with: a model trained on a GPU evaluates on a
    machine without one."""
    ckpt = load_checkpoint(ckpt_path)
    if cfg is None:
        cfg = with_defaults(ckpt["config"])
        apply_overrides(cfg, overrides)
    elif overrides:
        raise ValueError("overrides apply to the checkpoint's config: pass them in cfg instead")
    _, val_set, classes = load_experiment(cfg, progress)
    t = int(ckpt["step"])
    check_compatible(ckpt, ckpt_path, list(classes.order), [list(s) for s in classes.steps], t)
    device = resolve_device(device, "device")
    model = model_from_checkpoint(ckpt, cfg, ckpt_path).to(device)
    sc = classes.step(t)
    evaluation = evaluate_model(model, val_set.records, val_set.categories,
                                classes.order[:len(sc.seen)], metric_groups(classes, t),
                                int(cfg["eval"]["batch_size"]), device, progress=progress)
    return evaluation, classes
