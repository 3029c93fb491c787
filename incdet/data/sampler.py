"""Batches that mix new-step images with replayed memory images at a fixed ratio."""
from __future__ import annotations

import math

import torch

from incdet.base.errors import check_choice

REPLAY_MODES = ("share", "add")


def check_replay_mode(mode: str) -> None:
    check_choice("memory.replay_mode", mode, REPLAY_MODES)


def replay_counts(batch_size: int, fraction: float, mode: str, num_new: int = 1,
                  num_memory: int = 1) -> tuple[int, int]:
    """``(new, memory)`` images per batch (see :class:`MixedBatchSampler`)."""
    check_replay_mode(mode)
    k = int(round(fraction * batch_size)) if num_memory else 0
    if num_memory and fraction > 0:
        k = max(1, k)
    if not num_new:
        return 0, batch_size
    if mode == "share":
        k = min(k, batch_size - 1)
    return (batch_size if mode == "add" else batch_size - k), k


class MixedBatchSampler(torch.utils.data.Sampler):
    """Indices ``[0, num_new)`` are new images, ``[num_new, num_new + num_memory)`` memory images.

    Every batch holds ``k = round(fraction * batch_size)`` memory images (at least one when there
    is a memory). ``mode="share"``: they take ``k`` of the ``batch_size`` places and new images
    fill the rest, so an iteration costs what it costs without memory. ``mode="add"``: every
    batch holds ``batch_size`` new images plus the ``k`` memory images (experience replay's
    concatenated replay batch), so the new data is seen exactly as often as without memory and
    an iteration costs ``k`` images more. An epoch is one pass over the new images; memory
    images cycle through their own shuffled order. Randomness comes from ``generator``.
    """

    def __init__(self, num_new: int, num_memory: int, batch_size: int, fraction: float,
                 generator: torch.Generator, mode: str = "share"):
        self.num_new, self.num_memory = num_new, num_memory
        self.batch_size = batch_size
        self.per_batch_new, self.per_batch_memory = replay_counts(batch_size, fraction, mode,
                                                                  num_new, num_memory)
        self.generator = generator
        self._mem_order: list[int] = []

    def __len__(self) -> int:
        return math.ceil(self.num_new / self.per_batch_new) if self.num_new else 0

    def _next_memory(self) -> int:
        if not self._mem_order:
            self._mem_order = torch.randperm(self.num_memory, generator=self.generator).tolist()
        return self.num_new + self._mem_order.pop()

    def __iter__(self):
        per_new = self.per_batch_new
        new_order = torch.randperm(self.num_new, generator=self.generator).tolist()
        for start in range(0, self.num_new, per_new):
            batch = new_order[start:start + per_new]
            batch += [self._next_memory() for _ in range(self.per_batch_memory)]
            yield batch
