import copy
import json

import numpy as np
import pytest
import torch

from incdet.base.config import DEFAULTS
from incdet.base.errors import UserError
from incdet.data.sampler import MixedBatchSampler
from incdet.train.engine import (
    TrainSettings,
    build_optimizer,
    lr_factor,
    train,
    weighted_total,
)


def test_warmup_then_cosine_and_step_schedules():
    t = dict(DEFAULTS["train"], warmup_iters=10, warmup_factor=0.1, schedule="cosine")
    assert lr_factor(0, 100, t) == pytest.approx(0.1)
    assert lr_factor(5, 100, t) == pytest.approx(0.55)
    assert lr_factor(10, 100, t) == pytest.approx(1.0)
    assert lr_factor(55, 100, t) == pytest.approx(0.5)
    assert lr_factor(100, 100, t) == pytest.approx(0.0, abs=1e-12)
    s = dict(t, schedule="step", lr_steps=[0.5, 0.8], lr_gamma=0.1)
    assert [lr_factor(i, 100, s) for i in (20, 49, 50, 79, 80)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_optimizer_matches_the_per_parameter_one(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    twin = copy.deepcopy(model)
    tcfg = dict(DEFAULTS["train"], optimizer=name, lr=0.01)
    fused = build_optimizer(model, tcfg)
    assert all(g.get("fused") for g in fused.param_groups)
    ref_groups = [{"params": [p for p in twin.parameters() if p.ndim > 1],
                   "weight_decay": tcfg["weight_decay"]},
                  {"params": [p for p in twin.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    ref = (torch.optim.AdamW(ref_groups, lr=0.01, foreach=False) if name == "adamw" else
           torch.optim.SGD(ref_groups, lr=0.01, momentum=tcfg["momentum"], foreach=False))
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        for m, opt in ((model, fused), (twin, ref)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    # the fused kernel rounds differently: AdamW's division by a near-zero second moment turns
    # that into ~2e-6 on a few elements; a wrong update (e.g. weight decay dropped, 1.5e-4 per
    # step here) is far above the tolerance
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # weight decay reaches the conv weight only (norm weights and biases are not decayed)
    assert fused.param_groups[1]["weight_decay"] == 0.0


def test_weighted_total_uses_prefix_weights_for_per_step_terms():
    losses = {"loss_cls": torch.tensor(1.0), "loss_distill_cls_0": torch.tensor(2.0),
              "loss_distill_cls_1": torch.tensor(3.0)}
    w = {"loss_cls": 1.0, "loss_distill_cls": 0.5}
    assert weighted_total(losses, w).item() == pytest.approx(1 + 0.5 * 5)
    with pytest.raises(KeyError):
        weighted_total({"loss_new": torch.tensor(1.0)}, w)


def test_mixed_batches_hold_memory_images_at_the_ratio():
    g = torch.Generator().manual_seed(0)
    sampler = MixedBatchSampler(num_new=20, num_memory=3, batch_size=4, fraction=0.25,
                                generator=g)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7
    assert all(sum(i >= 20 for i in b) == 1 for b in batches)
    new_seen = sorted(i for b in batches for i in b if i < 20)
    assert new_seen == list(range(20))  # one pass over the new images per epoch


def test_added_replay_keeps_every_new_place_and_adds_memory_on_top():
    g = torch.Generator().manual_seed(0)
    sampler = MixedBatchSampler(num_new=20, num_memory=3, batch_size=4, fraction=0.5,
                                generator=g, mode="add")
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5  # as many batches as without memory
    assert all(sum(i < 20 for i in b) == 4 and sum(i >= 20 for i in b) == 2 for b in batches)
    new_seen = sorted(i for b in batches for i in b if i < 20)
    assert new_seen == list(range(20))
    memory_seen = [i for b in batches for i in b if i >= 20]
    assert sorted(memory_seen[:6]) == [20, 20, 21, 21, 22, 22]  # memory cycles through all


def test_unknown_replay_mode_names_the_key():
    with pytest.raises(UserError, match=r"memory.replay_mode: 'concat' is not one of share, add"):
        MixedBatchSampler(num_new=20, num_memory=3, batch_size=4, fraction=0.25,
                          generator=torch.Generator(), mode="concat")


def _linear_model(lr: float = 0.1, fused: bool = False):
    """A one-layer model, SGD at a constant learning rate: for the training loop's tests."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, fused=fused)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)


def test_non_finite_loss_stops_with_the_terms(tmp_path):
    model, optimizer, scheduler = _linear_model()
    loader = [([torch.zeros(2)], [{}])] * 3
    calls = []

    def loss_fn(images, targets):
        calls.append(1)
        out = model(images[0]).sum()
        bad = out * float("nan") if len(calls) == 2 else out * 0
        return {"loss_cls": bad, "loss_box": out * 0}

    saved = []
    with pytest.raises(UserError, match=r"non-finite loss at iteration 1 \(loss_cls=nan, "
                                        r"loss_box=-?0\)"):
        train(model, loss_fn, loader, optimizer, scheduler,
              TrainSettings(tcfg=dict(DEFAULTS["train"]),
                            weights={"loss_cls": 1.0, "loss_box": 1.0}, total_iters=10,
                            device="cpu", log_dir=tmp_path, progress=False,
                            on_epoch_end=lambda e, i: saved.append(i)))
    assert saved == []  # nothing was checkpointed from the failing epoch


class _Overflow(torch.autograd.Function):
    """Identity whose gradient is infinite: a finite loss whose backward overflows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("fused", [False, True])  # clipping by clip_grad_norm_ / in the step
def test_a_non_finite_gradient_skips_its_step_and_is_counted(tmp_path, fused):
    torch.manual_seed(0)
    model, optimizer, scheduler = _linear_model(fused=fused)
    loader = [([torch.ones(2)], [{}])] * 4
    weights_seen = []

    def loss_fn(images, targets):
        weights_seen.append(model.weight.detach().clone())
        out = model(images[0]).sum()
        if len(weights_seen) == 2:  # the second iteration's gradient overflows
            out = _Overflow.apply(out)
        return {"loss_cls": out, "loss_box": out * 0}

    with pytest.warns(RuntimeWarning, match="iteration 1: the gradient norm is not finite"):
        result = train(model, loss_fn, loader, optimizer, scheduler,
                       TrainSettings(tcfg=dict(DEFAULTS["train"]),
                                     weights={"loss_cls": 1.0, "loss_box": 1.0}, total_iters=4,
                                     device="cpu", log_dir=tmp_path, progress=False))
    assert result.skipped_steps == 1 and result.iterations == 4
    assert torch.isfinite(model.weight).all()
    assert torch.equal(weights_seen[2], weights_seen[1])  # the skipped step changed nothing
    assert not torch.equal(weights_seen[1], weights_seen[0])  # the others did
    assert not torch.equal(weights_seen[3], weights_seen[2])
    line = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert line["skipped_steps"] == 1
    assert not hasattr(optimizer, "grad_scale")


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_clipping_inside_the_fused_step_equals_clip_grad_norm(tmp_path, name):
    """With a fused optimizer the loop clips through the step's gradient divisor; the weights
    are those of clip_grad_norm_ followed by the same optimizer's plain step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    tcfg = dict(DEFAULTS["train"], optimizer=name, lr=0.05, grad_clip=0.05, log_every=1)
    runs = {}
    for fold in (True, False, None):  # folded, clip_grad_norm_, no clipping
        torch.manual_seed(1)
        m = copy.deepcopy(model)
        optimizer = build_optimizer(m, tcfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
        norms = []
        if fold is False:  # an optimizer the loop does not recognise as fused: clip_grad_norm_
            for g in optimizer.param_groups:
                g["fused"] = None
                g["foreach"] = False
        if fold is not None:
            original = torch.nn.utils.get_total_norm if fold else \
                torch.nn.utils.clip_grad_norm_

            def recorded(*a, _original=original, **k):
                norms.append(float(_original(*a, **k).detach()))
                return torch.tensor(norms[-1])

            target = "get_total_norm" if fold else "clip_grad_norm_"
            setattr(torch.nn.utils, target, recorded)
        try:
            x = torch.randn(4, 3, 8, 8)
            loader = [([x[i]], [{}]) for i in range(4)]
            clip = tcfg["grad_clip"] if fold is not None else None
            train(m, lambda images, targets: {"loss_cls": m(images[0][None]).square().sum()},
                  loader, optimizer, scheduler,
                  TrainSettings(tcfg=dict(tcfg, grad_clip=clip), weights={"loss_cls": 1.0},
                                total_iters=4, device="cpu", log_dir=tmp_path, progress=False))
        finally:
            if fold is not None:
                setattr(torch.nn.utils, target, original)
        assert not hasattr(optimizer, "grad_scale")
        runs[fold] = (m, norms)
    assert len(runs[True][1]) == len(runs[False][1]) == 4
    assert min(runs[True][1]) > 10 * tcfg["grad_clip"]  # every step was clipped
    unclipped_diff = 0.0
    for a, b, c in zip(*(runs[k][0].parameters() for k in (True, False, None))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        unclipped_diff = max(unclipped_diff, float((a - c).abs().max()))
    assert unclipped_diff > 1e-4  # clipping changed the weights (AdamW: through its moments)


def test_mixed_precision_and_channels_last_options(tiny_config, tmp_path):
    from incdet.base.config import load_config
    from incdet.experiment.step import run_step

    cfg = load_config(tiny_config, ["train.amp=bf16", "train.channels_last=true",
                                    "train.max_iters=2", "split=10"])
    m = run_step(cfg, 0, tmp_path / "a", progress=False)
    log_text = (tmp_path / "a" / "step_0" / "log.jsonl").read_text()
    lines = [json.loads(x) for x in log_text.splitlines()]
    assert m["train"]["iterations"] == 2 and all(np.isfinite(x["loss"]) for x in lines)
    bad = load_config(tiny_config, ["train.amp=fp16", "train.device=cpu"])
    with pytest.raises(UserError, match="train.amp: fp16 needs a CUDA device"):
        run_step(bad, 0, tmp_path / "b", progress=False)
    with pytest.raises(UserError, match="train.amp: 'fp8' is not one of"):
        run_step(load_config(tiny_config, ["train.amp=fp8"]), 0, tmp_path / "c", progress=False)


def test_num_workers_auto_is_the_free_cores_at_most_eight(monkeypatch):
    import os

    from incdet.train.engine import resolve_num_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, expected in ((1, 1), (2, 1), (4, 3), (16, 8), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)),
                            raising=False)
        assert resolve_num_workers("auto") == expected
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun: 4 processes share the 16 cores
    assert resolve_num_workers("auto") == 3
    assert resolve_num_workers(0) == 0 and resolve_num_workers(5) == 5
    for bad in (-1, "four", 1.5, True):
        with pytest.raises(UserError, match=r"train.num_workers: .* or auto"):
            resolve_num_workers(bad)


def test_loss_terms_are_read_back_every_log_every_and_at_epoch_ends(tmp_path, monkeypatch):
    """The log's per-epoch means are exactly the Python float means of every iteration's
    values, though the loop reads values back only every ``log_every`` iterations."""
    torch.manual_seed(0)
    model, optimizer, scheduler = _linear_model(lr=0.01)
    values = [(float(np.float32(0.1 * i + 1 / 3)), float(np.float32(2.0 / (i + 7))))
              for i in range(7)]
    calls = []

    def loss_fn(images, targets):
        cls, box = values[len(calls) % 7]
        calls.append(1)
        out = model(images[0]).sum() * 0
        return {"loss_cls": out + cls, "loss_box": out + box}

    reads = {"item": 0, "tolist": 0}
    for name in reads:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            reads[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    loader = [([torch.ones(2)], [{}])] * 7
    tcfg = dict(DEFAULTS["train"], log_every=3, grad_clip=None)
    weights = {"loss_cls": 1.0, "loss_box": 0.5}
    result = train(model, loss_fn, loader, optimizer, scheduler,
                   TrainSettings(tcfg=tcfg, weights=weights, total_iters=14, device="cpu",
                                 log_dir=tmp_path, progress=False))
    monkeypatch.undo()
    # iterations 3, 6, 9, 12 (log_every) and the two epoch ends; never .item() per iteration
    assert reads == {"item": 0, "tolist": 6}
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert lines == result.epochs and len(lines) == 2
    for line in lines:
        sums = {"loss_cls": 0.0, "loss_box": 0.0, "loss": 0.0}
        for cls, box in values:
            sums["loss_cls"] += cls
            sums["loss_box"] += box
            sums["loss"] += float(torch.tensor(cls) * 1.0 + torch.tensor(box) * 0.5)
        for k, v in sums.items():
            assert line[k] == round(v / 7, 5)
        assert line["loss_box_weighted"] == round(0.5 * sums["loss_box"] / 7, 5)


def test_amp_auto_is_full_precision_on_cpu_and_bf16_on_a_gpu_that_has_it(monkeypatch):
    from incdet.train.engine import autocast_dtype, precision_name

    cpu = torch.device("cpu")
    assert autocast_dtype({"amp": "auto"}, cpu) is None
    assert precision_name({"amp": "auto"}, cpu) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype({"amp": "auto"}, torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype({"amp": "auto"}, torch.device("cuda")) is None
    with pytest.raises(UserError, match="train.amp: 'fp8' is not one of null, auto, bf16, fp16"):
        autocast_dtype({"amp": "fp8"}, cpu)


class _FakeLibc:
    """glibc's ``mallopt`` as ctypes gives it (a function object with argtypes)."""

    def __init__(self, answer: int = 1):
        self.calls, self.answer = [], answer

        def mallopt(key, value):
            self.calls.append((key, value))
            return self.answer

        self.mallopt = mallopt


def test_keep_freed_memory_sets_the_allocators_thresholds(monkeypatch):
    import ctypes

    from incdet.train import engine

    libc = _FakeLibc()
    opened = []
    monkeypatch.setattr(engine.sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: opened.append(name) or libc)
    assert engine.keep_freed_memory() is True
    assert opened == ["libc.so.6"]
    assert dict(libc.calls) == engine.KEPT_MEMORY
    assert engine.KEPT_MEMORY[-3] == 32 << 20 and engine.KEPT_MEMORY[-1] == 1 << 30
    libc.answer = 0  # glibc refused a value
    assert engine.keep_freed_memory() is False


def test_keep_freed_memory_changes_nothing_without_glibc(monkeypatch):
    import ctypes

    from incdet.train import engine

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(engine.sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert engine.keep_freed_memory() is False
    monkeypatch.setattr(engine.sys, "platform", "darwin")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: pytest.fail("no library is opened"))
    assert engine.keep_freed_memory() is False


def test_resuming_right_after_an_epochs_last_batch_goes_on_with_the_next_epoch(tmp_path):
    """A kill between the checkpoint of an epoch's last batch and the epoch's end leaves
    ``batches_done`` equal to the epoch's length: resuming finishes that epoch and trains on."""
    model, optimizer, scheduler = _linear_model()
    loader = [([torch.ones(2)], [{}])] * 3
    calls, ends = [], []

    def loss_fn(images, targets):
        calls.append(1)
        out = model(images[0]).sum()
        return {"loss_cls": out, "loss_box": out * 0}

    generator = torch.Generator()
    result = train(model, loss_fn, loader, optimizer, scheduler,
                   TrainSettings(tcfg=dict(DEFAULTS["train"]),
                                 weights={"loss_cls": 1.0, "loss_box": 1.0}, total_iters=6,
                                 device="cpu", log_dir=tmp_path, progress=False, start_iter=3,
                                 start_epoch=0, resume_position=(generator.get_state(), 3),
                                 shuffle_generator=generator,
                                 on_epoch_end=lambda e, i: ends.append((e, i))))
    assert result.iterations == 3 and len(calls) == 3
    assert ends == [(1, 3), (2, 6)]
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1]


def test_incremental_lr_scale_applies_to_the_steps_that_go_on_from_the_previous_model():
    """incremental.lr_scale: incdet, finetune and branch at t >= 1 train at train.lr * scale;
    step 0 and joint (a fresh model) at train.lr; the optimizer's groups carry it, the body's
    group times train.backbone_lr_scale as well."""
    from incdet.data.classes import ClassSpace
    from incdet.experiment import methods
    from incdet.train.engine import build_optimizer

    cfg = copy.deepcopy(DEFAULTS)
    cfg["incremental"]["lr_scale"] = 0.25
    cfg["train"]["backbone_lr_scale"] = 0.5
    classes = ClassSpace([{"id": i, "name": n} for i, n in ((1, "a"), (2, "b"), (3, "c"))],
                         "2+1")
    lrs = {}
    for method in ("incdet", "finetune", "branch", "joint"):
        for t in (0, 1):
            plan = methods.plan_step(method, classes, classes.step(t))
            lrs[method, t] = methods.optimizer_settings(cfg, plan)["lr"]
    base = cfg["train"]["lr"]
    assert lrs == {("incdet", 0): base, ("finetune", 0): base, ("branch", 0): base,
                   ("joint", 0): base, ("joint", 1): base, ("incdet", 1): base * 0.25,
                   ("finetune", 1): base * 0.25, ("branch", 1): base * 0.25}
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.body = torch.nn.Linear(2, 2)
    model.head = torch.nn.Linear(2, 2)
    plan = methods.plan_step("incdet", classes, classes.step(1))
    optimizer = build_optimizer(model, methods.optimizer_settings(cfg, plan))
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [base * 0.125, base * 0.25]
    cfg["incremental"]["lr_scale"] = 0
    with pytest.raises(UserError, match="incremental.lr_scale: 0.0 must be above 0"):
        methods.optimizer_settings(cfg, plan)
