"""Gradients of one training iteration on a fixed batch of 4 images, in one process or split
over the processes of ``torchrun`` (used by test_distributed.py; not a test module itself).

    python tests/ddp_worker.py CONFIG OUT.pt [local]

``local``: skip DDP's gradient synchronisation (``no_sync``), a negative control.
"""
import contextlib
import sys

import torch

from incdet.base import distributed as dist
from incdet.base.config import load_config
from incdet.data.dataset import DetectionDataset, collate
from incdet.data.records import filter_for_classes
from incdet.experiment import methods
from incdet.experiment.loaders import load_experiment


def main(cfg_path: str, out: str, mode: str = "sync") -> None:
    cfg = load_config(cfg_path, ["model.backbone=resnet18", "model.norm=groupnorm"])
    device = torch.device(dist.setup("cpu"))
    torch.manual_seed(0)
    train_set, _, classes = load_experiment(cfg, progress=False)
    sc = classes.step(0)
    plan = methods.plan_step("joint", classes, sc)
    records = filter_for_classes(train_set.records, plan.train_classes)[:4]
    dataset = DetectionDataset(records, classes.label_of, [plan.label_space] * len(records))
    items = [dataset[i] for i in range(len(records))]
    mine = items[dist.rank()::dist.world_size()]
    images, targets = collate(mine)
    model = methods.build_student(cfg, sc, plan, None).to(device)
    criterion = methods.make_criterion(cfg, model, None, plan, classes, sc)
    loss_fn, ddp = dist.wrap(model, criterion, device)
    model.train()
    ctx = ddp.no_sync() if mode == "local" and ddp is not None else contextlib.nullcontext()
    with ctx:
        losses = loss_fn(list(images), list(targets))
        sum(losses.values()).backward()
    if dist.is_main():
        torch.save({n: p.grad.clone() for n, p in model.named_parameters()
                    if p.grad is not None}, out)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
