"""One step of an experiment, end to end: data -> model -> train -> evaluate -> save.

``run_step(cfg, t, work_dir)`` writes ``work_dir/step_<t>/``: ``checkpoint.pt``, ``metrics.json``,
``config.yaml`` (resolved), ``log.jsonl`` and TensorBoard events. ``metrics.json`` is written
last, atomically: a step folder is complete exactly when it has one. While training, ``last.pt``
(model, optimizer, scheduler, iteration, RNG states) is refreshed every epoch so that an
interrupted step resumes with ``--resume``; it is removed once the step is complete.
"""
from __future__ import annotations

import copy
import json
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from incdet.base import distributed as dist
from incdet.base.config import apply_overrides, dump_config, strip_private, with_defaults
from incdet.base.errors import UserError
from incdet.base.io import atomic_write_json
from incdet.data.classes import ClassSpace, merge_categories
from incdet.data.dataset import DetectionDataset, collate, make_loader
from incdet.data.records import filter_for_classes
from incdet.data.sampler import MixedBatchSampler, check_replay_mode
from incdet.data.sources import ensure_builtin, load_subset
from incdet.data.transforms import build_train_transform
from incdet.evaluation.coco_eval import evaluate_model, format_table
from incdet.experiment import methods
from incdet.model.builder import head_layout, head_towers, keep_frozen_norms
from incdet.model.checkpoint import (
    check_compatible,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from incdet.train.engine import (
    apply_keep_freed_memory,
    build_optimizer,
    build_scheduler,
    device_record,
    reset_peak_memory,
    resolve_device,
    resolve_num_workers,
    seed_everything,
    train,
)
from incdet.train.memory import Memory, build_memory, rank_classes, roi_features

log = logging.getLogger(__name__)


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def train_loader(cfg: dict, classes: ClassSpace, records, label_space, memory: Memory | None,
                 seed: int, device=None):
    """The step's training loader: new images (label space of the step) and, with a memory,
    replayed memory images (each with its own label space) mixed into every batch.

    The replayed pool is the whole memory. A memory image that is also one of the step's new
    images (it has new-class boxes too) is annotated for both label spaces and replayed from the
    memory, not drawn a second time as a new image: were it left among the new images, only the
    memory images *without* new-class boxes would be replayed, and on data where most images hold
    both old and new classes, ``replay_fraction`` of every batch would go to a handful of images
    (11 of a 99-image memory on the built-in 5+5 split). If every new image is in the memory,
    they stay new images, annotated for both, and only the memory's other images are replayed.
    """
    tcfg = cfg["train"]
    stored = dict(memory.records) if memory is not None else {}
    spaces = {i: classes.labels(memory.label_spaces[i]) for i in stored}
    in_memory = [rec for rec in records if rec.id in stored]
    for rec in in_memory:
        old = stored[rec.id]
        stored[rec.id] = replace(rec, boxes=np.concatenate([rec.boxes, old.boxes]),
                                 category_ids=np.concatenate([rec.category_ids, old.category_ids]),
                                 iscrowd=np.zeros(len(rec.boxes) + len(old.boxes), bool),
                                 areas=None)
        spaces[rec.id] = sorted(set(label_space) | set(spaces[rec.id]))
    if in_memory and len(in_memory) == len(records):
        # every new image is in the memory: they stay the step's new images (annotated for both)
        records = [stored.pop(rec.id) for rec in records]
        new_spaces = [spaces[rec.id] for rec in records]
    else:
        records = [rec for rec in records if rec.id not in stored]
        new_spaces = [list(label_space)] * len(records)
    mem_records = [rec for _, rec in sorted(stored.items())]
    mem_spaces = [spaces[r.id] for r in mem_records]
    dataset = DetectionDataset(records + mem_records, classes.label_of, new_spaces + mem_spaces,
                               build_train_transform(cfg["augment"]),
                               num_replayed=len(mem_records))
    bs = int(tcfg["batch_size"])
    workers = resolve_num_workers(tcfg["num_workers"])
    world, rank = dist.world_size(), dist.rank()
    generator = torch.Generator()
    generator.manual_seed(int(tcfg["seed"]) + seed)
    if mem_records:
        sampler = MixedBatchSampler(len(records), len(mem_records), bs * world,
                                    float(cfg["memory"]["replay_fraction"]), generator,
                                    cfg["memory"]["replay_mode"])
    elif world > 1:
        sampler = torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(dataset, generator=generator), bs * world,
            drop_last=len(dataset) > bs * world)
        sampler.generator = generator
    else:
        sampler = None
    if sampler is not None:
        if world > 1:  # every process draws the same global batches and keeps its slice
            sampler = dist.ShardedBatchSampler(sampler, rank, world)
        loader = make_loader(dataset, bs, shuffle=False, num_workers=workers,
                             seed=int(tcfg["seed"]) + seed + 7919 * rank, batch_sampler=sampler,
                             device=device)
    else:
        loader = make_loader(dataset, bs, shuffle=True, num_workers=workers,
                             seed=int(tcfg["seed"]) + seed, drop_last=len(dataset) > bs,
                             device=device)
    loader.worker_init_fn = _seed_worker
    return loader


