"""The training loop: optimizer, warm-up + cosine/step schedule, logging, non-finite checks.

``train`` is method-agnostic: it calls ``loss_fn(images, targets) -> dict[str, Tensor]`` (keys
``loss_*``) and minimises the weighted sum with weights from ``loss.weights``. Each loss term is
logged raw and weighted to TensorBoard (every ``train.log_every`` iterations) and as one JSON line
per epoch in ``log.jsonl``.

Keeping the device fed: the loss terms are summed on the device (:class:`LossSums`) and read back
only every ``train.log_every`` iterations and at epoch ends. One host synchronisation per
iteration stays, deliberately: the non-finite check of the total loss, taken after the backward
pass has been queued (the device works on it meanwhile) and before the optimizer steps, so that a
non-finite loss never changes the weights and stops training at the iteration it occurred
(a device-side flag checked every ``log_every`` iterations would need the optimizer step to be
skipped on the device, and would name the failure late). The same read-back carries the
finiteness of the gradient norm (with ``train.grad_clip``): a finite loss whose gradient
overflowed (seen with bf16 autocast on a freshly initialised model) skips its optimizer step
instead of writing NaN into the weights, with a warning; ``log.jsonl`` counts such steps
(``skipped_steps``, cumulative). fp16's gradient scaler skips them itself.

Gradient clipping with a fused optimizer (the default on CPU and CUDA) is folded into the step:
the total norm is computed, and the fused kernel divides every gradient by ``max(norm / clip, 1)``
as it reads it (``optimizer.grad_scale``: the mechanism torch's GradScaler uses with fused
optimizers, which also multiplies in a user's own), instead of ``clip_grad_norm_`` rescaling
every gradient in a pass of its own. With fp16's gradient scaler, or an optimizer that is not
fused, ``clip_grad_norm_`` clips as usual.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from incdet.base.errors import UserError, check_choice
from incdet.model.builder import keep_frozen_norms

# glibc's mallopt parameters and the values train.keep_freed_memory sets
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
KEPT_MEMORY = {_M_MMAP_THRESHOLD: 32 << 20,  # the largest glibc accepts
               _M_TRIM_THRESHOLD: 1 << 30, _M_TOP_PAD: 256 << 20}


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next allocation instead of returning it
    to the system (``train.keep_freed_memory``); returns whether it applied (False without
    glibc). Process-wide and for the rest of the process.

    By default glibc serves each allocation above a threshold with a fresh mapping and trims
    the top of its heap as soon as enough of it is free, so a training iteration, which frees
    and reallocates the same large activations, pays for their pages again every time: about
    20 000 to 24 000 page faults per iteration of the CPU preset (step 1, batch 16), under 1 000
    with these settings: the iteration is 11-19 % faster, training end to end about 8 %
    (docs/benchmarks.md). Freed memory is then kept up to 1 GiB; the peak (what the process
    needs anyway) is unchanged. Off by default: with it, a test's short training varied more
    from run to run (docs/benchmarks.md).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(k, v) == 1 for k, v in KEPT_MEMORY.items()])


def apply_keep_freed_memory(tcfg: dict, device) -> bool:
    """``train.keep_freed_memory`` for training on ``device``: :func:`keep_freed_memory` when
    the key is set and the device is the CPU (on a GPU the host allocates little per iteration;
    not measured). Returns whether it applied."""
    return bool(tcfg.get("keep_freed_memory")) and torch.device(device).type == "cpu" and \
        keep_freed_memory()


def apply_deterministic(tcfg: dict) -> bool:
    """``train.deterministic``: torch's deterministic algorithms for the rest of the process
    (an operator without one raises), cuBLAS's fixed workspace (before its first use) and no
    cuDNN autotuning. Returns whether it applied."""
    if not tcfg.get("deterministic"):
        return False
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    return True


def resolve_num_workers(value) -> int:
    """``train.num_workers``: a count, or ``auto``: the CPU cores this process may use (divided
    among the processes of a torchrun launch on this machine), one left for the training loop,
    at least 1 and at most 8."""
    if value == "auto":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        return min(8, max(1, cores - 1))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"train.num_workers: {value!r} is not a number of loader processes "
                        "(0 or more) or auto")
    return value


def precision_name(tcfg: dict, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16``: the precision ``train.amp`` trains in."""
    dtype = autocast_dtype(tcfg, device)
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def device_record(device, tcfg: dict) -> dict:
    """What a step trained on, for ``metrics.json``: ``device`` (``cpu``, ``cuda:0``), its
    ``device_name``, the ``precision`` and the ``peak_gpu_memory_gib`` allocated since
    :func:`reset_peak_memory` (None on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return {"device": f"cuda:{index}", "device_name": torch.cuda.get_device_name(index),
                "precision": precision_name(tcfg, device),
                "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(index) / 2**30, 3)}
    return {"device": device.type, "device_name": platform.processor() or device.type,
            "precision": precision_name(tcfg, device), "peak_gpu_memory_gib": None}


def reset_peak_memory(device) -> None:
    """Start counting the peak GPU memory of :func:`device_record` afresh (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def autocast_dtype(tcfg: dict, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` (null: full precision; ``auto``: bf16 on a CUDA
    device that supports it, full precision elsewhere, CPU included)."""
    amp = tcfg.get("amp")
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if amp in (None, False, "none"):
        return None
    if amp not in ("bf16", "fp16"):
        raise UserError(f"train.amp: {amp!r} is not one of null, auto, bf16, fp16")
    if amp == "fp16" and device.type != "cuda":
        raise UserError("train.amp: fp16 needs a CUDA device; use bf16 on CPU, or null")
    return torch.bfloat16 if amp == "bf16" else torch.float16


BODY_PREFIXES = ("backbone.body.", "backbone.body_branches.")  # the backbone's body (not its FPN)


def build_optimizer(model: torch.nn.Module, tcfg: dict) -> torch.optim.Optimizer:
    """AdamW or SGD; biases and norm weights without weight decay; the backbone body's parameters
    at ``train.lr * train.backbone_lr_scale`` (a pretrained body fine-tunes slower than the
    layers trained from scratch on top of it)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scale = float(tcfg.get("backbone_lr_scale", 1.0))
    # one part (the exact groups of before the setting existed) unless the body's rate differs
    parts = [named] if scale == 1.0 else \
        [[(n, p) for n, p in named if n.startswith(BODY_PREFIXES) == body] for body in (0, 1)]
    groups = []
    for body, part in enumerate(parts):
        lr = tcfg["lr"] * (scale if body else 1.0)
        # biases and norm weights: no weight decay
        groups += [{"params": [p for _, p in part if p.ndim > 1], "lr": lr,
                    "weight_decay": tcfg["weight_decay"]},
                   {"params": [p for _, p in part if p.ndim <= 1], "lr": lr, "weight_decay": 0.0}]
    params = [p for _, p in named]
    # the fused kernels update every parameter in one call: a 4x faster AdamW step on CPU
    # (about 25 -> 6 ms per iteration for the CPU preset), the same arithmetic
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    check_choice("train.optimizer", tcfg["optimizer"], ("sgd", "adamw"))
    if tcfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=tcfg["lr"], momentum=tcfg["momentum"], fused=fused)
    return torch.optim.AdamW(groups, lr=tcfg["lr"], fused=fused)


def lr_factor(it: int, total: int, tcfg: dict) -> float:
    """Learning-rate multiplier at iteration ``it`` of ``total``: linear warm-up from
    ``warmup_factor``, then cosine to 0 or steps of ``lr_gamma`` at fractions ``lr_steps``
    (``train.schedule`` is checked once, by :func:`build_scheduler`)."""
    warm = min(int(tcfg["warmup_iters"]), max(total - 1, 0))
    if it < warm:
        alpha = it / warm
        return tcfg["warmup_factor"] * (1 - alpha) + alpha
    if tcfg["schedule"] == "cosine":
        span = max(total - warm, 1)
        return 0.5 * (1 + math.cos(math.pi * min(it - warm, span) / span))
    return tcfg["lr_gamma"] ** sum(it >= f * total for f in tcfg["lr_steps"])


def build_scheduler(optimizer, tcfg: dict, total: int):
    check_choice("train.schedule", tcfg["schedule"], ("cosine", "step"))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total, tcfg))


def loss_weights(losses, weights: dict[str, float]) -> dict[str, float]:
    """The weight of each loss term: its own key, or for ``name_<digits>`` the key ``name``."""
    out = {}
    for k in losses:
        base = k.rstrip("0123456789").rstrip("_") if k[-1:].isdigit() else k
        if k in weights:
            out[k] = float(weights[k])
        elif base in weights:
            out[k] = float(weights[base])
        else:
            raise KeyError(f"no weight configured for loss term {k!r}")
    return out


def weighted_total(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    w = loss_weights(losses, weights)
    return sum(w[k] * v for k, v in losses.items())


def batch_to(images, targets, device: torch.device) -> tuple[list, list[dict]]:
    """A loader batch on ``device``: the images, and every tensor of every target."""
    return ([img.to(device, non_blocking=True) for img in images],
            [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
              for k, v in t.items()} for t in targets])


class LossSums:
    """Per-epoch sums of the loss terms and the total, kept on the device and read back only
    when asked. The sums are float64 and add the float32 values one by one, exactly as a Python
    float sum of their ``.item()`` would."""

    def __init__(self):
        self.keys: tuple[str, ...] = ()
        self.device_sums: torch.Tensor | None = None
        self.host: dict[str, float] = {}

    def add(self, losses: dict[str, torch.Tensor], total: torch.Tensor) -> torch.Tensor:
        """Add one iteration; returns its values, (len(losses) + 1,) float64, still on the
        device (the last one is the total)."""
        keys = tuple(losses) + ("loss",)
        values = torch.stack([v.detach() for v in losses.values()] + [total.detach()])
        values = values.to(torch.float64)
        if keys != self.keys:  # new terms (never within one criterion): start a new sum
            self._flush()
            self.keys, self.device_sums = keys, torch.zeros_like(values)
        self.device_sums += values
        return values

    def _flush(self) -> None:
        if self.device_sums is not None:
            for k, v in zip(self.keys, self.device_sums.tolist()):
                self.host[k] = self.host.get(k, 0.0) + v
        self.keys, self.device_sums = (), None

    def sums(self) -> dict[str, float]:
        """The sums so far, on the host (one synchronisation)."""
        self._flush()
        return dict(self.host)


@dataclass
class TrainResult:
    iterations: int = 0
    seconds: float = 0.0
    images: int = 0
    epochs: list[dict] = field(default_factory=list)
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite gradient norm

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def clip_factor(trainable: list[torch.Tensor], clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm, divisor)``: the total 2-norm of the gradients of ``trainable``, and
    ``max((norm + 1e-6) / clip, 1)``, the divisor by which ``clip_grad_norm_(trainable, clip)``
    would scale them (it multiplies by ``clip / (norm + 1e-6)`` when that is below 1)."""
    grads = [p.grad for p in trainable if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    return norm, ((norm + 1e-6) / clip).clamp(min=1.0)


@dataclass
class TrainSettings:
    """What one run of :func:`train` is: its settings, length and device, where it logs, where
    it starts (a resumed run) and what it calls back; callers name the fields they set."""

    tcfg: dict  # the config's train section
    weights: dict[str, float]  # the weight of each loss term (loss.weights)
    total_iters: int  # train until this iteration
    device: torch.device | str
    log_dir: Path | None = None  # log.jsonl goes here; None: no file (the non-main processes)
    writer: object = None  # a TensorBoard SummaryWriter, or None
    progress: bool = True  # a progress bar
    start_iter: int = 0  # where a resumed run starts
    start_epoch: int = 0
    # (epoch_rng_state, batches_done): the shuffling state of an interrupted epoch and the
    # batches of it already trained on, restored into shuffle_generator (the loader's)
    resume_position: tuple[torch.Tensor, int] | None = None
    shuffle_generator: torch.Generator | None = None
    on_epoch_end: Callable | None = None  # on_epoch_end(epoch, iteration)
    # on_checkpoint(epoch, iteration, (epoch_rng_state, batches_done))
    on_checkpoint: Callable | None = None


def train(model: torch.nn.Module, loss_fn: Callable, loader, optimizer, scheduler,
          settings: TrainSettings) -> TrainResult:
    """Train until ``settings.total_iters`` iterations; returns counts and timing of this call.

    ``settings.on_epoch_end`` is called after every epoch and ``settings.on_checkpoint`` every
    ``train.checkpoint_every`` iterations (checkpointing). ``settings.resume_position`` restores
    the shuffling state of an interrupted epoch and skips the batches it had already trained
    on. A non-finite loss raises :class:`UserError` with every loss term in the message before
    the optimizer steps; nothing is saved for the failing iteration, so the last checkpoint
    stays the last good one. Loss values are read back from the device every
    ``train.log_every`` iterations (TensorBoard, progress bar) and at epoch ends
    (``log.jsonl``) only; the finiteness check is the loop's one synchronisation per iteration
    (module docstring; the loss function may add its own: incdet's adds two).
    """
    tcfg, weights, total_iters = settings.tcfg, settings.weights, settings.total_iters
    log_dir, writer, progress = settings.log_dir, settings.writer, settings.progress
    start_iter, start_epoch = settings.start_iter, settings.start_epoch
    on_epoch_end, on_checkpoint = settings.on_epoch_end, settings.on_checkpoint
    shuffle_generator, resume_position = settings.shuffle_generator, settings.resume_position
    result = TrainResult()
    it, epoch = start_iter, start_epoch
    clip = tcfg.get("grad_clip")
    log_every = max(1, int(tcfg["log_every"]))
    bar = tqdm(total=total_iters, initial=it, desc="training", disable=not progress,
               dynamic_ncols=True)
    t_start = time.perf_counter()
    every = int(tcfg.get("checkpoint_every") or 0)
    device = torch.device(settings.device)
    amp_dtype = autocast_dtype(tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    check_grad = bool(clip) and not scaler.is_enabled()  # fp16's scaler checks itself
    # clipping inside the fused optimizer's step (module docstring)
    fold_clip = check_grad and all(g.get("fused") for g in optimizer.param_groups)
    skip = 0
    if resume_position is not None and shuffle_generator is not None:
        shuffle_generator.set_state(resume_position[0])
        skip = int(resume_position[1])
    while it < total_iters:
        model.train()
        keep_frozen_norms(model)
        sums = LossSums()
        n_batches, t_epoch, epoch_images = 0, time.perf_counter(), 0
        epoch_rng = shuffle_generator.get_state() if shuffle_generator is not None else None
        yielded = 0
        for b, (images, targets) in enumerate(loader):
            yielded += 1
            if b < skip:  # already trained on before the interruption
                continue
            images, targets = batch_to(images, targets, device)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                losses = loss_fn(images, targets)
            losses = {k: v.float() for k, v in losses.items()}
            total = weighted_total(losses, weights)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            flags = torch.isfinite(total).int()  # bit 0: a finite loss
            divisor = None
            if fold_clip:
                norm, divisor = clip_factor(trainable, float(clip))
            elif clip:
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(trainable, float(clip))
            if check_grad:  # bit 1: a finite gradient norm
                flags = flags + 2 * torch.isfinite(norm).int()
            # the one synchronisation of an iteration: the device runs the backward meanwhile
            flags = int(flags)
            if not flags & 1:
                terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                raise UserError(f"non-finite loss at iteration {it} ({terms}); training stopped "
                                "and the last good checkpoint is kept: lower train.lr or "
                                "check the data")
            if flags & 2 or not check_grad:
                if divisor is not None:
                    optimizer.grad_scale = divisor
                try:
                    scaler.step(optimizer)
                finally:
                    if divisor is not None:  # never left behind for a later step
                        del optimizer.grad_scale
            else:  # a finite loss whose gradient overflowed: this step would write NaN weights
                result.skipped_steps += 1
                if result.skipped_steps == 1:
                    warnings.warn(f"iteration {it}: the gradient norm is not finite (the loss "
                                  "is); the optimizer step is skipped (log.jsonl counts such "
                                  "steps: skipped_steps)", RuntimeWarning, stacklevel=2)
            scaler.update()
            scheduler.step()
            it += 1
            n_batches += 1
            epoch_images += len(images)
            term_w = loss_weights(losses, weights)
            on_device = sums.add(losses, total)
            if it % log_every == 0:
                values = dict(zip(list(losses) + ["loss"], on_device.tolist()))
                if writer is not None:
                    for k in losses:
                        writer.add_scalar(f"train_raw/{k}", values[k], it)
                        writer.add_scalar(f"train_weighted/{k}", term_w[k] * values[k], it)
                    writer.add_scalar("train/loss", values["loss"], it)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], it)
                bar.set_postfix(loss=f"{values['loss']:.3f}",
                                lr=f"{optimizer.param_groups[0]['lr']:.2g}")
            bar.update(1)
            if it >= total_iters:
                break
            if every and on_checkpoint is not None and it % every == 0:
                on_checkpoint(epoch, it, (epoch_rng, b + 1))
        resumed_at_end, skip = yielded > 0 and yielded <= skip, 0
        seconds = time.perf_counter() - t_epoch
        result.images += epoch_images
        if n_batches == 0 and resumed_at_end:
            # interrupted after this epoch's last batch but before its end was recorded: the
            # epoch is done (its loss sums went with the process: no log line)
            epoch += 1
            if on_epoch_end is not None:
                on_epoch_end(epoch, it)
            continue
        if n_batches == 0:
            raise UserError("the training set is empty; check the split and the annotations")
        line = {"epoch": epoch, "iteration": it, "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(seconds, 2),
                "images_per_second": round(epoch_images / max(seconds, 1e-9), 2),
                "skipped_steps": result.skipped_steps}
        epoch_sums = sums.sums()
        line.update({f"{k}": round(v / n_batches, 5) for k, v in epoch_sums.items()})
        line.update({f"{k}_weighted": round(term_w[k] * v / n_batches, 5)
                     for k, v in epoch_sums.items() if k != "loss"})
        result.epochs.append(line)
        if log_dir is not None:  # None on the non-main processes of a distributed run
            with open(log_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
        epoch += 1
        if on_epoch_end is not None:
            on_epoch_end(epoch, it)
    bar.close()
    result.iterations = it - start_iter
    result.seconds = time.perf_counter() - t_start
    return result
