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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from incdet.base import distributed as dist
from incdet.base.config import dump_config, strip_private
from incdet.base.devices import resolve_device, seed_everything
from incdet.base.errors import UserError
from incdet.data.classes import ClassSpace
from incdet.data.disjoint import training_records
from incdet.data.sampler import check_replay_mode
from incdet.evaluation.coco_eval import evaluate_model, format_table
from incdet.experiment import methods
from incdet.experiment.evaluate import metric_groups
from incdet.experiment.exemplars import balanced_finetune, select_memory
from incdet.experiment.loaders import _shuffle_generator, load_experiment, train_loader
from incdet.experiment.step_folder import check_same_config, completed, write_step
from incdet.model.builder import head_record, keep_frozen_norms
from incdet.model.checkpoint import (
    check_compatible,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
)
from incdet.train.engine import (
    TrainSettings,
    apply_deterministic,
    apply_keep_freed_memory,
    build_optimizer,
    build_scheduler,
    reset_peak_memory,
    resolve_num_workers,
    train,
)
from incdet.train.memory import Memory

log = logging.getLogger(__name__)


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
    done = completed(metrics_path.parent, cfg, force and dist.is_main())
    if done is not None:
        log.info("step %d is already complete with this config (%s); pass --force to train it "
                 "again", t, metrics_path)
        return done
    run = StepRun.prepare(cfg, t, Path(work_dir), progress)
    run.restore(resume and not force)
    if not run.main:
        run.train(None)
        dist.barrier()
        return json.loads(metrics_path.read_text())
    from torch.utils.tensorboard import SummaryWriter  # heavy: loaded only by the process that logs

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
        check_eval_schedule(cfg)
        device, kept_memory = setup_process(tcfg, t)
        main = dist.is_main()
        if not main:
            dist.barrier()  # rank 0 generates the built-in dataset first when it is missing
        train_set, val_set, classes = load_experiment(cfg, progress and main)
        if main:
            dist.barrier()
        sc = classes.step(t)
        plan = methods.plan_step(cfg["incremental"]["method"], classes, sc,
                                 methods.memory_enabled(cfg))
        if plan.uses_memory:  # a wrong setting fails now, not after the step has trained
            check_replay_mode(cfg["memory"]["replay_mode"])
        previous, prev_path = previous_checkpoint(work_dir, t, classes, plan)
        records = step_records(train_set, plan, t, classes, cfg["data"]["disjoint_steps"])
        memory = previous_memory(cfg, work_dir, t, plan)
        loader = train_loader(cfg, classes, records, plan.label_space, memory, seed=t,
                              device=device)
        student, loss_fn = build_models(cfg, classes, sc, plan, previous, prev_path, device)
        total_iters = methods.training_budget(cfg, classes, train_set.records, t, len(loader))
        optimizer = build_optimizer(student, methods.optimizer_settings(cfg, plan))
        scheduler = build_scheduler(optimizer, tcfg, total_iters)
        if main:
            (work_dir / f"step_{t}").mkdir(parents=True, exist_ok=True)
            dump_config(cfg, work_dir / f"step_{t}" / "config.yaml")
        dist.barrier()
        base = {"step": t, "class_order": list(classes.order),
                "steps": [list(s) for s in classes.steps], "names": classes.to_dict()["names"],
                "config": strip_private(cfg), "method": cfg["incremental"]["method"]}
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
            check_same_config(last_path, state.get("config"), self.cfg, "was interrupted")
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
        settings = TrainSettings(
            tcfg=self.cfg["train"], weights=dict(self.cfg["loss"]["weights"]),
            total_iters=self.total_iters, device=self.device, progress=False,
            start_iter=self.start_iter, start_epoch=self.start_epoch,
            resume_position=self.resume_position,
            shuffle_generator=_shuffle_generator(self.loader))
        if not self.main:
            return train(self.student, self.loss_fn, self.loader, self.optimizer,
                         self.scheduler, settings)
        settings = replace(settings, log_dir=self.step_dir, writer=writer,
                           progress=self.progress, on_epoch_end=self.save_last,
                           on_checkpoint=self.on_checkpoint)
        result = train(self.student, self.loss_fn, self.loader, self.optimizer, self.scheduler,
                       settings)
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
                        dict(self.base, **head_record(self.student),
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
            "step": t, "method": self.method,
            "classes": {"old": list(sc.old), "new": list(sc.new)},
            "map": {k: evaluation["groups"][k] for k in ("old", "new", "all")},
            "groups": {k: v for k, v in evaluation["groups"].items() if k.startswith("step_")},
            "per_class_ap": evaluation["per_class_ap"],
            "forgetting": _forgetting(history, evaluation["groups"], t),
        }
        if self.method == "joint":  # which reference this is: equal compute (default) or one step
            metrics["joint_budget"] = self.cfg["incremental"].get("joint_budget", "equal")
        curve_path = step_dir / "curve.jsonl"
        if curve_path.is_file():  # AP during training, then at the end
            metrics["curve"] = [json.loads(line) for line in curve_path.read_text().splitlines()
                                if line.strip()]
            metrics["curve"].append({"iteration": self.total_iters,
                                     "AP": evaluation["groups"]["all"]["AP"]})
        memory_json = None
        if new_memory is not None:
            memory_json = new_memory.to_json(self.cfg["data"]["root"], self.train_set.categories,
                                             t)
            metrics["memory"] = {"images": len(new_memory),
                                 "replayed_from_previous": 0 if self.memory is None
                                 else len(self.memory)}
        ckpt = dict(self.base, **head_record(self.student), model=self.student.state_dict(),
                    history=history)
        train = {"seconds": result.seconds, "iterations": result.iterations,
                 "skipped_steps": result.skipped_steps,
                 "images_per_second": result.images_per_second,
                 "images": len(self.loader.dataset), "keep_freed_memory": self.kept_memory}
        metrics = write_step(step_dir, self.cfg, ckpt, metrics, self.device, train, memory_json)
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


