"""Checkpoints: tensors and plain data only, loaded with ``torch.load(weights_only=True)``.

A checkpoint records everything needed to rebuild and check the model of a step::

    {"format": "incdet", "version": 1, "step": t, "class_order": [ids], "steps": [[ids], ...],
     "names": {"id": name}, "head_layout": [K_0, ..., K_t], "head_towers": [0, ..., b_t],
     "head_fpns": [0, ..., f_b], "fpn_bodies": [0, ..., d_f], "config": {...}, "model": state_dict,
     "history": [metrics summary of steps <= t], "train_state": {...} or None}

``head_towers`` is the classification tower of each step (absent in checkpoints written before
``branch`` existed: all steps on tower 0); ``head_fpns`` the FPN each tower reads (absent
before ``branch_from: fpn``: all read FPN 0); ``fpn_bodies`` the backbone body each FPN reads
(absent before ``branch_from: backbone``: all read body 0). ``train_state`` (optimizer,
scheduler, iteration, RNG states) is present only in the rolling ``last.pt`` of an unfinished
step, for ``--resume``.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import yaml

from incdet.base.config import differing_keys, with_defaults
from incdet.base.errors import UserError
from incdet.base.io import atomic_torch_save
from incdet.model.builder import build_model, caps_per_step

FORMAT = "incdet"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    atomic_torch_save(path, dict(payload, format=FORMAT, version=VERSION))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a data-only checkpoint; anything else is refused with a clear message."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found; train that step first or fix the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load: the file is not a data-only checkpoint "
                        f"({str(e).splitlines()[0]}); only load checkpoints you trust, written by "
                        "incdet") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path}: cannot read checkpoint ({str(e).splitlines()[0]}); the file is "
                        "damaged or not a checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path}: not an incdet checkpoint")
    return ckpt


def load_model_state(model, ckpt: dict, model_cfg: dict, source: str | os.PathLike) -> None:
    """Load a checkpoint's weights into ``model``, built from ``model_cfg``.

    Weights that do not fit (another backbone, FPN width, tail, ...) are a clear error naming the
    ``model.*`` keys in which this config differs from the checkpoint's, and the fix."""
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        saved = with_defaults(ckpt.get("config") or {}).get("model", {})
        diff = [f"model.{k}: {_yaml(model_cfg.get(k))} here, {_yaml(saved.get(k))} in the "
                "checkpoint" for k in differing_keys(model_cfg, saved)]
        why = ("; ".join(diff) + ". Use the model settings the checkpoint was trained with (its "
               "config.yaml, or --set model.KEY=VALUE)") if diff else \
            f"{str(e).splitlines()[0]}. Use the config the checkpoint was trained with"
        raise UserError(f"{source}: the checkpoint's weights do not fit the model of this config: "
                        f"{why}") from None


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def check_compatible(ckpt: dict, path: str | os.PathLike, class_order: list[int],
                     steps: list[list[int]], step: int) -> None:
    """Raise if a checkpoint does not belong to this experiment at ``step``."""
    if ckpt["step"] != step:
        raise UserError(f"{path}: checkpoint is of step {ckpt['step']}, expected step {step}")
    n = sum(len(s) for s in steps[:step + 1])
    if list(ckpt["class_order"])[:n] != list(class_order)[:n] or \
            [list(s) for s in ckpt["steps"][:step + 1]] != [list(s) for s in steps[:step + 1]]:
        raise UserError(f"{path}: checkpoint was trained with another class order or split "
                        f"({ckpt['steps'][:step + 1]} vs {steps[:step + 1]}); use the config it "
                        "was trained with or a fresh work directory")


def model_of(cfg: dict, ckpt: dict, source: str = "checkpoint"):
    """The model of a checkpoint (its head layout and towers) with its weights, built from
    ``cfg``'s model settings; on CPU, in training mode."""
    model = build_model(cfg["model"], ckpt["head_layout"], ckpt.get("head_towers"),
                        per_step_caps=caps_per_step(cfg), from_checkpoint=True,
                        fpns=ckpt.get("head_fpns"), bodies=ckpt.get("fpn_bodies"))
    load_model_state(model, ckpt, cfg["model"], source)
    return model


def model_from_checkpoint(ckpt: dict, cfg: dict | None = None, source: str = "checkpoint"):
    """Rebuild the model of a checkpoint (on CPU, in eval mode); ``source`` names it in errors."""
    return model_of(cfg or with_defaults(ckpt["config"]), ckpt, source).eval()
