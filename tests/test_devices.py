"""Host-made tensors and loaders for the device (the CUDA side: tests/test_cuda.py)."""
import torch

from incdet.base.devices import host_to_device
from incdet.data.dataset import make_loader


def test_on_cpu_a_host_made_tensor_is_the_plain_tensor():
    t = host_to_device([[0, 3], [1, 2]], torch.int64, "cpu")
    assert torch.equal(t, torch.tensor([[0, 3], [1, 2]])) and not t.is_pinned()
    assert host_to_device([0.5], torch.bfloat16, None).dtype == torch.bfloat16
    assert host_to_device([], torch.int64, torch.device("cpu")).shape == (0,)


def test_loaders_pin_their_batches_for_a_gpu_only():
    data = list(range(4))
    for device, pinned in ((None, False), ("cpu", False), ("cuda", True), ("cuda:1", True),
                           (torch.device("cpu"), False)):
        loader = make_loader(data, 2, shuffle=False, num_workers=0, seed=0, device=device)
        assert loader.pin_memory is pinned, device
