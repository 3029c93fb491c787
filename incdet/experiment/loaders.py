"""The inputs of one step: the experiment's data and class space, the training loader (new images
and replayed memory images mixed into every batch) and fixed batches for cost measurements."""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch

from incdet.base import distributed as dist
from incdet.base.errors import UserError
from incdet.data.classes import ClassSpace, merge_categories
from incdet.data.dataset import DetectionDataset, collate, make_loader
from incdet.data.records import filter_for_classes
from incdet.data.sampler import MixedBatchSampler
from incdet.data.sources import category_changes, ensure_builtin, load_subset
from incdet.data.transforms import build_train_transform
from incdet.experiment import methods
from incdet.train.engine import resolve_num_workers
from incdet.train.memory import Memory


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if transform is not None and hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


def train_loader(cfg: dict, classes: ClassSpace, records, label_space, memory: Memory | None,
                 seed: int, device=None):
    """The step's training loader: new images (label space of the step) and, with a memory,
    replayed memory images (each with its own label space) mixed into every batch.

    The replayed pool is the whole memory. A memory image that is also one of the step's new
    images (it has new-class boxes too) is annotated for both label spaces and replayed from the
    memory, not drawn a second time as a new image: were it left among the new images, only the
    memory images *without* new-class boxes would be replayed, and on data where most images hold
    both old and new classes, ``replay_fraction`` of every batch would go to a handful of images
    (11 of a 99-image memory on the built-in 5+5 split). If every new image is in the memory,
    they stay new images, annotated for both, and only the memory's other images are replayed.
    """
    tcfg = cfg["train"]
    stored = dict(memory.records) if memory is not None else {}
    spaces = {i: classes.labels(memory.label_spaces[i]) for i in stored}
    in_memory = [rec for rec in records if rec.id in stored]
    for rec in in_memory:
        old = stored[rec.id]
        stored[rec.id] = replace(rec, boxes=np.concatenate([rec.boxes, old.boxes]),
                                 category_ids=np.concatenate([rec.category_ids, old.category_ids]),
                                 iscrowd=np.zeros(len(rec.boxes) + len(old.boxes), bool),
                                 areas=None)
        spaces[rec.id] = sorted(set(label_space) | set(spaces[rec.id]))
    if in_memory and len(in_memory) == len(records):
        # every new image is in the memory: they stay the step's new images (annotated for both)
        records = [stored.pop(rec.id) for rec in records]
        new_spaces = [spaces[rec.id] for rec in records]
    else:
        records = [rec for rec in records if rec.id not in stored]
        new_spaces = [list(label_space)] * len(records)
    mem_records = [rec for _, rec in sorted(stored.items())]
    mem_spaces = [spaces[r.id] for r in mem_records]
    dataset = DetectionDataset(records + mem_records, classes.label_of, new_spaces + mem_spaces,
                               build_train_transform(cfg["augment"]),
                               num_replayed=len(mem_records))
    bs = int(tcfg["batch_size"])
    workers = resolve_num_workers(tcfg["num_workers"])
    world, rank = dist.world_size(), dist.rank()
    generator = torch.Generator()
    generator.manual_seed(int(tcfg["seed"]) + seed)
    if mem_records:
        sampler = MixedBatchSampler(len(records), len(mem_records), bs * world,
                                    float(cfg["memory"]["replay_fraction"]), generator,
                                    cfg["memory"]["replay_mode"])
    elif world > 1:
        sampler = torch.utils.data.BatchSampler(
            torch.utils.data.RandomSampler(dataset, generator=generator), bs * world,
            drop_last=len(dataset) > bs * world)
        sampler.generator = generator
    else:
        sampler = None
    if sampler is not None:
        if world > 1:  # every process draws the same global batches and keeps its slice
            sampler = dist.ShardedBatchSampler(sampler, rank, world)
        loader = make_loader(dataset, bs, shuffle=False, num_workers=workers,
                             seed=int(tcfg["seed"]) + seed + 7919 * rank, batch_sampler=sampler,
                             device=device)
    else:
        loader = make_loader(dataset, bs, shuffle=True, num_workers=workers,
                             seed=int(tcfg["seed"]) + seed, drop_last=len(dataset) > bs,
                             device=device)
    loader.worker_init_fn = _seed_worker
    return loader


def _shuffle_generator(loader) -> torch.Generator:
    return getattr(loader.batch_sampler, "generator", None) or loader.generator


def load_experiment(cfg: dict, progress: bool = True):
    """Data and class bookkeeping shared by training and evaluation."""
    ensure_builtin(cfg["data"], progress)
    changes = category_changes(cfg["data"], cfg.get("categories"))
    train_set = load_subset(cfg["data"], "train", changes)
    val_set = load_subset(cfg["data"], "val", changes)
    train_ids = [c["id"] for c in train_set.categories]
    if len(val_set.files) == 1 and train_ids != [c["id"] for c in val_set.categories]:
        raise UserError(f"{val_set.source}: its categories differ from {train_set.source}; both "
                        "subsets must share one category list (or give data.val as a list: "
                        "the old classes' validation file and the new data's)")
    categories = merge_categories(train_set.categories, cfg.get("categories"),
                                  str(train_set.source))
    if len(val_set.files) > 1:
        known = {c["id"] for c in categories}
        unknown = [c for c in val_set.categories if c["id"] not in known]
        missing = sorted(set(train_ids) - {c["id"] for c in val_set.categories})
        if unknown or missing:
            raise UserError(
                f"data.val: {val_set.source}: " + (
                    f"class {unknown[0]['name']!r} (id {unknown[0]['id']}) is neither in the "
                    "training file nor among the imported detector's classes" if unknown else
                    f"no validation file lists the training class id {missing[0]}") +
                "; every validation class must be one the experiment knows, and every training "
                "class must be listed by a validation file")
    order = cfg["class_order"]
    if order is None and cfg.get("categories") and not isinstance(cfg["split"], list):
        # an imported detector's classes come first, in its own order; then the others
        imported = [int(c["id"]) for c in cfg["categories"]]
        order = imported + sorted({int(c["id"]) for c in categories} - set(imported))
    classes = ClassSpace(categories, cfg["split"], order)
    return train_set, val_set, classes


def new_class_batch(cfg: dict, batch_size: int, method: str = "incdet", t: int = 1,
                    progress: bool = False):
    """One fixed batch for cost measurements: the first ``batch_size`` training images of step
    ``t``'s new classes, annotated for ``method``'s label space, without augmentation. Returns
    ``(classes, step classes, plan, images, targets)``."""
    train_set, _, classes = load_experiment(cfg, progress)
    sc = classes.step(t)
    records = filter_for_classes(train_set.records, sc.new)[:batch_size]
    plan = methods.plan_step(method, classes, sc)
    dataset = DetectionDataset(records, classes.label_of, [plan.label_space] * len(records))
    images, targets = collate([dataset[i] for i in range(len(records))])
    return classes, sc, plan, images, targets
