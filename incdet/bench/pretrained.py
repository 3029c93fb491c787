"""Benchmark section pretrained: adding classes to an imported (pretrained) detector with each
method, and the cost of a ``branch`` iteration against an ``incdet`` one."""
import copy
import json
import time
from pathlib import Path

import torch

from incdet.base.config import apply_overrides, load_config
from incdet.base.devices import seed_everything
from incdet.experiment import methods
from incdet.experiment.importer import import_detector
from incdet.experiment.loaders import load_experiment, new_class_batch
from incdet.experiment.protocol import share_step0
from incdet.experiment.step import run_step
from incdet.model.builder import build_model, keep_frozen_norms
from incdet.model.checkpoint import load_checkpoint, model_from_checkpoint
from incdet.model.torchvision import to_torchvision
from incdet.train.engine import build_optimizer


def pretrained(cfg: dict, work_dir: str | Path, variants: dict[str, list[str]],
               progress: bool = True, cost_iters: int = 10) -> dict:
    """"Add classes to a detector you already have", on the built-in data.

    1. Train a step-0 model on the split's first classes (``cfg``, e.g. shapes_2step: 5 + 5).
    2. Save what a plain torchvision user would have: the weights in a RetinaNet built from
       torchvision's own head classes (:func:`incdet.model.torchvision.to_torchvision`), as a
       state dict.
    3. Rebuild that torchvision model, load the state dict and import it
       (:func:`incdet.experiment.importer.import_detector`), evaluated on the validation set.
    4. Train step 1 from the import for each variant (e.g. ``branch``, ``incdet``, ``finetune``)
       with only the new classes' images and no memory (the old data is gone).

    Returns old / new / all AP per variant, old-class retention against the imported model, the
    step's seconds, and the iteration cost of ``branch`` and ``incdet`` on one batch."""
    work_dir = Path(work_dir)
    base = copy.deepcopy(cfg)
    apply_overrides(base, ["incremental.method=incdet", "memory.budget=0"])
    m0 = run_step(base, 0, work_dir / "trained", resume=True, progress=progress)
    state_path = work_dir / "torchvision_state_dict.pt"
    trained = load_checkpoint(work_dir / "trained" / "step_0" / "checkpoint.pt")
    if not state_path.is_file():
        plain = to_torchvision(model_from_checkpoint(trained))
        torch.save(plain.state_dict(), state_path)
    # the user's side: a torchvision RetinaNet of the same layout, their saved weights loaded
    user_model = to_torchvision(build_model(base["model"], trained["head_layout"]))
    user_model.load_state_dict(torch.load(state_path, weights_only=True))
    _, _, classes = load_experiment(base, progress=False)
    slots = [{"id": c, "name": classes.names[c]} for c in classes.steps[0]]
    imported_dir = work_dir / "imported"
    if (imported_dir / "step_0" / "metrics.json").is_file():
        with open(imported_dir / "step_0" / "metrics.json") as f:
            mi = json.load(f)
    else:
        mi = import_detector(user_model, slots, base, imported_dir, str(state_path),
                             evaluate=True, progress=progress)
    imported_cfg = load_config(imported_dir / "step_0" / "config.yaml")
    imported_cfg["split"] = base["split"]
    imported_ap = mi["map"]["all"]["AP"]
    out = {"trained_step0_ap": m0["map"]["all"]["AP"], "imported_ap": imported_ap,
           "variants": {}}
    for name, overrides in variants.items():
        vcfg = copy.deepcopy(imported_cfg)
        apply_overrides(vcfg, overrides + ["memory.budget=0"])
        vdir = work_dir / name
        share_step0(imported_dir, vdir, vcfg, progress)
        m = run_step(vcfg, 1, vdir, resume=True, progress=progress)
        old = m["map"]["old"]["AP"]
        out["variants"][name] = {
            "old": old, "new": m["map"]["new"]["AP"], "all": m["map"]["all"]["AP"],
            "old_retention": old / imported_ap if imported_ap else None,
            "seconds": m["train"]["seconds"], "iterations": m["train"]["iterations"]}
    out["cost"] = _branch_cost(imported_cfg, load_checkpoint(imported_dir / "step_0" /
                                                             "checkpoint.pt"), cost_iters)
    return out


def _branch_cost(cfg: dict, previous: dict, iters: int, batch_size: int = 8) -> dict:
    """Seconds per training iteration of ``branch`` (frozen backbone, own tower, no teacher)
    and ``incdet`` (whole student plus a teacher) on one fixed batch, alternating."""
    seed_everything(0)
    fns, optimizers = {}, {}
    for method in ("branch", "incdet"):
        mcfg = copy.deepcopy(cfg)
        mcfg["incremental"]["method"] = method
        classes, sc, plan, *batch = new_class_batch(cfg, batch_size, method)
        student = methods.build_student(mcfg, sc, plan, previous)
        teacher = methods.build_teacher(mcfg, previous) if plan.uses_teacher else None
        criterion = methods.make_criterion(mcfg, student, teacher, plan, classes, sc)
        optimizers[method] = build_optimizer(student, dict(mcfg["train"], lr=1e-4))
        student.train()

        keep_frozen_norms(student)
        fns[method] = (criterion, batch)

    def one(method: str) -> float:
        criterion, (images, targets) = fns[method]
        t0 = time.perf_counter()
        losses = criterion(list(images), list(targets))
        optimizers[method].zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizers[method].step()
        return time.perf_counter() - t0

    for m in fns:  # warm-up
        one(m)
    times = {m: [] for m in fns}
    for _ in range(iters):
        for m in fns:
            times[m].append(one(m))
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    return {"batch_size": len(batch[0]), "iters": iters, "branch_s": med["branch"],
            "incdet_s": med["incdet"], "branch_over_incdet": med["branch"] / med["incdet"]}
