"""Small host-made tensors on the device without making the host wait.

``torch.tensor(data, device="cuda")`` copies from pageable memory and then waits for the
device's whole queue (a stream synchronisation): on the training path that stalls the host
once per call, every iteration, though no value is read back. :func:`host_to_device` builds the
tensor on the host, pins it and copies it asynchronously; the copy is ordered before every later
kernel of the stream, and torch's pinned-memory allocator keeps the buffer until the copy is
done. On CPU it is the plain tensor; on other devices a plain copy.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from incdet.base.errors import UserError


def host_to_device(data, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype)`` on ``device``, asynchronously on a GPU."""
    t = torch.tensor(data, dtype=dtype)
    device = torch.device(device) if device is not None else t.device
    if device.type != "cuda":  # elsewhere a plain copy (an asynchronous one from a temporary
        return t.to(device)  # host tensor is not safe on every backend)
    return t.pin_memory().to(device, non_blocking=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str | torch.device | None = "auto",
                   key: str = "train.device") -> torch.device:
    """``auto`` (or None): CUDA when available, else CPU; otherwise the device named. ``key``
    names the setting in the error raised when CUDA is asked for but missing."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{key}: {str(name)!r} requested but CUDA is not available; use auto "
                        "or cpu")
    return torch.device(name)