def _shuffle_generator(loader) -> torch.Generator:
    return getattr(loader.batch_sampler, "generator", None) or loader.generator


def select_memory(cfg: dict, model, records, previous: Memory | None, sc, device,
                  progress: bool) -> Memory:
    """Herd the step's training images per new class and update the memory (module
    :mod:`incdet.train.memory` documents the rules)."""
    mcfg = cfg["memory"]
    from incdet.train.memory import quotas

    quota = quotas(list(sc.seen), mcfg.get("budget"), mcfg.get("per_class"))
    limit = max(quota[c] for c in sc.new)
    feats = roi_features(model, records, int(cfg["eval"]["batch_size"]), device,
                         int(mcfg["feature_size"]), progress)
    rankings = rank_classes(feats, sc.new, mcfg["selection"], limit, int(cfg["train"]["seed"]))
    return build_memory(previous, rankings, {r.id: r for r in records}, sc.new, sc.seen, mcfg)


def balanced_finetune(cfg: dict, student, classes: ClassSpace, sc, memory: Memory, device,
                      step_dir: Path, writer, progress: bool) -> None:
    """End-to-End Incremental Learning's balanced fine-tuning: a short, low learning-rate
    training on the class-balanced memory (old and new classes alike), distilling every class
    from the model as it was before this stage."""
    bcfg = cfg["memory"]["balanced_finetune"]
    recs = [memory.records[i] for i in sorted(memory.records)]
    spaces = [classes.labels(memory.label_spaces[i]) for i in sorted(memory.records)]
    dataset = DetectionDataset(recs, classes.label_of, spaces,
                               build_train_transform(cfg["augment"]))
    tcfg = dict(cfg["train"], lr=float(cfg["train"]["lr"]) * float(bcfg["lr_scale"]),
                warmup_iters=0)
    loader = make_loader(dataset, int(tcfg["batch_size"]), shuffle=True, num_workers=0,
                         seed=int(tcfg["seed"]) + 1000 + sc.step,
                         drop_last=len(dataset) > int(tcfg["batch_size"]))
    frozen = copy.deepcopy(student).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    plan = methods.Plan(sc.seen, tuple(classes.labels(sc.seen)), True, True, True)
    criterion = methods.make_criterion(cfg, student, frozen, plan, classes, sc, distill_new=True)
    optimizer = build_optimizer(student, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, int(bcfg["iters"]))
    bft_dir = step_dir / "balanced_finetune"
    bft_dir.mkdir(exist_ok=True)
    train(student, criterion, loader, optimizer, scheduler, tcfg, dict(cfg["loss"]["weights"]),
          int(bcfg["iters"]), device, bft_dir, None, progress=progress)


def load_experiment(cfg: dict, progress: bool = True):
    """Data and class bookkeeping shared by training and evaluation."""
    ensure_builtin(cfg["data"], progress)
    train_set = load_subset(cfg["data"], "train")
    val_set = load_subset(cfg["data"], "val")
    if [c["id"] for c in train_set.categories] != [c["id"] for c in val_set.categories]:
        raise UserError(f"{val_set.source}: its categories differ from {train_set.source}; both "
                        "subsets must share one category list")
    categories = merge_categories(train_set.categories, cfg.get("categories"),
                                  str(train_set.source))
    order = cfg["class_order"]
    if order is None and cfg.get("categories") and not isinstance(cfg["split"], list):
        # an imported detector's classes come first, in its own order; then the others
        imported = [int(c["id"]) for c in cfg["categories"]]
        order = imported + sorted({int(c["id"]) for c in categories} - set(imported))
    classes = ClassSpace(categories, cfg["split"], order)
    return train_set, val_set, classes


