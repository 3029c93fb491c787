"""A trained torchvision RetinaNet as step 0 of an experiment (add classes to a detector you have).

:func:`import_detector` turns a ``torchvision.models.detection.RetinaNet`` into an incdet step-0
folder (``checkpoint.pt``, ``config.yaml``, ``metrics.json``) exactly as if incdet had trained it,
so every later step, the protocol runner, evaluation and export work unchanged:

* **Model settings and weights** are read from the detector itself and converted by
  :func:`incdet.model.torchvision.import_model` (its module says what is read and how).
* **Classes**: output slot ``i`` of the detector is class ``slots[i]``
  (:func:`incdet.model.torchvision.slot_classes`); only real classes are kept, in slot order.
  They become the config's ``categories``; a string split (``"80+2"``) then takes them first, in
  this order, and the dataset's other classes after them in ascending id.

Detections of the imported model equal the stock detector's in eval mode; the tests check it for
both torchvision layouts.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Sequence

import torch
from torchvision.models.detection import RetinaNet

from incdet.base.config import DEFAULTS, apply_overrides, strip_private
from incdet.base.devices import resolve_device
from incdet.base.errors import UserError
from incdet.evaluation.coco_eval import METRIC_KEYS, evaluate_model, format_table
from incdet.experiment.loaders import load_experiment
from incdet.experiment.step_folder import completed, write_step
from incdet.model.checkpoint import model_of
from incdet.model.torchvision import import_model

log = logging.getLogger(__name__)


def import_detector(model: RetinaNet, slots: Sequence[dict | None], cfg: dict,
                    work_dir: str | Path, source: str, evaluate: bool = False,
                    force: bool = False, progress: bool = True,
                    overrides: Sequence[str] = ()) -> dict:
    """Write ``work_dir/step_0/`` for ``model`` (see the module docstring); returns its
    metrics. ``cfg``: the experiment's config (data, training settings); its ``model`` and
    ``loss.box`` settings, ``categories`` and ``split`` are replaced by the detector's, then
    ``overrides`` (``--set`` items) apply, so that settings a state dict does not carry (image
    sizes, thresholds) can be given.
    ``evaluate``: evaluate on ``cfg``'s validation set (its annotations of the imported
    classes). Nothing is written when anything fails."""

    step_dir = Path(work_dir) / "step_0"
    if (step_dir / "metrics.json").is_file() and not force:
        raise UserError(f"{step_dir}: step 0 already exists; use another --work-dir or --force")
    mcfg, lcfg, categories, state = import_model(model, slots)
    cfg = copy.deepcopy(cfg)
    cfg["model"] = dict(copy.deepcopy(DEFAULTS["model"]), **mcfg)
    cfg["loss"].update(lcfg)
    cfg["categories"] = categories
    ids = [c["id"] for c in categories]
    cfg["split"] = [ids]
    cfg["class_order"] = None
    apply_overrides(cfg, list(overrides))
    ckpt = {"step": 0, "class_order": ids, "steps": [ids],
            "names": {str(c["id"]): c["name"] for c in categories},
            "head_layout": [len(ids)], "head_towers": [0], "config": strip_private(cfg),
            "method": "imported", "model": state, "history": [], "train_state": None}
    incdet_model = model_of(cfg, ckpt, source).eval()  # checks that the weights fit
    groups = {"old": (), "new": tuple(ids), "all": tuple(ids), "step_0": tuple(ids)}
    device = torch.device("cpu")  # where the weights were converted, when not evaluated
    if evaluate:
        _, val_set, classes = load_experiment(cfg, progress)
        device = resolve_device(cfg["train"]["device"])
        evaluation = evaluate_model(incdet_model.to(device), val_set.records,
                                    val_set.categories, ids, groups,
                                    int(cfg["eval"]["batch_size"]), device, progress=progress)
        log.info("imported step 0 evaluation:\n%s", format_table(evaluation, classes.names))
    else:
        evaluation = {"groups": {k: {m: None for m in METRIC_KEYS} for k in groups},
                      "per_class_ap": {str(c): None for c in ids}}
    ckpt["history"] = [{"step": 0, "groups": {"step_0": evaluation["groups"]["step_0"]["AP"]}}]
    metrics = {"step": 0, "method": "imported", "classes": {"old": [], "new": ids},
               "map": {k: evaluation["groups"][k] for k in ("old", "new", "all")},
               "groups": {"step_0": evaluation["groups"]["step_0"]},
               "per_class_ap": evaluation["per_class_ap"], "forgetting": {},
               "imported": {"source": source, "evaluated": evaluate}}
    model_part = {k: ckpt[k] for k in ("class_order", "steps", "names", "head_layout",
                                       "head_towers", "model", "history")}
    completed(step_dir, cfg, force=True)  # --force: the old result goes before the new one
    return write_step(step_dir, cfg, model_part, metrics, device, {})
