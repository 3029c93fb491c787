"""Small host-made tensors on the device without making the host wait.

``torch.tensor(data, device="cuda")`` copies from pageable memory and then waits for the
device's whole queue (a stream synchronisation): on the training path that stalls the host
once per call, every iteration, though no value is read back. :func:`host_to_device` builds the
tensor on the host, pins it and copies it asynchronously; the copy is ordered before every later
kernel of the stream, and torch's pinned-memory allocator keeps the buffer until the copy is
done. On CPU it is the plain tensor; on other devices a plain copy.
"""
from __future__ import annotations

import torch


def host_to_device(data, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype)`` on ``device``, asynchronously on a GPU."""
    t = torch.tensor(data, dtype=dtype)
    device = torch.device(device) if device is not None else t.device
    if device.type != "cuda":  # elsewhere a plain copy (an asynchronous one from a temporary
        return t.to(device)  # host tensor is not safe on every backend)
    return t.pin_memory().to(device, non_blocking=True)