def new_class_batch(cfg: dict, batch_size: int, method: str = "incdet", t: int = 1,
                    progress: bool = False):
    """One fixed batch for cost measurements: the first ``batch_size`` training images of step
    ``t``'s new classes, annotated for ``method``'s label space, without augmentation. Returns
    ``(classes, step classes, plan, images, targets)``."""
    train_set, _, classes = load_experiment(cfg, progress)
    sc = classes.step(t)
    records = filter_for_classes(train_set.records, sc.new)[:batch_size]
    plan = methods.plan_step(method, classes, sc)
    dataset = DetectionDataset(records, classes.label_of, [plan.label_space] * len(records))
    images, targets = collate([dataset[i] for i in range(len(records))])
    return classes, sc, plan, images, targets


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
    """Train and evaluate step ``t``; returns its metrics (as written to metrics.json).

    The step's story, one phase per method of :class:`StepRun`: ``prepare`` (data, the previous
    step's model and memory, student, teacher, optimizer), ``restore`` (``last.pt`` when
    resuming), ``train``, ``finish`` (select the memory, balanced fine-tuning, evaluate) and
    ``write`` (checkpoint, memory and, last, metrics.json). With several processes, the others
    train alongside rank 0 and then wait for it to finish the step."""
    metrics_path = Path(work_dir) / f"step_{t}" / "metrics.json"
    if metrics_path.is_file() and not force:
        log.info("step %d is already complete (%s); pass --force to train it again", t,
                 metrics_path)
        return json.loads(metrics_path.read_text())
    run = StepRun.prepare(cfg, t, Path(work_dir), progress)
    run.restore(resume)
    if not run.main:
        run.train(None)
        dist.barrier()
        return json.loads(metrics_path.read_text())
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run.step_dir))
    try:
        result = run.train(writer)
        evaluation, new_memory = run.finish(result, writer)
    finally:
        writer.close()
    metrics = run.write(result, evaluation, new_memory)
    dist.barrier()
    return metrics


