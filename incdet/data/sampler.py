"""Batches that mix new-step images with replayed memory images at a fixed ratio."""
from __future__ import annotations

import math

import torch


class MixedBatchSampler(torch.utils.data.Sampler):
    """Indices ``[0, num_new)`` are new images, ``[num_new, num_new + num_memory)`` memory images.

    Every batch holds ``round(fraction * batch_size)`` memory images (at least one when there is
    a memory) and new images for the rest; an epoch is one pass over the new images, memory
    images cycle through their own shuffled order. Randomness comes from ``generator``.
    """

    def __init__(self, num_new: int, num_memory: int, batch_size: int, fraction: float,
                 generator: torch.Generator):
        self.num_new, self.num_memory = num_new, num_memory
        self.batch_size = batch_size
        k = int(round(fraction * batch_size)) if num_memory else 0
        if num_memory and fraction > 0:
            k = max(1, k)
        self.per_batch_memory = min(k, batch_size - 1) if num_new else batch_size
        self.generator = generator
        self._mem_order: list[int] = []

    def __len__(self) -> int:
        per_new = self.batch_size - self.per_batch_memory
        return math.ceil(self.num_new / per_new) if per_new else 0

    def _next_memory(self) -> int:
        if not self._mem_order:
            self._mem_order = torch.randperm(self.num_memory, generator=self.generator).tolist()
        return self.num_new + self._mem_order.pop()

    def __iter__(self):
        per_new = self.batch_size - self.per_batch_memory
        new_order = torch.randperm(self.num_new, generator=self.generator).tolist()
        for start in range(0, self.num_new, per_new):
            batch = new_order[start:start + per_new]
            batch += [self._next_memory() for _ in range(self.per_batch_memory)]
            yield batch
