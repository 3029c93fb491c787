"""Where a training iteration's time goes: the model's forward/backward vs everything else.

:func:`host_cost` runs the real training loop (:func:`incdet.train.engine.train`) on one fixed
batch of an ``incdet`` step 1 (student and teacher, as
:func:`incdet.bench.training_cost.iteration_cost` builds them) and splits every iteration with
wall-clock marks:

* ``model_forward``: the backbone and head of the student and of the teacher (module hooks);
* ``backward``: from the first loss term's gradient to the last parameter gradient;
* ``host``: everything else: resizing and batching (``transform``), the anchors (``anchors``:
  generated once per batch shape, then looked up), the loss itself (matching, label-space
  masks, focal, box and distillation terms: ``loss``), the optimizer step (``optimizer``) and
  the loop's bookkeeping (gradient clipping, zeroing, the finiteness checks, logging: ``rest``).

On CPU every operation runs synchronously, so the marks are exact; on a GPU they would time the
kernel launches only (use the profiler there). On CPU the host parts include the loss's own
arithmetic, which a GPU would run; what costs host time on a GPU is the number of operators
launched and of synchronisations, so one more iteration counts them (``ops``, ``syncs``: per
part, outside the model's forward and backward). ``page_faults``: the process's minor page faults
per iteration (where the system reports them), which ``train.keep_freed_memory`` cuts; the
measurement follows that key as training does.
"""
from __future__ import annotations

import copy
import statistics
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from incdet.base.devices import seed_everything
from incdet.experiment import methods
from incdet.experiment.loaders import new_class_batch
from incdet.model import builder
from incdet.train.engine import (
    TrainSettings,
    apply_keep_freed_memory,
    build_optimizer,
    build_scheduler,
    train,
)

try:
    import resource  # page faults (Unix)
except ImportError:  # pragma: no cover
    resource = None


class _MarkBackward(torch.autograd.Function):
    """Identity whose backward records when the gradient reaches the loss terms."""

    @staticmethod
    def forward(ctx, x, marks):
        ctx.marks = marks
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.marks["backward_start"] = min(ctx.marks.get("backward_start", float("inf")),
                                          time.perf_counter())
        return grad, None


class _FixedBatches:
    """``iters`` copies of one batch; records the time each is handed out."""

    def __init__(self, images, targets, iters: int, faults: bool = False):
        self.images, self.targets, self.iters = images, targets, iters
        self.starts: list[float] = []
        self.faults: list[int] = []  # the process's minor page faults so far, with ``faults``
        self.count_faults = faults and resource is not None

    def __iter__(self):
        for _ in range(self.iters):
            if self.count_faults:
                self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
            self.starts.append(time.perf_counter())
            yield list(self.images), [dict(t) for t in self.targets]


# operators that make the host wait for the device (a value or an output size read back)
_SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item")


def _synchronises(func, args) -> bool:
    """Whether an operator reads a value or an output size back from the device (indexing
    with a boolean mask does: its output size)."""
    name = str(func)
    if name.startswith(_SYNCS):
        return True
    return name.startswith(("aten.index.Tensor", "aten.index_put")) and len(args) > 1 and \
        any(torch.is_tensor(i) and i.dtype == torch.bool for i in args[1] or ())


class _OpCounter(TorchDispatchMode):
    """Counts the operators dispatched while ``active()``, by part: the innermost timed module
    (``where`` stack), ``backward`` inside the autograd engine, ``loss`` inside the criterion
    and ``loop`` otherwise; and the synchronising ones among them."""

    def __init__(self, where: list, active):
        super().__init__()
        self.where, self.active = where, active
        self.ops: dict[str, int] = defaultdict(int)
        self.syncs: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.active():
            if torch._C._current_graph_task_id() != -1:
                part = "backward"
            else:
                part = self.where[-1] if self.where else "loop"
            self.ops[part] += 1
            if _synchronises(func, args):
                self.syncs[part] += 1
        return func(*args, **(kwargs or {}))


def _timed(module: torch.nn.Module, name: str, spans: dict, where: list) -> list:
    """Forward hooks adding ``module``'s forward seconds to ``spans[name]`` (and ``name`` to
    the ``where`` stack while it runs)."""
    start = {}

    def pre(*_):
        where.append(name)
        start["t"] = time.perf_counter()

    def post(*_):
        spans[name] += time.perf_counter() - start["t"]
        where.pop()

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


# functions of incdet.model.builder on the training path -> the part they are timed as
_TIMED_FUNCTIONS = {"batch_transform": "transform", "batch_anchors": "anchors"}


def _timed_function(fn, part: str, spans: dict, where: list):
    """``fn`` adding its seconds to ``spans[part]`` (and ``part`` to the ``where`` stack while
    it runs)."""
    def timed(*args, **kwargs):
        where.append(part)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spans[part] += time.perf_counter() - t0
            where.pop()

    return timed