@dataclass
class StepRun:
    """One step in progress: what :meth:`prepare` builds and the later phases read."""

    cfg: dict
    t: int
    work_dir: Path
    device: torch.device
    workers: int
    main: bool  # rank 0: the process that evaluates and writes
    progress: bool
    train_set: object
    val_set: object
    classes: ClassSpace
    plan: methods.Plan
    previous: dict | None  # the previous step's checkpoint
    records: list  # the step's training images (new classes)
    memory: Memory | None  # the previous steps' memory, replayed
    loader: torch.utils.data.DataLoader
    student: torch.nn.Module
    loss_fn: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_iters: int
    base: dict = field(default_factory=dict)  # the checkpoint fields every save shares
    kept_memory: bool = False  # train.keep_freed_memory applied (glibc)
    start_iter: int = 0
    start_epoch: int = 0
    resume_position: tuple | None = None

    @property
    def step_dir(self) -> Path:
        return self.work_dir / f"step_{self.t}"

    @property
    def sc(self):
        return self.classes.step(self.t)

    @property
    def method(self) -> str:
        return self.cfg["incremental"]["method"]

    @property
    def every_eval(self) -> int:
        return int(self.cfg["eval"].get("every_iters") or 0)

    @classmethod
    def prepare(cls, cfg: dict, t: int, work_dir: Path, progress: bool) -> StepRun:
        """Data, the previous step's checkpoint and memory, the loader, student and teacher,
        loss, optimizer and schedule; the resolved config.yaml is written. Every check that
        can fail on the user's input runs here, before anything trains."""
        tcfg = cfg["train"]
        every_eval = int(cfg["eval"].get("every_iters") or 0)
        if every_eval and (not tcfg.get("checkpoint_every") or
                           every_eval % int(tcfg["checkpoint_every"])):
            raise UserError(f"eval.every_iters: {every_eval} must be a multiple of "
                            f"train.checkpoint_every ({tcfg.get('checkpoint_every')}): "
                            "evaluation happens at checkpoints")
        if tcfg.get("threads"):
            torch.set_num_threads(int(tcfg["threads"]))
        device = resolve_device(dist.setup(tcfg["device"]))
        kept_memory = apply_keep_freed_memory(tcfg, device)
        reset_peak_memory(device)  # metrics.json reports this step's peak
        main = dist.is_main()
        seed_everything(int(tcfg["seed"]) + t)
        if not main:
            dist.barrier()  # rank 0 generates the built-in dataset first when it is missing
        train_set, val_set, classes = load_experiment(cfg, progress and main)
        if main:
            dist.barrier()
        sc = classes.step(t)
        method = cfg["incremental"]["method"]
        plan = methods.plan_step(method, classes, sc, methods.memory_enabled(cfg))
        if plan.uses_memory:  # a wrong setting fails now, not after the step has trained
            check_replay_mode(cfg["memory"]["replay_mode"])

        previous = prev_path = None
        if plan.uses_previous:
            prev_path = work_dir / f"step_{t - 1}" / "checkpoint.pt"
            if not prev_path.is_file():
                raise UserError(f"{prev_path}: missing; run step {t - 1} first (same --work-dir)")
            previous = load_checkpoint(prev_path)
            check_compatible(previous, prev_path, list(classes.order),
                             [list(s) for s in classes.steps], t - 1)

        records = filter_for_classes(train_set.records, plan.train_classes)
        if not records:
            raise UserError(f"{train_set.source}: step {t} has no training image with a box of "
                            f"its classes {list(plan.train_classes)}; check the split")
        memory = None
        if plan.uses_memory and t > 0:
            mem_path = work_dir / f"step_{t - 1}" / "memory.json"
            if not mem_path.is_file():
                raise UserError(f"{mem_path}: missing; step {t - 1} was trained without a "
                                "memory: retrain it with memory.budget set, or set "
                                "memory.budget: 0")
            memory = Memory.from_json(mem_path, cfg["data"]["root"])
        loader = train_loader(cfg, classes, records, plan.label_space, memory, seed=t,
                              device=device)

        memory_format = (torch.channels_last if tcfg.get("channels_last")
                         else torch.contiguous_format)
        student = methods.build_student(cfg, sc, plan, previous, prev_path)
        student = student.to(device, memory_format=memory_format)
        teacher = None
        if plan.uses_teacher:
            teacher = methods.build_teacher(cfg, previous, prev_path)
            teacher = teacher.to(device, memory_format=memory_format)
        criterion = methods.make_criterion(cfg, student, teacher, plan, classes, sc)
        if tcfg.get("sync_bn") and dist.world_size() > 1:
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
            criterion = methods.make_criterion(cfg, student, teacher, plan, classes, sc)
        loss_fn, _ddp = dist.wrap(student, criterion, device)

        total_iters = methods.training_budget(cfg, classes, train_set.records, t, len(loader))
        optimizer = build_optimizer(student, tcfg)
        scheduler = build_scheduler(optimizer, tcfg, total_iters)
        step_dir = work_dir / f"step_{t}"
        if main:
            step_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, step_dir / "config.yaml")
        dist.barrier()
        base = {"step": t, "class_order": list(classes.order),
                "steps": [list(s) for s in classes.steps], "names": classes.to_dict()["names"],
                "config": strip_private(cfg), "method": method}
        return cls(cfg, t, work_dir, device, resolve_num_workers(tcfg["num_workers"]), main,
                   progress and main, train_set, val_set, classes, plan, previous, records,
                   memory, loader, student, loss_fn, optimizer, scheduler, total_iters, base,
                   kept_memory)

    def restore(self, resume: bool) -> None:
        """With ``resume`` and a ``last.pt``: the model, optimizer, schedule, iteration and
        random state it holds. A fresh run drops the learning curve of an earlier one."""
        last_path = self.step_dir / "last.pt"
        if resume and last_path.is_file():
            state = load_checkpoint(last_path)
            check_compatible(state, last_path, list(self.classes.order), self.base["steps"],
                             self.t)
            load_model_state(self.student, state, self.cfg["model"], last_path)
            ts = state["train_state"]
            self.optimizer.load_state_dict(ts["optimizer"])
            self.scheduler.load_state_dict(ts["scheduler"])
            self.start_iter, self.start_epoch = ts["iteration"], ts["epoch"]
            torch.set_rng_state(ts["torch_rng"])
            self.resume_position = (ts["epoch_rng"], ts["batches_done"])
            log.info("resuming step %d at iteration %d (epoch %d, batch %d)", self.t,
                     self.start_iter, self.start_epoch, ts["batches_done"])
        elif self.main and (self.step_dir / "curve.jsonl").exists():
            (self.step_dir / "curve.jsonl").unlink()  # the curve of an earlier run ends here

    def train(self, writer):
        """The step's training (rank 0 with ``writer``: logging, ``last.pt`` and the curve)."""
        tcfg, weights = self.cfg["train"], dict(self.cfg["loss"]["weights"])
        common = dict(shuffle_generator=_shuffle_generator(self.loader),
                      resume_position=self.resume_position)
        if not self.main:
            return train(self.student, self.loss_fn, self.loader, self.optimizer,
                         self.scheduler, tcfg, weights, self.total_iters, self.device, None,
                         None, self.start_iter, self.start_epoch, progress=False, **common)
        result = train(self.student, self.loss_fn, self.loader, self.optimizer, self.scheduler,
                       tcfg, weights, self.total_iters, self.device, self.step_dir, writer,
                       self.start_iter, self.start_epoch, on_epoch_end=self.save_last,
                       progress=self.progress, on_checkpoint=self.on_checkpoint, **common)
        self.student = _unwrap_sync_bn(self.student)
        return result

    def save_last(self, epoch: int, iteration: int, position=None) -> None:
        """``last.pt``: everything needed to continue at ``iteration``; ``position`` is the
        shuffling state at the start of ``epoch`` and the batches of it already trained on
        (None after a complete epoch)."""
        if iteration >= self.total_iters:
            return
        if position is None:
            position = (_shuffle_generator(self.loader).get_state(), 0)
        train_state = {"optimizer": self.optimizer.state_dict(),
                       "scheduler": self.scheduler.state_dict(), "iteration": iteration,
                       "epoch": epoch, "torch_rng": torch.get_rng_state(),
                       "epoch_rng": position[0], "batches_done": position[1]}
        save_checkpoint(self.step_dir / "last.pt",
                        dict(self.base, head_layout=head_layout(self.student),
                             head_towers=head_towers(self.student),
                             model=self.student.state_dict(), history=[],
                             train_state=train_state))

    def on_checkpoint(self, epoch: int, iteration: int, position=None) -> None:
        """``last.pt``, and with ``eval.every_iters`` an evaluation of the model so far (one
        line of ``curve.jsonl``: how far from converged the step is)."""
        self.save_last(epoch, iteration, position)
        if self.every_eval and iteration % self.every_eval == 0 and iteration < self.total_iters:
            ap = self.evaluate(progress=False)["groups"]["all"]["AP"]
            with open(self.step_dir / "curve.jsonl", "a") as f:
                f.write(json.dumps({"iteration": iteration, "AP": ap}) + "\n")
            self.student.train()
            keep_frozen_norms(self.student)

    def evaluate(self, progress: bool) -> dict:
        """The student on the validation images, over the classes seen so far."""
        return evaluate_model(self.student, self.val_set.records, self.val_set.categories,
                              self.classes.order[:len(self.sc.seen)],
                              metric_groups(self.classes, self.t),
                              int(self.cfg["eval"]["batch_size"]), self.device,
                              num_workers=self.workers, progress=progress)

    def finish(self, result, writer) -> tuple[dict, Memory | None]:
        """After training: the new memory (herding) and balanced fine-tuning when the method
        keeps one, then the evaluation. Returns the evaluation and the new memory."""
        new_memory = None
        if self.plan.uses_memory:
            new_memory = select_memory(self.cfg, self.student, self.records, self.memory,
                                       self.sc, self.device, self.progress)
            if self.t > 0 and self.cfg["memory"]["balanced_finetune"]["enabled"]:
                balanced_finetune(self.cfg, self.student, self.classes, self.sc, new_memory,
                                  self.device, self.step_dir, writer, self.progress)
        evaluation = self.evaluate(self.progress)
        for name, m in evaluation["groups"].items():
            for k, v in m.items():
                if v is not None:
                    writer.add_scalar(f"eval_{name}/{k}", v, result.iterations + self.start_iter)
        return evaluation, new_memory

    def write(self, result, evaluation: dict, new_memory: Memory | None) -> dict:
        """memory.json, checkpoint.pt and, last and atomically, metrics.json (the step is
        complete exactly when it has one); ``last.pt`` goes. Returns the metrics."""
        t, sc, step_dir = self.t, self.sc, self.step_dir
        history = list(self.previous["history"]) if self.previous is not None else []
        history = [h for h in history if h["step"] < t]
        history.append({"step": t, "groups": {k: v["AP"] for k, v in evaluation["groups"].items()
                                              if k.startswith("step_")}})
        metrics = {
            "step": t,
            "method": self.method,
            "classes": {"old": list(sc.old), "new": list(sc.new)},
            "map": {k: evaluation["groups"][k] for k in ("old", "new", "all")},
            "groups": {k: v for k, v in evaluation["groups"].items() if k.startswith("step_")},
            "per_class_ap": evaluation["per_class_ap"],
            "forgetting": _forgetting(history, evaluation["groups"], t),
            "train": {"seconds": round(result.seconds, 2), "iterations": result.iterations,
                      "skipped_steps": result.skipped_steps,
                      "images_per_second": round(result.images_per_second, 2),
                      "images": len(self.loader.dataset),
                      **device_record(self.device, self.cfg["train"]),
                      "keep_freed_memory": self.kept_memory},
        }
        if self.method == "joint":  # which reference this is: equal compute (default) or one step
            metrics["joint_budget"] = self.cfg["incremental"].get("joint_budget", "equal")
        curve_path = step_dir / "curve.jsonl"
        if curve_path.is_file():  # AP during training, then at the end
            metrics["curve"] = [json.loads(line) for line in curve_path.read_text().splitlines()
                                if line.strip()]
            metrics["curve"].append({"iteration": self.total_iters,
                                     "AP": evaluation["groups"]["all"]["AP"]})
        if new_memory is not None:
            atomic_write_json(step_dir / "memory.json",
                              new_memory.to_json(self.cfg["data"]["root"],
                                                 self.train_set.categories, t))
            metrics["memory"] = {"images": len(new_memory),
                                 "replayed_from_previous": 0 if self.memory is None
                                 else len(self.memory)}
        save_checkpoint(step_dir / "checkpoint.pt",
                        dict(self.base, head_layout=head_layout(self.student),
                             head_towers=head_towers(self.student),
                             model=self.student.state_dict(), history=history, train_state=None))
        atomic_write_json(step_dir / "metrics.json", metrics)
        if (step_dir / "last.pt").exists():
            (step_dir / "last.pt").unlink()
        log.info("step %d evaluation (%s):\n%s", t, self.method,
                 format_table(evaluation, self.classes.names))
        return metrics


