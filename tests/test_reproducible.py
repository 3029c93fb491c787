"""Results reproduce to the bit: the same config and seed, run twice in separate processes, give
the same weights (design.md, "Reproducibility")."""
import hashlib
import json
import subprocess
import sys

import torch
from torch import nn

from incdet.model.builder import _conv_avoiding_width_1_bf16
from incdet.model.checkpoint import load_checkpoint

from conftest import ROOT


def _weights_digest(path) -> str:
    """One digest over every tensor of a checkpoint's model, by name (bytes, dtype, shape)."""
    state = load_checkpoint(path)["model"]
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _train_two_steps(config, work, *extra):
    for step in (0, 1):
        r = subprocess.run(
            [sys.executable, "tools/train_step.py", "--config", str(config), "--step", str(step),
             "--work-dir", str(work), "--no-progress", "--set", "train.max_iters=4",
             "--set", "train.amp=bf16", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr
    return [_weights_digest(work / f"step_{t}" / "checkpoint.pt") for t in (0, 1)]


# what a step's metrics.json and log.jsonl hold that depends on the machine's load, not on the run
TIMING = ("seconds", "images_per_second")


def _outcome(work) -> list:
    """Everything else a run leaves, per step: metrics.json without its timing, the memory file's
    bytes, and every loss figure of log.jsonl."""
    out = []
    for t in (0, 1):
        step = work / f"step_{t}"
        metrics = json.loads((step / "metrics.json").read_text())
        metrics["train"] = {k: v for k, v in metrics["train"].items() if k not in TIMING}
        log = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
               for line in (step / "log.jsonl").read_text().splitlines()]
        out.append((metrics, (step / "memory.json").read_bytes(), log))
    return out


def test_two_processes_train_the_same_weights(tiny_config, tmp_path):
    """Augmentation on, bf16 autocast (whose P7 gradient on 1-px maps was garbage), distillation
    and memory replay at step 1, train.deterministic on: both runs end on identical weights
    (every tensor's bytes), metrics, memories and logged losses."""
    a = _train_two_steps(tiny_config, tmp_path / "a", "--set", "train.deterministic=true")
    b = _train_two_steps(tiny_config, tmp_path / "b", "--set", "train.deterministic=true")
    assert a == b
    first, second = _outcome(tmp_path / "a"), _outcome(tmp_path / "b")
    assert first == second
    metrics = first[1][0]
    assert metrics["train"]["deterministic"] is True
    assert metrics["memory"]["replayed_from_previous"] > 0
    # another seed moves the weights: the digest sees training, not only the initialisation
    c = _train_two_steps(tiny_config, tmp_path / "c", "--set", "train.seed=7")
    assert c[0] != a[0]


def test_one_pixel_maps_get_a_correct_repeatable_gradient_under_cpu_bf16():
    """P6/P7 of a 64 px image are 1 px wide; their convolution's weight gradient under CPU bf16
    autocast equals float32's (to bf16 precision) and is the same at every call."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)
    x = torch.randn(2, 16, 1, 1)

    def grad(autocast: bool) -> torch.Tensor:
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = _conv_avoiding_width_1_bf16(conv, x)
        y.float().square().sum().backward()
        return conv.weight.grad.clone()

    reference = grad(False)
    first, second = grad(True), grad(True)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    torch.testing.assert_close(first, reference, rtol=2e-2, atol=2e-2)
    # maps of 2 px and more keep bf16 (the speed of mixed precision)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _conv_avoiding_width_1_bf16(conv, torch.randn(1, 16, 2, 2)).dtype == torch.bfloat16