def host_cost(cfg: dict, iters: int = 5, warmup: int = 2, batch_size: int = 16,
              threads: int | None = 1, progress: bool = False) -> dict:
    """Median seconds per training iteration of an ``incdet`` step 1 on one fixed batch of
    ``batch_size`` images, split into model forward, backward and host parts (module docstring).
    ``threads``: torch intra-op threads for the measurement (restored after)."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    # as training does (run_step): the allocator's settings change page faults, so timings
    kept = apply_keep_freed_memory(cfg["train"], "cpu")
    try:
        out = _host_cost(copy.deepcopy(cfg), iters, warmup, batch_size, progress)
    finally:
        torch.set_num_threads(old_threads)
    out["keep_freed_memory"] = kept
    return out


def _host_cost(cfg: dict, iters: int, warmup: int, batch_size: int, progress: bool) -> dict:
    seed_everything(0)
    tcfg = dict(cfg["train"], batch_size=batch_size, lr=1e-4, warmup_iters=0)
    classes, sc, plan, images, targets = new_class_batch(cfg, batch_size, progress=progress)
    previous = {"model": methods.build_model(cfg["model"], [len(sc.old)]).state_dict(),
                "head_layout": [len(sc.old)]}
    student = methods.build_student(cfg, sc, plan, previous)
    teacher = methods.build_teacher(cfg, previous)
    criterion = methods.make_criterion(cfg, student, teacher, plan, classes, sc)

    spans: dict[str, float] = defaultdict(float)
    per_iter: list[dict] = []
    marks: dict[str, float] = {}
    hooks, where = [], []
    for module in (student.backbone, student.head, teacher.backbone, teacher.head):
        hooks += _timed(module, "model_forward", spans, where)
    # the training path's transform and anchors (functions that forward_train looks up at
    # each call), timed for the length of the run
    untimed = {name: getattr(builder, name) for name in _TIMED_FUNCTIONS}
    for name, part in _TIMED_FUNCTIONS.items():
        setattr(builder, name, _timed_function(untimed[name], part, spans, where))

    def last_grad(_):
        marks["backward_end"] = time.perf_counter()

    hooks += [p.register_post_accumulate_grad_hook(last_grad)
              for p in student.parameters() if p.requires_grad]
    optimizer = build_optimizer(student, tcfg)

    def step_start(*_):
        marks["step_start"] = time.perf_counter()

    def step_end(*_):
        spans["optimizer"] += time.perf_counter() - marks["step_start"]

    hooks += [optimizer.register_step_pre_hook(step_start),
              optimizer.register_step_post_hook(step_end)]

    def loss_fn(images, targets):
        if marks:  # the previous iteration's backward, now complete
            spans["backward"] += marks["backward_end"] - marks["backward_start"]
        per_iter.append(spans.copy())
        spans.clear()
        marks.clear()
        t0 = time.perf_counter()
        where.append("loss")
        try:
            losses = criterion(images, targets)
        finally:
            where.pop()
        spans["loss_fn"] += time.perf_counter() - t0
        return {k: _MarkBackward.apply(v, marks) for k, v in losses.items()}

    total = warmup + iters + 1  # the last iteration is not timed (no next batch marks its end)
    loader = _FixedBatches(images, targets, total, faults=True)
    scheduler = build_scheduler(optimizer, tcfg, total)
    weights = dict(cfg["loss"]["weights"])
    # the operators of one iteration (the second of three), in a run of its own
    counted = _FixedBatches(images, targets, 3)
    counter = _OpCounter(where, lambda: len(counted.starts) == 2)
    try:
        train(student, loss_fn, loader, optimizer, scheduler,
              TrainSettings(tcfg=tcfg, weights=weights, total_iters=total, device="cpu",
                            progress=progress))
        with counter:
            train(student, loss_fn, counted, optimizer, build_scheduler(optimizer, tcfg, 3),
                  TrainSettings(tcfg=tcfg, weights=weights, total_iters=3, device="cpu",
                                progress=progress))
    finally:
        for name, fn in untimed.items():
            setattr(builder, name, fn)
        for h in hooks:
            h.remove()

    rows = []
    # per_iter[i + 1] holds iteration i's spans; loader.starts[i + 1] ends it
    for i in range(warmup, warmup + iters):
        s = per_iter[i + 1]
        seconds = loader.starts[i + 1] - loader.starts[i]
        loss = s["loss_fn"] - s["model_forward"] - s["transform"] - s["anchors"]
        row = {"iteration": seconds, "model_forward": s["model_forward"],
               "backward": s["backward"], "transform": s["transform"], "anchors": s["anchors"],
               "loss": loss, "optimizer": s["optimizer"],
               "rest": seconds - s["loss_fn"] - s["backward"] - s["optimizer"]}
        row["host"] = seconds - row["model_forward"] - row["backward"]
        if loader.faults:
            row["page_faults"] = loader.faults[i + 1] - loader.faults[i]
        rows.append(row)
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    if "page_faults" in out:
        out["page_faults"] = int(out["page_faults"])
    out.update(batch_size=len(images), iters=iters, threads=torch.get_num_threads())
    out["host_share"] = out["host"] / out["iteration"]
    host_parts = ("transform", "anchors", "loss", "loop")
    out["ops"] = {k: counter.ops[k] for k in host_parts}
    out["syncs"] = {k: counter.syncs[k] for k in host_parts}
    out["ops"]["model_forward"], out["ops"]["backward"] = \
        counter.ops["model_forward"], counter.ops["backward"]
    return out
