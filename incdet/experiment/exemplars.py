"""The exemplar memory around a step: herding the step's images into the memory after training
(:func:`select_memory`; :mod:`incdet.train.memory` has the rules), End-to-End Incremental
Learning's balanced fine-tuning on it, and the memory of a step trained without one.

Candidates (``memory.candidates_per_class: N``)
    By default every training image of the step is a candidate: its RoI features are computed and
    each new class ranks all the images that hold it. With ``N``, each new class ``c`` draws at
    most ``N`` of the images that hold it (:func:`candidate_ids`: a random sample without
    replacement, seeded by ``train.seed + c``; a class with at most ``N``
    images keeps them all), features are computed only for the union of those samples (at most
    ``N x |new|`` images) and class ``c`` ranks only its own sample. The feature pass and the
    ranking are then bounded whatever the dataset's size.
"""
import copy
from pathlib import Path

import numpy as np

from incdet.base.devices import resolve_device
from incdet.base.errors import UserError
from incdet.base.io import atomic_write_json
from incdet.data.classes import ClassSpace
from incdet.data.dataset import DetectionDataset, make_loader
from incdet.data.disjoint import training_records
from incdet.data.transforms import build_train_transform
from incdet.experiment import methods
from incdet.experiment.loaders import load_experiment
from incdet.model.checkpoint import check_compatible, load_checkpoint, model_from_checkpoint
from incdet.train.engine import TrainSettings, build_optimizer, build_scheduler, train
from incdet.train.memory import Memory, build_memory, quotas, rank_classes, roi_features


def candidate_ids(records, class_ids, per_class: int | None, seed: int) -> dict[int, set[int]]:
    """Per class of ``class_ids``, the ids of the images whose features it ranks: all the records
    holding the class, or with ``per_class`` a seeded random sample of at most that many (see the
    module docstring)."""
    holding: dict[int, list[int]] = {c: [] for c in class_ids}
    for rec in records:
        for c in set(rec.category_ids.tolist()) & holding.keys():
            holding[c].append(rec.id)
    if per_class is None:
        return {c: set(ids) for c, ids in holding.items()}
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise UserError(f"memory.candidates_per_class {per_class!r}: expected a positive number "
                        "of images or null (all)")
    out = {}
    for c, ids in holding.items():
        pick = np.random.default_rng(seed + c).permutation(len(ids))[:per_class]
        out[c] = {ids[i] for i in pick}
    return out


def select_memory(cfg: dict, model, records, previous: Memory | None, sc, device,
                  progress: bool) -> Memory:
    """Herd the step's training images per new class and update the memory (module
    :mod:`incdet.train.memory` documents the rules; ``memory.candidates_per_class`` bounds the
    images whose features are computed, see this module's docstring)."""
    mcfg = cfg["memory"]

    quota = quotas(list(sc.seen), mcfg.get("budget"), mcfg.get("per_class"))
    limit = max(quota[c] for c in sc.new)
    seed = int(cfg["train"]["seed"])
    per_class = mcfg.get("candidates_per_class")
    feats_of = records
    if per_class is not None:
        candidates = candidate_ids(records, sc.new, per_class, seed)
        union = set().union(*candidates.values())
        feats_of = [r for r in records if r.id in union]
    feats = roi_features(model, feats_of, int(cfg["eval"]["batch_size"]), device,
                         int(mcfg["feature_size"]), progress)
    if per_class is not None:  # each class ranks its own sample only
        feats = {(i, c): v for (i, c), v in feats.items() if i in candidates.get(c, ())}
    rankings = rank_classes(feats, sc.new, mcfg["selection"], limit, seed)
    return build_memory(previous, rankings, {r.id: r for r in records}, sc.new, sc.seen, mcfg)


def balanced_finetune(cfg: dict, student, classes: ClassSpace, sc, memory: Memory, device,
                      step_dir: Path, writer, progress: bool) -> None:
    """End-to-End Incremental Learning's balanced fine-tuning: a short, low learning-rate
    training on the class-balanced memory (old and new classes alike), distilling every class
    from the model as it was before this stage."""
    bcfg = cfg["memory"]["balanced_finetune"]
    recs = [memory.records[i] for i in sorted(memory.records)]
    spaces = [classes.labels(memory.label_spaces[i]) for i in sorted(memory.records)]
    dataset = DetectionDataset(recs, classes.label_of, spaces,
                               build_train_transform(cfg["augment"]))
    tcfg = dict(cfg["train"], lr=float(cfg["train"]["lr"]) * float(bcfg["lr_scale"]),
                warmup_iters=0)
    loader = make_loader(dataset, int(tcfg["batch_size"]), shuffle=True, num_workers=0,
                         seed=int(tcfg["seed"]) + 1000 + sc.step,
                         drop_last=len(dataset) > int(tcfg["batch_size"]))
    frozen = copy.deepcopy(student).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    plan = methods.Plan(sc.seen, tuple(classes.labels(sc.seen)), True, True, True)
    criterion = methods.make_criterion(cfg, student, frozen, plan, classes, sc, distill_new=True)
    optimizer = build_optimizer(student, tcfg)
    scheduler = build_scheduler(optimizer, tcfg, int(bcfg["iters"]))
    bft_dir = step_dir / "balanced_finetune"
    bft_dir.mkdir(exist_ok=True)
    train(student, criterion, loader, optimizer, scheduler,
          TrainSettings(tcfg=tcfg, weights=dict(cfg["loss"]["weights"]),
                        total_iters=int(bcfg["iters"]), device=device, log_dir=bft_dir,
                        progress=progress))


def write_memory(cfg: dict, t: int, work_dir: str | Path, progress: bool = True) -> Memory:
    """Select and write ``step_<t>/memory.json`` for a completed step trained without a memory
    (for example a step 0 shared by a variant that uses none). Returns the memory."""
    step_dir = Path(work_dir) / f"step_{t}"
    ckpt = load_checkpoint(step_dir / "checkpoint.pt")
    train_set, _, classes = load_experiment(cfg, progress)
    check_compatible(ckpt, step_dir / "checkpoint.pt", list(classes.order),
                     [list(s) for s in classes.steps], t)
    sc = classes.step(t)
    previous = None
    if t > 0:
        prev_path = Path(work_dir) / f"step_{t - 1}" / "memory.json"
        if not prev_path.is_file():
            raise UserError(f"{prev_path}: missing; the memory of step {t} extends it")
        previous = Memory.from_json(prev_path, cfg["data"]["root"])
    device = resolve_device(cfg["train"]["device"])
    model = model_from_checkpoint(ckpt, cfg, step_dir / "checkpoint.pt").to(device)
    records = training_records(train_set.records, classes.steps, sc.new,
                               cfg["data"]["disjoint_steps"])  # the images step t trained on
    memory = select_memory(cfg, model, records, previous, sc, device, progress)
    atomic_write_json(step_dir / "memory.json",
                      memory.to_json(cfg["data"]["root"], train_set.categories, t))
    return memory
