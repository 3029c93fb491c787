"""torchrun / DistributedDataParallel on CPU (gloo): a 2-process step, and gradient equality."""
import json
import subprocess
import sys

import torch

from incdet.model.checkpoint import load_checkpoint

from conftest import ROOT


def _torchrun(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_two_process_step_writes_one_valid_step_folder(tiny_config, tmp_path):
    work = tmp_path / "w"
    r = _torchrun("tools/train_step.py", "--config", str(tiny_config), "--step", "0",
                  "--work-dir", str(work), "--no-progress", "--set", "train.max_iters=4",
                  "--set", "train.checkpoint_every=2")
    assert r.returncode == 0, r.stderr[-3000:]
    step = work / "step_0"
    metrics = json.loads((step / "metrics.json").read_text())
    assert metrics["train"]["iterations"] == 4
    assert set(metrics["map"]["all"]) >= {"AP", "AP50"}
    ckpt = load_checkpoint(step / "checkpoint.pt")
    assert ckpt["step"] == 0 and ckpt["train_state"] is None
    assert not (step / "last.pt").exists()
    # 48 images, 2 processes x batch 4 = 8 per iteration: 4 iterations stay in epoch 0, and only
    # rank 0 wrote its line
    lines = (step / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["iteration"] == 4
    assert len(list(step.glob("events.out.tfevents*"))) == 1
    # the step is complete: running it again (one process) skips it
    r2 = subprocess.run([sys.executable, "tools/train_step.py", "--config", str(tiny_config),
                         "--step", "0", "--work-dir", str(work), "--no-progress", "--set",
                         "train.max_iters=4"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "already complete" in r2.stderr + r2.stdout


def test_gradients_of_a_split_batch_equal_the_whole_batch(tiny_config, tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    r = subprocess.run([sys.executable, "tests/ddp_worker.py", str(tiny_config), str(one)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun("tests/ddp_worker.py", str(tiny_config), str(two))
    assert r.returncode == 0, r.stderr[-3000:]
    g1 = torch.load(one, weights_only=True)
    g2 = torch.load(two, weights_only=True)
    assert g1.keys() == g2.keys() and len(g1) > 50
    worst = max(((a - g2[k]).abs().max() / (a.abs().max() + 1e-12)).item()
                for k, a in g1.items() if a.abs().max() > 0)
    assert worst < 1e-3, worst
    # negative control: without the synchronisation, rank 0's half batch gives other gradients
    local = tmp_path / "local.pt"
    r = _torchrun("tests/ddp_worker.py", str(tiny_config), str(local), "local")
    assert r.returncode == 0, r.stderr[-3000:]
    g3 = torch.load(local, weights_only=True)
    assert max(((a - g3[k]).abs().max() / (a.abs().max() + 1e-12)).item()
               for k, a in g1.items() if a.abs().max() > 0) > 1e-2
