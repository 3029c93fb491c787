"""Benchmark section gpu: seconds per training iteration, model only, of incdet's step-0 and
step-1 models and torchvision's plain RetinaNet, per precision, on one device."""
import copy
import time

import torch

from incdet.base.devices import resolve_device, seed_everything
from incdet.base.errors import UserError
from incdet.experiment import methods
from incdet.experiment.loaders import new_class_batch
from incdet.model.builder import keep_frozen_norms
from incdet.model.torchvision import build_torchvision
from incdet.train.engine import batch_to, build_optimizer


def model_cost(cfg: dict, device: str | torch.device = "auto", precisions=("fp32", "bf16"),
               iters: int = 10, batch_size: int = 16, progress: bool = False) -> dict:
    """Seconds per training iteration, model only (loss, backward, optimizer step), on one fixed
    batch on ``device``, the variants alternating so that machine noise hits all alike:

    * ``incdet_step0``: incdet's step-0 model with its focal loss (a step-0 batch);
    * ``incdet_step1``: the step-1 student and its teacher (distillation included);
    * ``branch``: a ``branch`` step (frozen backbone, own tower, no teacher);
    * ``tv_v1`` / ``tv_v2``: torchvision's stock ``retinanet_resnet50_fpn`` and ``_v2`` with
      their own losses, as many classes as step 1 and the same input size as ``cfg``'s model.

    Each in every precision of ``precisions`` (``fp32``, ``bf16``: autocast). Returns the
    median seconds per variant and precision, the images/s, and ``speedup_over_tv_v2``
    (torchvision v2's seconds / the variant's, > 1: faster than torchvision), plus the peak
    GPU memory of the whole measurement on CUDA."""
    bad = [p for p in precisions if p not in ("fp32", "bf16")]
    if bad:
        raise UserError(f"precision {bad[0]!r}: choose fp32 or bf16")
    device = resolve_device(device, "device")
    seed_everything(0)
    memory_format = (torch.channels_last if cfg["train"].get("channels_last")
                     else torch.contiguous_format)

    classes, sc, plan, *batch1 = new_class_batch(cfg, batch_size, "incdet", 1, progress)
    _, sc0, plan0, *batch0 = new_class_batch(cfg, batch_size, "incdet", 0)
    _, _, plan_b, *batch_b = new_class_batch(cfg, batch_size, "branch", 1)
    previous = {"model": methods.build_model(cfg["model"], [len(sc.old)]).state_dict(),
                "head_layout": [len(sc.old)]}
    runs = {}  # variant -> (model, loss function of (images, targets), batch)

    def incdet_variant(name, method, step_classes, step_plan, batch, prev):
        vcfg = copy.deepcopy(cfg)
        vcfg["incremental"]["method"] = method
        student = methods.build_student(vcfg, step_classes, step_plan, prev)
        student = student.to(device, memory_format=memory_format)
        teacher = None
        if step_plan.uses_teacher:
            teacher = methods.build_teacher(vcfg, prev).to(device, memory_format=memory_format)
        criterion = methods.make_criterion(vcfg, student, teacher, step_plan, classes,
                                           step_classes)
        runs[name] = (student, criterion, batch_to(*batch, device))

    incdet_variant("incdet_step0", "incdet", sc0, plan0, batch0, None)
    incdet_variant("incdet_step1", "incdet", sc, plan, batch1, previous)
    incdet_variant("branch", "branch", sc, plan_b, batch_b, previous)
    size = {"min_size": cfg["model"]["min_size"], "max_size": cfg["model"]["max_size"]}
    for name, arch in (("tv_v1", "retinanet_resnet50_fpn"), ("tv_v2", "retinanet_resnet50_fpn_v2")):
        model = build_torchvision(arch, len(sc.seen))
        model.transform.min_size, model.transform.max_size = (size["min_size"],), size["max_size"]
        model = model.to(device, memory_format=memory_format)
        runs[name] = (model, model, batch_to(*batch1, device))
    optimizers = {}
    for name, (model, _, _) in runs.items():
        optimizers[name] = build_optimizer(model, dict(cfg["train"], lr=1e-5))
        model.train()
        keep_frozen_norms(model)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def one(name: str, precision: str) -> float:
        _, loss_fn, (images, targets) = runs[name]
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses = loss_fn(list(images), list(targets))
        optimizers[name].zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizers[name].step()
        sync()
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {"device": str(device), "batch_size": len(batch1[0]), "iters": iters,
           "image_size": size, "seconds": {}, "images_per_second": {},
           "speedup_over_tv_v2": {}}
    for precision in precisions:
        for name in runs:  # warm-up (cuDNN autotuning, allocator)
            one(name, precision)
        times = {name: [] for name in runs}
        for _ in range(iters):
            for name in runs:
                times[name].append(one(name, precision))
        med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
        out["seconds"][precision] = med
        out["images_per_second"][precision] = {n: out["batch_size"] / s for n, s in med.items()}
        out["speedup_over_tv_v2"][precision] = {n: med["tv_v2"] / s for n, s in med.items()}
    if device.type == "cuda":
        out["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out