def _unwrap_sync_bn(model):
    """SyncBatchNorm layers back to BatchNorm2d (same parameters and statistics), so that the
    saved model rebuilds without a process group."""
    if not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
        return model

    def convert(module):
        out = module
        if isinstance(module, torch.nn.SyncBatchNorm):
            out = torch.nn.BatchNorm2d(module.num_features, module.eps, module.momentum,
                                       module.affine, module.track_running_stats)
            out.load_state_dict(module.state_dict())
        for name, child in module.named_children():
            out.add_module(name, convert(child))
        return out

    return convert(model)


def write_memory(cfg: dict, t: int, work_dir: str | Path, progress: bool = True) -> Memory:
    """Select and write ``step_<t>/memory.json`` for a completed step trained without a memory
    (for example a step 0 shared by a variant that uses none). Returns the memory."""
    step_dir = Path(work_dir) / f"step_{t}"
    ckpt = load_checkpoint(step_dir / "checkpoint.pt")
    train_set, _, classes = load_experiment(cfg, progress)
    check_compatible(ckpt, step_dir / "checkpoint.pt", list(classes.order),
                     [list(s) for s in classes.steps], t)
    sc = classes.step(t)
    previous = None
    if t > 0:
        prev_path = Path(work_dir) / f"step_{t - 1}" / "memory.json"
        if not prev_path.is_file():
            raise UserError(f"{prev_path}: missing; the memory of step {t} extends it")
        previous = Memory.from_json(prev_path, cfg["data"]["root"])
    device = resolve_device(cfg["train"]["device"])
    model = model_from_checkpoint(ckpt, cfg, step_dir / "checkpoint.pt").to(device)
    records = filter_for_classes(train_set.records, sc.new)
    memory = select_memory(cfg, model, records, previous, sc, device, progress)
    atomic_write_json(step_dir / "memory.json",
                      memory.to_json(cfg["data"]["root"], train_set.categories, t))
    return memory


def model_from_checkpoint(ckpt: dict, cfg: dict | None = None, source: str = "checkpoint"):
    """Rebuild the model of a checkpoint (on CPU, in eval mode); ``source`` names it in errors."""
    return methods.model_of(cfg or with_defaults(ckpt["config"]), ckpt, source).eval()


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
