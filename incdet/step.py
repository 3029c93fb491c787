"""One step of an experiment, end to end: data -> model -> train -> evaluate -> save.

``run_step(cfg, t, work_dir)`` writes ``work_dir/step_<t>/``: ``checkpoint.pt``, ``metrics.json``,
``config.yaml`` (resolved), ``log.jsonl`` and TensorBoard events. ``metrics.json`` is written
last, atomically: a step folder is complete exactly when it has one. While training, ``last.pt``
(model, optimizer, scheduler, iteration, RNG states) is refreshed every epoch so that an
interrupted step resumes with ``--resume``; it is removed once the step is complete.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from incdet import methods
from incdet.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from incdet.classes import ClassSpace
from incdet.config import dump_config, strip_private
from incdet.data.dataset import DetectionDataset, make_loader
from incdet.data.records import filter_for_classes
from incdet.data.sources import ensure_builtin, load_subset
from incdet.data.transforms import build_train_transform
from incdet.engine import (build_optimizer, build_scheduler, resolve_device, seed_everything,
                           train)
from incdet.errors import UserError
from incdet.evaluation import evaluate_model, format_table
from incdet.io import atomic_write_json
from incdet.losses import DetectionLoss, match_anchors
from incdet.model.builder import forward_train, head_layout

log = logging.getLogger(__name__)


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def load_experiment(cfg: dict, progress: bool = True):
    """Data and class bookkeeping shared by training and evaluation."""
    ensure_builtin(cfg["data"], progress)
    train_set = load_subset(cfg["data"], "train")
    val_set = load_subset(cfg["data"], "val")
    if [c["id"] for c in train_set.categories] != [c["id"] for c in val_set.categories]:
        raise UserError(f"{val_set.source}: its categories differ from {train_set.source}; both "
                        "subsets must share one category list")
    classes = ClassSpace(train_set.categories, cfg["split"], cfg["class_order"])
    return train_set, val_set, classes


def metric_groups(classes: ClassSpace, t: int) -> dict[str, tuple[int, ...]]:
    sc = classes.step(t)
    groups = {"old": sc.old, "new": sc.new, "all": sc.seen}
    groups.update({f"step_{s}": g for s, g in enumerate(sc.groups)})
    return groups


def _forgetting(history: list[dict], groups: dict, t: int) -> dict:
    """For each earlier group: its AP at the step it was learned minus its AP now."""
    out = {}
    for s in range(t):
        learned = next((h for h in history if h["step"] == s), None)
        then = learned["groups"].get(f"step_{s}") if learned else None
        now = groups[f"step_{s}"]["AP"]
        out[f"step_{s}"] = None if then is None or now is None else then - now
    return out


def run_step(cfg: dict, t: int, work_dir: str | Path, resume: bool = False, force: bool = False,
             progress: bool = True) -> dict:
    """Train and evaluate step ``t``; returns its metrics (as written to metrics.json)."""
    work_dir = Path(work_dir)
    step_dir = work_dir / f"step_{t}"
    metrics_path = step_dir / "metrics.json"
    if metrics_path.is_file() and not force:
        log.info("step %d is already complete (%s); pass --force to train it again", t,
                 metrics_path)
        return json.loads(metrics_path.read_text())
    tcfg = cfg["train"]
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))
    device = resolve_device(tcfg["device"])
    seed_everything(int(tcfg["seed"]) + t)
    train_set, val_set, classes = load_experiment(cfg, progress)
    sc = classes.step(t)
    method = cfg["incremental"]["method"]
    plan = methods.plan_step(method, classes, sc)

    previous = None
    if plan.uses_previous:
        prev_path = work_dir / f"step_{t - 1}" / "checkpoint.pt"
        if not prev_path.is_file():
            raise UserError(f"{prev_path}: missing; run step {t - 1} first (same --work-dir)")
        previous = load_checkpoint(prev_path)
        check_compatible(previous, prev_path, list(classes.order),
                         [list(s) for s in classes.steps], t - 1)

    records = filter_for_classes(train_set.records, plan.train_classes)
    if not records:
        raise UserError(f"{train_set.source}: step {t} has no training image with a box of its "
                        f"classes {list(plan.train_classes)}; check the split")
    dataset = DetectionDataset(records, classes.label_of, [plan.label_space] * len(records),
                               build_train_transform(cfg["augment"]))
    loader = make_loader(dataset, int(tcfg["batch_size"]), shuffle=True,
                         num_workers=int(tcfg["num_workers"]), seed=int(tcfg["seed"]) + t,
                         drop_last=len(dataset) > int(tcfg["batch_size"]))
    loader.worker_init_fn = _seed_worker

    student = methods.build_student(cfg, sc, plan, previous).to(device)
    teacher = None
    if plan.uses_teacher:
        teacher = methods.build_teacher(cfg, previous).to(device)
    criterion = methods.make_criterion(cfg, student, teacher, plan, classes, sc)

    total_iters = int(tcfg["max_iters"]) if tcfg.get("max_iters") else \
        int(tcfg["epochs"]) * len(loader)
    optimizer = build_optimizer(student, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, total_iters)
    step_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, step_dir / "config.yaml")
    last_path = step_dir / "last.pt"
    start_iter = start_epoch = 0
    base = {"step": t, "class_order": list(classes.order),
            "steps": [list(s) for s in classes.steps], "names": classes.to_dict()["names"],
            "config": strip_private(cfg), "method": method}
    if resume and last_path.is_file():
        state = load_checkpoint(last_path)
        check_compatible(state, last_path, list(classes.order), base["steps"], t)
        student.load_state_dict(state["model"])
        ts = state["train_state"]
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        start_iter, start_epoch = ts["iteration"], ts["epoch"]
        torch.set_rng_state(ts["torch_rng"])
        loader.generator.set_state(ts["loader_rng"])
        log.info("resuming step %d at iteration %d (epoch %d)", t, start_iter, start_epoch)

    def save_last(epoch: int, iteration: int) -> None:
        if iteration >= total_iters:
            return
        save_checkpoint(last_path, dict(base, head_layout=head_layout(student),
                                        model=student.state_dict(), history=[],
                                        train_state={"optimizer": optimizer.state_dict(),
                                                     "scheduler": scheduler.state_dict(),
                                                     "iteration": iteration, "epoch": epoch,
                                                     "torch_rng": torch.get_rng_state(),
                                                     "loader_rng": loader.generator.get_state()}))

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(step_dir))
    weights = dict(cfg["loss"]["weights"])
    try:
        result = train(student, criterion, loader, optimizer, scheduler, tcfg, weights,
                       total_iters, device, step_dir, writer, start_iter, start_epoch,
                       on_epoch_end=save_last, progress=progress)
        groups = metric_groups(classes, t)
        evaluation = evaluate_model(student, val_set.records, val_set.categories,
                                    classes.order[:len(sc.seen)], groups,
                                    int(cfg["eval"]["batch_size"]), device,
                                    num_workers=int(tcfg["num_workers"]), progress=progress)
        for name, m in evaluation["groups"].items():
            for k, v in m.items():
                if v is not None:
                    writer.add_scalar(f"eval_{name}/{k}", v, result.iterations + start_iter)
    finally:
        writer.close()

    history = list(previous["history"]) if previous is not None else []
    history = [h for h in history if h["step"] < t]
    history.append({"step": t, "groups": {k: v["AP"] for k, v in evaluation["groups"].items()
                                          if k.startswith("step_")}})
    metrics = {
        "step": t,
        "method": method,
        "classes": {"old": list(sc.old), "new": list(sc.new)},
        "map": {k: evaluation["groups"][k] for k in ("old", "new", "all")},
        "groups": {k: v for k, v in evaluation["groups"].items() if k.startswith("step_")},
        "per_class_ap": evaluation["per_class_ap"],
        "forgetting": _forgetting(history, evaluation["groups"], t),
        "train": {"seconds": round(result.seconds, 2), "iterations": result.iterations,
                  "images_per_second": round(result.images_per_second, 2),
                  "images": len(dataset)},
    }
    save_checkpoint(step_dir / "checkpoint.pt",
                    dict(base, head_layout=head_layout(student), model=student.state_dict(),
                         history=history, train_state=None))
    atomic_write_json(metrics_path, metrics)
    if last_path.exists():
        last_path.unlink()
    log.info("step %d evaluation (%s):\n%s", t, method,
             format_table(evaluation, classes.names))
    return metrics


def model_from_checkpoint(ckpt: dict, cfg: dict | None = None):
    """Rebuild the model of a checkpoint (on CPU, in eval mode)."""
    from incdet.model.builder import build_model

    model = build_model((cfg or ckpt["config"])["model"], ckpt["head_layout"])
    model.load_state_dict(ckpt["model"])
    return model.eval()


def evaluate_checkpoint(ckpt_path: str | Path, cfg: dict | None = None,
                        progress: bool = True) -> tuple[dict, ClassSpace]:
    """Evaluate a step's checkpoint on the validation set of ``cfg`` (default: the config saved
    in the checkpoint). Returns the evaluation (groups and per-class AP) and the class space."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = cfg or dict(ckpt["config"])
    _, val_set, classes = load_experiment(cfg, progress)
    t = int(ckpt["step"])
    check_compatible(ckpt, ckpt_path, list(classes.order), [list(s) for s in classes.steps], t)
    device = resolve_device(cfg["train"]["device"])
    model = model_from_checkpoint(ckpt, cfg).to(device)
    sc = classes.step(t)
    evaluation = evaluate_model(model, val_set.records, val_set.categories,
                                classes.order[:len(sc.seen)], metric_groups(classes, t),
                                int(cfg["eval"]["batch_size"]), device, progress=progress)
    return evaluation, classes
