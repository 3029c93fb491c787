"""incdet: class-incremental object detection for torchvision RetinaNet.

The Python API is the handful of functions below (``__all__``), one per thing a user does; each
takes a config as a YAML path or a resolved dict plus ``--set``-style overrides, and writes the
same step folders as the command-line tools in ``tools/`` (docs/tutorial.md walks through both):

* :func:`import_detector`: a torchvision RetinaNet (module, state-dict file or weights name) as
  step 0 of an experiment;
* :func:`run_step` / :func:`run_protocol`: add classes (one step, or every step of a split for
  several methods side by side);
* :func:`evaluate`: a step's checkpoint on a validation set;
* :func:`merge`: several detectors distilled into one;
* :func:`export`: a checkpoint as a torchvision state dict, TorchScript or ONNX;
* :func:`load_detector` / :class:`Detector`: a trained detector for applications.

The package is layered; a module imports from its own layer or a lower one, at the top of its
file (``tests/test_layers.py`` checks every import, and that they form no cycle):

============  ==========================================================================
layer         what it owns
============  ==========================================================================
base          errors, atomic file writes, config (defaults, overrides), devices, processes
data          annotations (COCO, VOC, built-in shapes), class spaces, datasets, samplers
model         the network: build, grow, heads, checkpoints, conversion to/from torchvision
train         the training loop, losses, distillation, the exemplar memory's ranking
evaluation    COCO-style evaluation of a model on a set of images
experiment    methods, one step, protocols, importing a detector as step 0, merging
              detectors, reports
deploy        detectors for applications: ``load_detector``, ``Detector``, export, inference
bench         benchmarks, one module per section of ``tools/benchmark.py``
tools         command-line tools: parse arguments, call the layers below
============  ==========================================================================
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Sequence

from incdet.base.config import apply_overrides
from incdet.base.config import load_config as _load_config
from incdet.base.version import __version__
from incdet.deploy import export as _export
from incdet.deploy.detector import Detector, load_detector
from incdet.experiment import importer as _importer
from incdet.experiment import merge as _merge
from incdet.experiment import protocol as _protocol
from incdet.experiment import step as _step
from incdet.experiment.evaluate import evaluate_checkpoint

__all__ = ["import_detector", "run_step", "run_protocol", "evaluate", "merge", "export",
           "load_config", "load_detector", "Detector", "__version__"]
LAYERS = ("base", "data", "model", "train", "evaluation", "experiment", "deploy", "bench", "tools")
PathLike = str | os.PathLike


def load_config(config: PathLike | dict | None = None, overrides: Sequence[str] = ()) -> dict:
    """A resolved config: the defaults, the YAML file ``config`` (with its ``_base_``) and
    ``overrides`` (``"train.lr=0.01"`` items, as ``--set`` takes them). A dict is taken as
    resolved already; ``overrides`` then apply to a copy."""
    if isinstance(config, dict):
        cfg = copy.deepcopy(config)
        apply_overrides(cfg, list(overrides))
        return cfg
    return _load_config(config, list(overrides))


def import_detector(detector, work_dir: PathLike, classes=None, config: PathLike | dict | None =
                    None, arch: str | None = None, overrides: Sequence[str] = (),
                    force: bool = False, progress: bool = True) -> dict:
    """Write ``work_dir/step_0/`` for a trained torchvision RetinaNet; returns its metrics.

    ``detector``: a ``torchvision.models.detection.RetinaNet``, the path of its state dict
    (``arch`` names its layout: ``retinanet_resnet50_fpn``, ``..._v2``, ...) or a torchvision
    weights name read from the local cache. ``classes``: one ``{id, name}`` per output slot (or
    the path of such a JSON file, or of a COCO annotation file); a weights name brings its own.
    ``config``: the experiment's data and training settings; with one, the detector is evaluated
    on its validation set."""
    cfg = load_config(config, overrides)
    model, slots, source = _importer.detector_and_slots(detector, arch, classes, cfg["model"])
    return _importer.import_detector(model, slots, cfg, work_dir, source,
                                     evaluate=config is not None, force=force,
                                     progress=progress, overrides=list(overrides))


def run_step(config: PathLike | dict, step: int, work_dir: PathLike,
             overrides: Sequence[str] = (), resume: bool = False, force: bool = False,
             progress: bool = True) -> dict:
    """Train and evaluate step ``step`` of the experiment in ``work_dir`` (``step_<t>/``, on
    top of ``step_<t-1>/``); returns its metrics (``map.old``, ``map.new``, ...)."""
    return _step.run_step(load_config(config, overrides), int(step), work_dir, resume=resume,
                          force=force, progress=progress)


def run_protocol(config: PathLike | dict, work_dir: PathLike,
                 methods: Sequence[str] = ("incdet", "finetune", "joint"),
                 step0: PathLike | None = None, overrides: Sequence[str] = (),
                 force: bool = False, progress: bool = True) -> dict[str, list[dict]]:
    """Every step of the config's split for each of ``methods`` (``work_dir/<method>/``), from
    ``step0`` (a finished step-0 folder, such as :func:`import_detector` writes) when given;
    returns ``{method: [metrics of step 0, 1, ...]}``."""
    cfg = load_config(config, overrides)
    return _protocol.run_protocol(cfg, work_dir, _protocol.method_variants(list(methods)),
                                  progress=progress, step0=step0, force=force)


def evaluate(checkpoint: PathLike, config: PathLike | dict | None = None,
             overrides: Sequence[str] = (), device: str = "auto", progress: bool = True) -> dict:
    """A step's checkpoint on the validation set of ``config`` (default: the config saved in the
    checkpoint, with ``overrides``); returns groups (``old``, ``new``, ``all``, per step) and
    per-class AP."""
    cfg = None if config is None else load_config(config, overrides)
    evaluation, _ = evaluate_checkpoint(checkpoint, cfg, progress=progress,
                                        overrides=list(overrides) if cfg is None else None,
                                        device=device)
    return evaluation


def merge(teachers: Sequence[PathLike], work_dir: PathLike, config: PathLike | dict | None = None,
          images: PathLike | None = None, overrides: Sequence[str] = (), force: bool = False,
          progress: bool = True) -> dict:
    """Distil the detectors ``teachers`` (step folders or checkpoints) into one student in
    ``work_dir``; returns its metrics."""
    if config is None and overrides:
        raise ValueError("merge: overrides apply to a config; give config (the first teacher's "
                         "is used without one)")
    cfg = None if config is None else load_config(config, overrides)
    return _merge.merge(list(teachers), work_dir, cfg, images=images, force=force,
                        progress=progress)


def export(checkpoint: PathLike, out: PathLike, format: str = "state_dict",
           device: str = "auto") -> dict:
    """Write ``out`` (``state_dict``: a plain torchvision RetinaNet's; ``torchscript``;
    ``onnx``) and ``out.json`` (classes, image sizes, how to load it); returns that metadata."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return _export.export(checkpoint, format, out, device=device)
