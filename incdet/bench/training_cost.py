"""Benchmark sections throughput and cost: the step-0 training loop's images/s and the cost of an
``incdet`` iteration (student and teacher) against a plain one, measured alternately."""
import copy
import time

import torch

from incdet.base.devices import resolve_device, seed_everything
from incdet.data.records import filter_for_classes
from incdet.experiment import methods
from incdet.experiment.loaders import load_experiment, new_class_batch, train_loader
from incdet.train.engine import autocast_dtype, batch_to, build_optimizer


def iteration_cost(cfg: dict, iters: int = 10, batch_size: int = 8, progress: bool = False) -> dict:
    """Seconds per training iteration on one fixed batch: plain (step-0 loss, no teacher) vs
    ``incdet`` (the same student plus a teacher forward and distillation), measured
    alternately in one process so that machine noise hits both alike."""
    seed_everything(0)
    cfg = copy.deepcopy(cfg)
    classes, sc, plan, images, targets = new_class_batch(cfg, batch_size, progress=progress)
    previous_model = methods.build_model(cfg["model"], [len(sc.old)])
    previous = {"model": previous_model.state_dict(), "head_layout": [len(sc.old)]}
    student = methods.build_student(cfg, sc, plan, previous)
    teacher = methods.build_teacher(cfg, previous)
    plain_plan = methods.plan_step("finetune", classes, sc)
    plain = methods.make_criterion(cfg, student, None, plain_plan, classes, sc)
    incdet = methods.make_criterion(cfg, student, teacher, plan, classes, sc)
    optimizer = build_optimizer(student, dict(cfg["train"], lr=1e-4))
    student.train()

    def one(fn) -> float:
        t0 = time.perf_counter()
        losses = fn(list(images), list(targets))
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return time.perf_counter() - t0

    for fn in (plain, incdet):  # warm-up
        one(fn)
    times = {"plain": [], "incdet": []}
    for _ in range(iters):
        times["plain"].append(one(plain))
        times["incdet"].append(one(incdet))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"batch_size": len(images), "iters": iters, "plain_s": med["plain"],
            "incdet_s": med["incdet"], "ratio": med["incdet"] / med["plain"]}


def training_throughput(cfg: dict, iters: int = 30, progress: bool = False,
                        device: str | torch.device = "cpu") -> dict:
    """Images/s of the step-0 training loop (data loading included) over ``iters`` iterations,
    on ``device`` (with ``train.amp`` and ``train.channels_last`` as the config sets them)."""
    device = resolve_device(device, "device")
    seed_everything(0)
    train_set, _, classes = load_experiment(cfg, progress)
    sc = classes.step(0)
    plan = methods.plan_step("joint", classes, sc)
    records = filter_for_classes(train_set.records, plan.train_classes)
    tcfg = cfg["train"]
    loader = train_loader(cfg, classes, records, plan.label_space, None, seed=0)
    memory_format = torch.channels_last if tcfg.get("channels_last") else torch.contiguous_format
    model = methods.build_student(cfg, sc, plan, None).to(device, memory_format=memory_format)
    loss_fn = methods.make_criterion(cfg, model, None, plan, classes, sc)
    optimizer = build_optimizer(model, tcfg)
    amp = autocast_dtype(tcfg, device)
    model.train()
    seen, t0, warm = 0, None, 3
    for i, (images, targets) in enumerate(loader):
        if i == warm:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0, seen = time.perf_counter(), 0
        images, targets = batch_to(images, targets, device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            losses = loss_fn(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        seen += len(images)
        if i >= warm + iters - 1:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    return {"iters": iters, "batch_size": int(tcfg["batch_size"]), "device": str(device),
            "images_per_second": seen / seconds, "threads": torch.get_num_threads()}