# The phases of StepRun.prepare, in order.

def check_eval_schedule(cfg: dict) -> None:
    """``eval.every_iters`` evaluates at checkpoints: it must be a multiple of
    ``train.checkpoint_every``."""
    tcfg = cfg["train"]
    every_eval = int(cfg["eval"].get("every_iters") or 0)
    if every_eval and (not tcfg.get("checkpoint_every") or
                       every_eval % int(tcfg["checkpoint_every"])):
        raise UserError(f"eval.every_iters: {every_eval} must be a multiple of "
                        f"train.checkpoint_every ({tcfg.get('checkpoint_every')}): "
                        "evaluation happens at checkpoints")


def setup_process(tcfg: dict, t: int) -> tuple[torch.device, bool]:
    """Threads, deterministic algorithms (``train.deterministic``), the device (and process
    group), glibc's memory setting, peak-memory counters and the step's seed. Returns the device
    and whether ``train.keep_freed_memory`` applied."""
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))
    apply_deterministic(tcfg)
    device = resolve_device(dist.setup(tcfg["device"]))
    kept_memory = apply_keep_freed_memory(tcfg, device)
    reset_peak_memory(device)  # metrics.json reports this step's peak
    seed_everything(int(tcfg["seed"]) + t)
    return device, kept_memory


def previous_checkpoint(work_dir: Path, t: int, classes: ClassSpace,
                        plan: methods.Plan) -> tuple[dict | None, Path | None]:
    """Step ``t - 1``'s checkpoint and its path, checked against this experiment, when the
    method starts from it; else ``(None, None)``."""
    if not plan.uses_previous:
        return None, None
    prev_path = work_dir / f"step_{t - 1}" / "checkpoint.pt"
    if not prev_path.is_file():
        raise UserError(f"{prev_path}: missing; run step {t - 1} first (same --work-dir)")
    previous = load_checkpoint(prev_path)
    check_compatible(previous, prev_path, list(classes.order), [list(s) for s in classes.steps],
                     t - 1)
    return previous, prev_path


def step_records(train_set, plan: methods.Plan, t: int, classes: ClassSpace,
                 disjoint: bool = False) -> list:
    """The step's training images: those with a box of the classes it trains on; with
    ``disjoint`` (``data.disjoint_steps``) only those of the steps it trains (design.md,
    "Disjoint steps")."""
    records = training_records(train_set.records, classes.steps, plan.train_classes, disjoint)
    if not records:
        raise UserError(f"{train_set.source}: step {t} has no training image with a box of "
                        f"its classes {list(plan.train_classes)}"
                        + (" that belongs to it (data.disjoint_steps)" if disjoint else "")
                        + "; check the split")
    return records


def previous_memory(cfg: dict, work_dir: Path, t: int, plan: methods.Plan) -> Memory | None:
    """The memory step ``t - 1`` selected, when the method replays one."""
    if not (plan.uses_memory and t > 0):
        return None
    mem_path = work_dir / f"step_{t - 1}" / "memory.json"
    if not mem_path.is_file():
        raise UserError(f"{mem_path}: missing; step {t - 1} was trained without a memory: "
                        "retrain it with memory.budget set, or set memory.budget: 0")
    return Memory.from_json(mem_path, cfg["data"]["root"])


def build_models(cfg: dict, classes: ClassSpace, sc, plan: methods.Plan, previous: dict | None,
                 prev_path: Path | None, device: torch.device):
    """The student (on ``device``) and the loss function that trains it (with the teacher and,
    with several processes, DistributedDataParallel inside). Returns ``(student, loss_fn)``."""
    tcfg = cfg["train"]
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
    return student, loss_fn
