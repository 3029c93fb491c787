"""An interrupted step (SIGKILL mid-epoch) resumes from its last checkpoint and completes."""
import hashlib
import json
import signal
import subprocess
import sys
import time

from incdet.base.config import load_config
from incdet.experiment.step import run_step
from incdet.model.checkpoint import load_checkpoint

from conftest import ROOT


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def test_sigkill_mid_epoch_then_resume(tiny_config, tmp_path):
    work = tmp_path / "w"
    cfg = load_config(tiny_config)
    run_step(cfg, 0, work, progress=False)
    step0 = _digest(work / "step_0")

    args = [sys.executable, "tools/train_step.py", "--config", str(tiny_config), "--step", "1",
            "--work-dir", str(work), "--no-progress", "--set", "train.max_iters=30",
            "--set", "train.checkpoint_every=2"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = work / "step_1" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.is_file():
            ckpt = load_checkpoint(last)
            if ckpt["train_state"]["iteration"] >= 4:
                break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "step_1" / "metrics.json").exists()
    state = load_checkpoint(last)["train_state"]
    done = state["iteration"]
    assert 0 < done < 30
    assert 0 < state["batches_done"] or state["epoch"] > 0

    r = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"resuming step 1 at iteration {done}" in r.stderr
    metrics = json.loads((work / "step_1" / "metrics.json").read_text())
    assert metrics["train"]["iterations"] == 30 - done
    assert metrics["step"] == 1 and metrics["map"]["all"]["AP"] is not None
    assert not last.exists()
    assert load_checkpoint(work / "step_1" / "checkpoint.pt")["head_layout"] == [4, 3]
    assert _digest(work / "step_0") == step0  # finished files untouched
