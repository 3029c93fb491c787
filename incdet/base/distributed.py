"""Multi-process training with ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node=N tools/train_step.py ...`` sets ``WORLD_SIZE`` / ``RANK`` /
``LOCAL_RANK``; :func:`setup` then joins the process group (``gloo`` on CPU, ``nccl`` on GPUs;
several machines through torchrun's own ``--nnodes`` / ``--rdzv-*`` options). Decisions:

* **Batches.** Every process draws the same global batch sequence (same seed) of
  ``N x train.batch_size`` images, from the step's data and the memory alike, and keeps its own
  slice (:class:`ShardedBatchSampler`): no image is seen by two processes, the last incomplete
  global batch of an epoch is dropped as with one process, and the memory share of a batch holds
  globally. ``train.batch_size`` is per process; scale ``train.lr``
  with N as usual.
* **Losses.** The focal and box losses are normalised by the number of foreground anchors of the
  *global* batch (all-reduced), so the DDP-averaged gradient equals the gradient of one process on
  the whole batch (tested). BatchNorm statistics stay per process (``train.sync_bn: true``
  converts them to SyncBatchNorm on GPUs); GroupNorm layers are batch-independent.
* **Teacher.** Each process holds its own frozen teacher (it is not a DDP module).
* **Writing.** Only rank 0 writes checkpoints, logs, TensorBoard events, the memory and the
  metrics, and it alone evaluates and selects the memory (on every image, so nothing is duplicated
  or missing); the other processes wait at a barrier and then read the finished step.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device_name: str = "auto") -> str:
    """Join the process group when launched by torchrun; returns the device to use."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device_name
    use_cuda = torch.cuda.is_available() and device_name in ("auto",) or \
        str(device_name).startswith("cuda")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device_name = f"cuda:{local}"
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return device_name


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def global_count(n: torch.Tensor) -> torch.Tensor:
    """A count held on the device (such as foreground anchors) averaged over processes, as a
    float32 0-dim tensor on that device: the per-process normaliser that makes DDP's gradient
    mean equal the whole-batch gradient, ``sum_r n_r / world``. Never read back to the host
    (the reduction is queued on the device's stream)."""
    w = world_size()
    if w == 1:
        return n.float()
    t = n.detach().to(torch.float64).reshape(1)
    dist.all_reduce(t)
    return (t[0] / w).float()


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Takes batches of ``world x B`` indices from ``inner`` and yields this process's slice."""

    def __init__(self, inner, rank_: int, world: int):
        self.inner, self.rank, self.world = inner, rank_, world
        self.generator = getattr(inner, "generator", None)

    def __iter__(self):
        for batch in self.inner:
            part = list(batch)[self.rank::self.world]
            if part:
                yield part

    def __len__(self) -> int:
        return len(self.inner)


class LossModule(nn.Module):
    """The student as a module whose forward returns the loss terms, so that DDP wraps one
    forward call (its gradient hooks need it); the criterion, teacher included, is not a
    submodule."""

    def __init__(self, student: nn.Module, criterion):
        super().__init__()
        self.student = student
        self._criterion = [criterion]

    def forward(self, images, targets):
        return self._criterion[0](images, targets)


def wrap(student: nn.Module, criterion, device):
    """``(loss_fn, ddp_module or None)``: the DDP-wrapped loss under several processes."""
    if world_size() == 1:
        return criterion, None
    module = LossModule(student, criterion)
    ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids)
    return ddp, ddp
