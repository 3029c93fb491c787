"""A step's records and checkpoints across machines: metrics.json says what a step trained on,
and a checkpoint trained on a GPU evaluates where there is none."""
import importlib.util
import platform

import pytest
import torch

from incdet.base.config import load_config
from incdet.base.errors import UserError
from incdet.experiment.evaluate import evaluate_checkpoint
from incdet.experiment.step import run_step
from incdet.model.checkpoint import load_checkpoint, save_checkpoint

from conftest import ROOT


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


@pytest.fixture
def cuda_checkpoint(tiny_config, tmp_path):
    """A step-0 checkpoint (2 iterations on CPU) whose saved config says train.device: cuda."""
    cfg = load_config(tiny_config, ["train.max_iters=2", "train.device=cpu"])
    run_step(cfg, 0, tmp_path / "w", progress=False)
    path = tmp_path / "w" / "step_0" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    ckpt["config"]["train"]["device"] = "cuda"
    save_checkpoint(path, ckpt)
    return path


def test_metrics_record_the_device_precision_and_peak_memory(tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["train.max_iters=2", "train.device=cpu"])
    m = run_step(cfg, 0, tmp_path / "w", progress=False)
    train = m["train"]
    assert {"seconds", "iterations", "images_per_second", "images"} <= set(train)
    assert train["device"] == "cpu"
    assert train["device_name"] == (platform.processor() or "cpu")
    assert train["precision"] == "fp32" and train["peak_gpu_memory_gib"] is None
    assert train["keep_freed_memory"] is False  # the allocator setting: off by default
    from incdet.train.engine import device_record

    assert device_record("cpu", dict(cfg["train"], amp="bf16"))["precision"] == "bf16"


def test_checkpoint_trained_on_cuda_evaluates_without_it(cuda_checkpoint, capsys):
    evaluation, classes = evaluate_checkpoint(cuda_checkpoint, progress=False)
    assert set(evaluation["groups"]["all"]) >= {"AP", "AP50"}
    cpu, _ = evaluate_checkpoint(cuda_checkpoint, progress=False, device="cpu")
    assert cpu["groups"] == evaluation["groups"] or torch.cuda.is_available()
    tool = _tool("evaluate")
    assert tool.main(["--checkpoint", str(cuda_checkpoint), "--no-progress",
                      "--device", "cpu"]) == 0
    assert "AP" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error(cuda_checkpoint):
    with pytest.raises(UserError, match=r"--device: 'cuda' requested but CUDA is not available"):
        _tool("evaluate").main(["--checkpoint", str(cuda_checkpoint), "--device", "cuda"])
    with pytest.raises(UserError, match=r"device: 'cuda' requested but CUDA is not available"):
        evaluate_checkpoint(cuda_checkpoint, progress=False, device="cuda")
