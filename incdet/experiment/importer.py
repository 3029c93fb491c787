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

* **Training recipe**: a torchvision ResNet detector is fine-tuned as torchvision's detection
  references fine-tune RetinaNet (:data:`TORCHVISION_RECIPE`: SGD at 0.01 for batch 16, momentum
  0.9, weight decay 1e-4, horizontal flips only), not with the CPU preset made for a MobileNet
  trained from scratch on 128 px shapes. Only the settings the experiment's config leaves at
  their defaults change; ``imported.recipe`` in ``metrics.json`` lists them, and step 0's
  ``config.yaml`` (the ``_base_`` of the next steps) carries them. A detector of incdet's own
  layout keeps the config's recipe.
* **What a state dict cannot tell** (image sizes, score and NMS thresholds, detections per image)
  comes from the config or ``--set``; the log names these settings and their values.

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
from incdet.model import torchvision as tv
from incdet.model.checkpoint import model_of
from incdet.model.torchvision import import_model

log = logging.getLogger(__name__)

# torchvision's detection references (references/detection, RetinaNet): SGD 0.01 at batch 16
# (8 GPUs x 2), momentum 0.9, weight decay 1e-4, horizontal flips as the only augmentation
TORCHVISION_RECIPE = {"train": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
                                "weight_decay": 1e-4},
                      "augment": {"scale_p": 0.0, "crop_p": 0.0, "brightness_contrast_p": 0.0}}
# settings a state dict does not carry: the config's values are used (logged at import)
NOT_IN_A_STATE_DICT = ("min_size", "max_size", "score_thresh", "nms_thresh",
                       "detections_per_img")


def import_recipe(cfg: dict) -> dict:
    """The training settings suited to the imported detector that ``cfg`` leaves at their
    defaults (module docstring): ``{"train.lr": 0.01, ...}`` (learning rate scaled linearly to
    the batch size); applied to ``cfg`` in place."""
    if not cfg["model"]["backbone"].startswith("resnet"):
        return {}
    changed = {}
    for section, values in TORCHVISION_RECIPE.items():
        for key, value in values.items():
            if key == "lr":
                value = value * int(cfg["train"]["batch_size"]) / 16
            if cfg[section][key] == DEFAULTS[section][key] and value != cfg[section][key]:
                cfg[section][key] = value
                changed[f"{section}.{key}"] = value
    return changed


def detector_and_slots(detector, arch: str | None, classes, model_cfg: dict):
    """``(model, slots, source)`` of what a user gives to import: a torchvision weights name
    (``arch`` None; it brings its classes), a state-dict file with its layout ``arch``, or a
    ``RetinaNet``; ``classes`` (one ``{id, name}`` per output slot, or a JSON / COCO file of
    them) replaces the weights' classes. The import tool and :func:`incdet.import_detector`
    both read their input here."""
    slots = None
    if isinstance(detector, RetinaNet):
        model, source = detector, type(detector).__name__
    elif arch is None:
        model, slots, _ = tv.torchvision_from_weights(str(detector))
        source = str(detector)
    else:
        model, source = tv.load_torchvision(detector, arch, str(detector), model_cfg), \
            str(detector)
    if classes is not None:
        from_file = isinstance(classes, (str, Path))
        slots = tv.slot_classes(model.head.classification_head.num_classes,
                                tv.read_classes(classes) if from_file else classes,
                                str(classes) if from_file else "classes")
    if slots is None:
        raise UserError(f"{source}: give its classes, one {{id, name}} per output slot")
    return model, slots, source


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
    recipe = import_recipe(cfg)
    apply_overrides(cfg, list(overrides))
    recipe = {k: v for k, v in recipe.items() if k not in {o.split("=")[0] for o in overrides}}
    if recipe:
        log.info("training recipe for the imported detector (torchvision's references): %s",
                 ", ".join(f"{k}={v}" for k, v in recipe.items()))
    log.info("not in a state dict, taken from the config: %s",
             ", ".join(f"model.{k}={cfg['model'].get(k)}" for k in NOT_IN_A_STATE_DICT))
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
               "imported": {"source": source, "evaluated": evaluate, "recipe": recipe}}
    model_part = {k: ckpt[k] for k in ("class_order", "steps", "names", "head_layout",
                                       "head_towers", "model", "history")}
    completed(step_dir, cfg, force=True)  # --force: the old result goes before the new one
    return write_step(step_dir, cfg, model_part, metrics, device, {})
