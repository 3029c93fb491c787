"""Checks that need a GPU: skipped without CUDA, run where a GPU is lent (docs/benchmarks.md,
"GPU": ``python -m pytest -m cuda``).

``INCDET_TEST_DEVICE=cpu python -m pytest -m cuda`` runs the same tests on the CPU, to check the
tests themselves; the GPU-only assertions (synchronisations, precision, peak memory) are then
left out.
"""
import os
import warnings

import pytest
import torch

from incdet.base.config import DEFAULTS, load_config
from incdet.base.devices import host_to_device

DEVICE = torch.device(os.environ.get("INCDET_TEST_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                 reason="needs CUDA (runs where a GPU is lent)")]


def test_a_step_trains_on_the_device_and_records_it(tiny_config, tmp_path):
    from incdet.experiment.step import run_step

    cfg = load_config(tiny_config, ["train.max_iters=3", f"train.device={DEVICE}",
                                    "train.amp=auto", "train.channels_last=true",
                                    "train.num_workers=auto"])
    train = run_step(cfg, 0, tmp_path / "w", progress=False)["train"]
    assert train["iterations"] == 3
    if ON_GPU:
        index = torch.cuda.current_device()
        assert train["device"] == f"cuda:{index}"
        assert train["device_name"] == torch.cuda.get_device_name(index)
        assert train["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
        assert train["peak_gpu_memory_gib"] > 0
    else:
        assert train["device"] == "cpu" and train["peak_gpu_memory_gib"] is None


def test_losses_on_the_device_equal_the_cpu_ones():
    from test_losses import _awkward_batch
    from torchvision.models.detection import _utils as det_utils

    from incdet.train.distill import box_distillation, cls_distillation
    from incdet.train.losses import DetectionLoss

    matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    box_coder = det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
    outputs, anchors, targets = _awkward_batch(0)
    targets[1]["replayed"] = targets[3]["replayed"] = True
    results = []
    for device in (torch.device("cpu"), DEVICE):
        out = {k: v.detach().clone().to(device).requires_grad_() for k, v in outputs.items()}
        tgt = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
        losses = DetectionLoss(dict(DEFAULTS["loss"]), box_coder, matcher, 0.5)(
            out, [a.to(device) for a in anchors], tgt)
        mask = out["cls_logits"].detach()[:, :, 0] > 0.5
        where = mask.nonzero(as_tuple=True)
        teacher = out["cls_logits"].detach() * 0.5
        losses["distill_cls"] = cls_distillation(out["cls_logits"], teacher, where)
        losses["distill_box"] = box_distillation(out["bbox_regression"],
                                                 out["bbox_regression"].detach() + 0.1, where)
        sum(losses.values()).backward()
        results.append(({k: v.detach().cpu() for k, v in losses.items()},
                        {k: v.grad.cpu() for k, v in out.items()}))
    (cpu_values, cpu_grads), (dev_values, dev_grads) = results
    assert all(v > 0 for v in cpu_values.values())
    for k in cpu_values:
        torch.testing.assert_close(dev_values[k], cpu_values[k], rtol=1e-5, atol=1e-6)
    for k in cpu_grads:
        torch.testing.assert_close(dev_grads[k], cpu_grads[k], rtol=1e-5, atol=1e-6)


def test_host_made_tensors_reach_the_device_with_their_values():
    t = host_to_device([[0, 3], [1, 2]], torch.int64, DEVICE)
    assert t.device.type == DEVICE.type and t.dtype == torch.int64
    assert t.cpu().tolist() == [[0, 3], [1, 2]]
    ratio = host_to_device([1.5, 2.0], torch.float32, DEVICE) / \
        host_to_device([3.0, 8.0], torch.float32, DEVICE)
    assert ratio.cpu().tolist() == [0.5, 0.25]


def test_the_training_loop_waits_for_the_device_three_times_per_iteration(tiny_config):
    """An ``incdet`` step-1 iteration reads back from the GPU three times: the foreground anchors
    of the box loss, the distilled anchors, and the finiteness check (engine's docstring);
    nothing else makes the host wait (torch's synchronisation debug mode counts them)."""
    from incdet.experiment import methods
    from incdet.experiment.loaders import new_class_batch
    from incdet.train.engine import TrainSettings, build_optimizer, build_scheduler, train

    cfg = load_config(tiny_config, ["model.fpn_channels=8"])
    classes, sc, plan, images, targets = new_class_batch(cfg, 4)
    previous = {"model": methods.build_model(cfg["model"], [len(sc.old)]).state_dict(),
                "head_layout": [len(sc.old)]}
    student = methods.build_student(cfg, sc, plan, previous).to(DEVICE)
    teacher = methods.build_teacher(cfg, previous).to(DEVICE)
    criterion = methods.make_criterion(cfg, student, teacher, plan, classes, sc)
    iters = 5
    tcfg = dict(cfg["train"], lr=1e-4, warmup_iters=0, log_every=1000, checkpoint_every=0)
    optimizer = build_optimizer(student, tcfg)
    pin = (lambda x: x.pin_memory()) if ON_GPU else (lambda x: x)
    seen: list[list] = []

    def batches():
        for _ in range(iters):
            seen.append(list(caught))  # the warnings of the iteration before
            yield ([pin(img) for img in images],
                   [{k: (pin(v) if torch.is_tensor(v) else v) for k, v in t.items()}
                    for t in targets])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ON_GPU:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            result = train(student, criterion, batches(), optimizer,
                           build_scheduler(optimizer, tcfg, iters),
                           TrainSettings(tcfg=tcfg, weights=dict(cfg["loss"]["weights"]),
                                         total_iters=iters, device=DEVICE, progress=False))
        finally:
            if ON_GPU:
                torch.cuda.set_sync_debug_mode("default")
    assert result.iterations == iters
    if not ON_GPU:
        return
    syncs = [[w for w in ws if "synchronizing" in str(w.message)] for ws in seen]
    # iterations 1 .. iters-2 (the first may build caches; the last ends with the epoch's read)
    for before, after in zip(syncs[1:-1], syncs[2:]):
        new = after[len(before):]
        assert len(new) == 3, "host synchronisations: " + "; ".join(
            f"{w.filename}:{w.lineno}" for w in new)
