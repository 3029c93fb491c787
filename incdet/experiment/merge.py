"""One detector out of several: teachers distilled into one student (``tools/merge.py``).

:func:`merge` reads the teachers (any step folders or checkpoints: every method, ``branch`` and
imported detectors included), builds their class space, trains a student on a transfer set with
:class:`~incdet.train.merging.MergeCriterion` and writes an ordinary step folder
(``checkpoint.pt``, ``config.yaml``, ``metrics.json``), so the merged model can be evaluated,
exported in every format (``state_dict`` included: it has one classification tower) and be the
starting point of the next incremental step.

* **Classes** (:func:`union_classes`): the union of the teachers' classes by category id. The
  order is the first teacher's classes (its steps, in its order), then each further teacher's
  classes not yet present (its steps, in its order); the merged model has one step per teacher
  step that still has classes, and is step ``t = steps - 1``. A category id with two names is an
  error. A class several teachers know is an error unless ``merge.overlap`` settles it:
  ``first`` (the first teacher that knows it answers) or ``mean`` (the mean of their
  probabilities).
* **Student**: its layout comes from the config (default: the first teacher's model settings),
  with one classification tower (a stock torchvision RetinaNet after export) and no per-step
  caps. It starts from the first teacher's weights wherever names and shapes match (backbone,
  FPN, towers, box subnet; a classifier when that teacher's step used tower 0), else as a step 0
  would (``model.weights``, then random).
* **Transfer set**: an image folder (no labels), or the config's training data: every image, its
  boxes kept for the classes of the union it annotates; ``merge.transfer_step: t`` keeps step
  ``t``'s images only (as that step trains: annotated for its classes); ``merge.labels: false``
  drops every box (pure distillation).
* **Settings per use** (:func:`resolve_settings`): ``merge.gamma``, ``merge.box_thresh``,
  ``merge.annotated``, ``merge.cls_weight`` and ``merge.anchors`` default to ``auto``. A
  student that starts from a teacher's weights is *merging*: it must hold what it already
  knows while it learns the rest (plain KL on the anchors where the teachers are confident,
  ERD's rule, boxes from probability 0.2, the classes the transfer set annotates learnt from
  their boxes alone, the classification distillation at weight 0.25 so that those classes
  can move the shared features). An untrained student is *compressing*: it learns everything
  from a teacher stronger than the labels (every anchor, the focal weight gamma 2 on the
  ~10^5 easy ones, boxes from 0.5, every class distilled, weight 1). metrics.json records the
  values; benchmarks.md, "Merge and compress detectors", has the measurements behind them.
* **Budget**: ``merge.iters``, else the config's step budget for the union's classes
  (``train.iters_per_class`` times their number, ``train.max_iters``, or ``train.epochs``).

Nothing is written until the teachers, the classes and the transfer set have been checked.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from incdet.base.config import dump_config, with_defaults
from incdet.base.devices import resolve_device, seed_everything
from incdet.base.errors import UserError, check_choice
from incdet.base.io import image_files
from incdet.data.classes import ClassSpace
from incdet.data.dataset import DetectionDataset, make_loader
from incdet.data.records import ImageRecord, filter_for_classes
from incdet.data.transforms import build_train_transform
from incdet.evaluation.coco_eval import METRIC_KEYS, evaluate_model, format_table
from incdet.experiment.loaders import load_experiment
from incdet.experiment.methods import step_iterations
from incdet.experiment.step_folder import completed, write_step
from incdet.model.builder import build_model, head_record
from incdet.model.checkpoint import load_checkpoint, model_from_checkpoint
from incdet.train.engine import (
    TrainSettings,
    apply_deterministic,
    build_optimizer,
    build_scheduler,
    train,
)
from incdet.train.losses import DetectionLoss
from incdet.train.merging import MergeCriterion, MergeTeacher

log = logging.getLogger(__name__)

OVERLAP_RULES = ("error", "first", "mean")
# the merge settings that are a choice among names, not a number
CHOICES = {"annotated": ("auto", "distil", "labels"), "anchors": ("auto", "all", "erd")}
# every merge setting under "auto": (student from a teacher's weights: merging,
# consolidation), (student untrained: compression); benchmarks.md, "Merge and compress
# detectors", measures both uses with both settings
AUTO = {"gamma": (0.0, 2.0), "box_thresh": (0.2, 0.5), "annotated": ("labels", "distil"),
        "cls_weight": (0.25, 1.0), "anchors": ("erd", "all")}


@dataclass
class Teacher:
    """A trained step read for merging: its model (frozen, eval) and classes."""

    source: str
    ckpt: dict
    cfg: dict
    model: torch.nn.Module
    ids: tuple[int, ...]  # category id of each output, in label order
    names: dict[int, str]
    steps: list[tuple[int, ...]]


def load_teacher(spec: str | Path) -> Teacher:
    """A teacher from a step folder or a checkpoint file."""
    path = Path(spec)
    if path.is_dir():
        path = path / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    cfg = with_defaults(ckpt["config"])
    model = model_from_checkpoint(ckpt, cfg, path)
    for p in model.parameters():
        p.requires_grad_(False)
    n = sum(ckpt["head_layout"])
    ids = tuple(int(c) for c in ckpt["class_order"][:n])
    names = {int(k): str(v) for k, v in ckpt["names"].items() if int(k) in ids}
    steps = [tuple(int(c) for c in s) for s in ckpt["steps"][:int(ckpt["step"]) + 1]]
    return Teacher(str(path), ckpt, cfg, model, ids, names, steps)


@dataclass
class MergedClasses:
    """The student's classes: ``steps`` (category ids per step, in label order), ``names``, and
    per teacher the ``(student label, teacher label)`` pairs it answers for."""

    steps: list[tuple[int, ...]]
    names: dict[int, str]
    answers: list[list[tuple[int, int]]]

    @property
    def order(self) -> tuple[int, ...]:
        return tuple(c for s in self.steps for c in s)

    def categories(self) -> list[dict]:
        return [{"id": c, "name": self.names[c]} for c in self.order]


def union_classes(teachers: Sequence[tuple[str, Sequence[int], dict, Sequence[Sequence[int]]]],
                  overlap: str = "error") -> MergedClasses:
    """The union of the teachers' classes (module docstring). ``teachers``: per teacher
    ``(name, category ids in label order, {id: name}, steps)``."""
    check_choice("merge.overlap", overlap, OVERLAP_RULES)
    names: dict[int, str] = {}
    owner: dict[int, str] = {}
    steps: list[tuple[int, ...]] = []
    for name, ids, tnames, tsteps in teachers:
        for cid in ids:
            if cid in names and names[cid] != tnames[cid]:
                raise UserError(f"category id {cid} is {names[cid]!r} in {owner[cid]} but "
                                f"{tnames[cid]!r} in {name}: one id must name one class; give "
                                "the teachers' classes distinct ids")
            if cid in names and overlap == "error":
                raise UserError(f"class {cid} ({tnames[cid]!r}) is known to {owner[cid]} and "
                                f"{name}: say which answers with --overlap first (the first "
                                "teacher) or --overlap mean (the mean of their probabilities)")
        for step in tsteps:
            new = tuple(c for c in step if c not in names)
            if new:
                steps.append(new)
            for c in new:
                names[c] = tnames[c]
                owner[c] = name
    label = {c: i for i, c in enumerate(c for s in steps for c in s)}
    answers = []
    for name, ids, _, _ in teachers:
        answers.append([(label[c], j) for j, c in enumerate(ids)
                        if overlap == "mean" or owner[c] == name])
    return MergedClasses(steps, names, answers)


def student_config(cfg: dict, merged: MergedClasses) -> dict:
    """The merged step's config: ``cfg`` with the union's classes as its split and categories,
    one classification tower, no per-step caps, and ``incdet`` for the steps that follow."""
    out = copy.deepcopy(cfg)
    out["split"] = [list(s) for s in merged.steps]
    out["categories"] = merged.categories()
    out["class_order"] = None
    out["model"]["caps_per_step"] = False
    out["incremental"]["method"] = "incdet"
    return out


def build_student(cfg: dict, merged: MergedClasses, first: Teacher) -> tuple:
    """The student (module docstring), and how many of its tensors came from ``first``: all but
    the classifiers of classes ``first`` does not have on tower 0 when the network (every tensor
    outside the classifiers) has ``first``'s layout, else none."""
    model = build_model(cfg["model"], [len(s) for s in merged.steps], [0] * len(merged.steps))
    own = model.state_dict()
    theirs = first.ckpt["model"]
    prefix = "head.classification_head.classifiers."
    network = {k: v for k, v in own.items() if not k.startswith(prefix)}
    if any(k not in theirs or theirs[k].shape != v.shape for k, v in network.items()):
        return model, 0, len(own)  # another layout (compression): trained as a step 0 is
    towers = first.ckpt.get("head_towers") or [0] * len(first.ckpt["head_layout"])
    copied = dict((k, theirs[k]) for k in network)
    for key, value in own.items():
        if key.startswith(prefix):
            s = int(key[len(prefix):].split(".")[0])
            if s < len(towers) and towers[s] == 0 and \
                    tuple(first.steps[s]) == tuple(merged.steps[s]) and \
                    theirs.get(key) is not None and theirs[key].shape == value.shape:
                copied[key] = theirs[key]
    model.load_state_dict(copied, strict=False)
    return model, len(copied), len(own)


def resolve_settings(mcfg: dict, from_teacher: bool) -> dict:
    """Every setting of :data:`AUTO` (``merge.gamma``, ``box_thresh``, ``annotated``,
    ``cls_weight``, ``anchors``) with ``auto`` resolved:
    the first value of :data:`AUTO` when the student starts from a teacher's weights, else the
    second. A value that is neither ``auto`` nor valid is a :class:`UserError` naming the key."""
    out = {}
    for key, (merging, compressing) in AUTO.items():
        value = mcfg.get(key, "auto")
        if value == "auto":
            value = merging if from_teacher else compressing
        elif key in CHOICES:
            check_choice(f"merge.{key}", value, CHOICES[key])
        else:
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise UserError(f"merge.{key}: {value!r} is neither auto nor a number") from None
            if value < 0:
                raise UserError(f"merge.{key}: {value} is negative; give auto or a number >= 0")
        out[key] = value
    return out


def image_folder(folder: str | Path) -> list[ImageRecord]:
    """Unlabelled records of every image in ``folder`` (:func:`~incdet.base.io.image_files`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--images {folder}: not a folder of images")
    paths = image_files([folder])
    records = []
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                w, h = im.size
        except OSError as e:
            raise UserError(f"{p}: cannot read the image ({e})") from None
        records.append(ImageRecord(i, str(p), w, h))
    return records


def transfer_set(cfg: dict, merged: MergedClasses, images: str | Path | None,
                 train_set=None, data_classes: ClassSpace | None = None):
    """The transfer set's records and label spaces (student label indices each image is
    annotated for), and a description for metrics.json."""
    mcfg = cfg["merge"]
    label_of = {c: i for i, c in enumerate(merged.order)}
    if images is not None:
        records = image_folder(images)
        return records, [[] for _ in records], {"images": str(images), "labels": False}
    step = mcfg.get("transfer_step")
    if step is not None:
        if not 0 <= int(step) < data_classes.num_steps:
            raise UserError(f"merge.transfer_step: {step} is not a step of the config's split "
                            f"(0..{data_classes.num_steps - 1})")
        annotated = [c for c in data_classes.step(int(step)).new if c in label_of]
        records = filter_for_classes(train_set.records, data_classes.step(int(step)).new)
    else:
        have = {int(c["id"]) for c in train_set.categories}
        annotated = [c for c in merged.order if c in have]
        records = [_keep_classes(r, annotated) for r in train_set.records]
    if not records:
        raise UserError(f"{train_set.source}: the transfer set is empty (merge.transfer_step: "
                        f"{step})")
    if not mcfg["labels"]:
        records = [_keep_classes(r, []) for r in records]
        annotated = []
    space = sorted(label_of[c] for c in annotated)
    return records, [space] * len(records), {"images": train_set.source, "step": step,
                                             "labels": bool(annotated)}


def _keep_classes(rec: ImageRecord, ids: Sequence[int]) -> ImageRecord:
    wanted = set(ids)
    keep = [i for i, c in enumerate(rec.category_ids.tolist())
            if c in wanted and not rec.iscrowd[i]]
    return ImageRecord(rec.id, rec.path, rec.width, rec.height, rec.boxes[keep],
                       rec.category_ids[keep], rec.iscrowd[keep])


def merge(teacher_specs: Sequence[str | Path], work_dir: str | Path, cfg: dict | None = None,
          images: str | Path | None = None, force: bool = False, progress: bool = True,
          evaluate: bool = True) -> dict:
    """Distil ``teacher_specs`` into one student and write ``work_dir/step_<t>/`` (module
    docstring); returns its metrics. ``cfg``: the student's layout, training settings, data and
    ``merge`` section (default: the first teacher's saved config).

    The merge's story, one phase per function: :func:`load_teachers` (the teachers and the union
    of their classes), :meth:`MergeRun.prepare` (the transfer set, the student, its loss, loader
    and optimizer), :meth:`MergeRun.train`, :meth:`MergeRun.evaluate` (without ``evaluate`` or
    validation data: no figures) and :meth:`MergeRun.write` (checkpoint and, last,
    metrics.json)."""
    teachers, cfg, merged = load_teachers(teacher_specs, cfg)
    run = MergeRun.prepare(cfg, teachers, merged, Path(work_dir), images, force, progress)
    result = run.train()
    evaluated = run.evaluate(evaluate)
    return run.write(result, evaluated)


def load_teachers(teacher_specs: Sequence[str | Path],
                  cfg: dict | None) -> tuple[list[Teacher], dict, MergedClasses]:
    """The teachers, the config (a copy of ``cfg``, default the first teacher's) and the union
    of their classes (``merge.overlap`` settles a class several teachers know)."""
    if not teacher_specs:
        raise UserError("give at least one --teacher")
    teachers = [load_teacher(s) for s in teacher_specs]
    cfg = copy.deepcopy(cfg) if cfg is not None else copy.deepcopy(teachers[0].cfg)
    merged = union_classes([(t.source, t.ids, t.names, t.steps) for t in teachers],
                           cfg["merge"]["overlap"])
    return teachers, cfg, merged


@dataclass
class MergeRun:
    """One merge in progress: what :meth:`prepare` builds and the later phases read."""

    cfg: dict  # the student's config (student_config)
    teachers: list[Teacher]
    merged: MergedClasses
    step_dir: Path
    progress: bool
    val_set: object  # None: no validation data (a transfer set of images only)
    transfer: dict  # the transfer set, as metrics.json describes it
    images: int  # the transfer set's images
    device: torch.device
    student: torch.nn.Module
    copied: int  # tensors the student took from the first teacher ...
    total: int  # ... of its total
    settings: dict  # the merge settings with auto resolved (resolve_settings)
    criterion: MergeCriterion
    loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: object
    iters: int

    @property
    def t(self) -> int:
        return len(self.merged.steps) - 1

    @classmethod
    def prepare(cls, cfg: dict, teachers: list[Teacher], merged: MergedClasses, work_dir: Path,
                images: str | Path | None, force: bool, progress: bool) -> MergeRun:
        """The step folder claimed (an existing result is an error without ``force``, and goes
        with it), the transfer set, the student and its loss, loader, optimizer and schedule;
        the resolved config.yaml is written last, once everything has been checked."""
        mcfg = cfg["merge"]
        step_dir = work_dir / f"step_{len(merged.steps) - 1}"
        if (step_dir / "metrics.json").is_file() and not force:
            raise UserError(f"{step_dir}: already exists; use another --work-dir or --force")
        completed(step_dir, cfg, force=True)  # --force: the old result goes before the new run
        scfg = student_config(cfg, merged)
        records, spaces, transfer, val_set = load_transfer(cfg, scfg, merged, images, progress)
        tcfg = scfg["train"]
        device = setup_process(tcfg)
        student, copied, total = build_student(scfg, merged, teachers[0])
        log.info("student: %d of %d tensors from %s", copied, total, teachers[0].source)
        settings = resolve_settings(mcfg, copied > 0)
        student = student.to(device).train()
        for tch in teachers:
            tch.model.to(device)
        criterion = build_criterion(scfg, student, teachers, merged, settings, spaces, transfer)
        dataset = DetectionDataset(records, {c: i for i, c in enumerate(merged.order)}, spaces,
                                   build_train_transform(scfg["augment"]))
        bs = int(tcfg["batch_size"])
        loader = make_loader(dataset, bs, shuffle=True, num_workers=0, seed=int(tcfg["seed"]),
                             drop_last=len(dataset) > bs, device=device)
        iters = int(mcfg["iters"] or step_iterations(scfg, len(records), len(merged.order)))
        optimizer = build_optimizer(student, tcfg)
        scheduler = build_scheduler(optimizer, tcfg, iters)
        step_dir.mkdir(parents=True, exist_ok=True)
        dump_config(scfg, step_dir / "config.yaml")
        return cls(scfg, teachers, merged, step_dir, progress, val_set, transfer, len(records),
                   device, student, copied, total, settings, criterion, loader, optimizer,
                   scheduler, iters)

    def train(self):
        """The student's training on the transfer set (log.jsonl in the step folder)."""
        weights = dict(self.cfg["loss"]["weights"], loss_distill_cls=self.settings["cls_weight"])
        result = train(self.student, self.criterion, self.loader, self.optimizer, self.scheduler,
                       TrainSettings(tcfg=self.cfg["train"], weights=weights,
                                     total_iters=self.iters, device=self.device,
                                     log_dir=self.step_dir, progress=self.progress))
        self.student.eval()
        return result

    def evaluate(self, evaluate: bool = True) -> tuple[dict, dict]:
        """The student on the validation images: ``(evaluation, groups)``, the groups being
        old, new, all and each step's classes (those the validation data has). Without
        ``evaluate`` or validation data every figure is None."""
        merged = self.merged
        groups = {"old": tuple(c for s in merged.steps[:-1] for c in s),
                  "new": tuple(merged.steps[-1]), "all": merged.order}
        groups.update({f"step_{s}": g for s, g in enumerate(merged.steps)})
        if not evaluate or self.val_set is None:
            return {"groups": {k: {m: None for m in METRIC_KEYS} for k in groups},
                    "per_class_ap": {str(c): None for c in merged.order}}, groups
        in_val = {int(c["id"]) for c in self.val_set.categories}
        order = [c for c in merged.order if c in in_val]
        groups = {k: tuple(c for c in g if c in in_val) for k, g in groups.items()}
        evaluation = evaluate_model(self.student, self.val_set.records,
                                    self.val_set.categories, order, groups,
                                    int(self.cfg["eval"]["batch_size"]), self.device,
                                    progress=self.progress)
        log.info("merged model evaluation:\n%s", format_table(evaluation, merged.names))
        return evaluation, groups

    def write(self, result, evaluated: tuple[dict, dict]) -> dict:
        """checkpoint.pt and, last and atomically, metrics.json (step_folder.write_step);
        returns the metrics."""
        (evaluation, groups), merged, t = evaluated, self.merged, self.t
        history = [{"step": t, "groups": {k: v["AP"] for k, v in evaluation["groups"].items()
                                          if k.startswith("step_")}}]
        metrics = {
            "step": t, "method": "merge",
            "classes": {"old": list(groups["old"]), "new": list(merged.steps[-1])},
            "map": {k: evaluation["groups"][k] for k in ("old", "new", "all")},
            "groups": {k: v for k, v in evaluation["groups"].items() if k.startswith("step_")},
            "per_class_ap": evaluation["per_class_ap"], "forgetting": {},
            "merge": {"teachers": [tch.source for tch in self.teachers],
                      "answers": [[merged.order[s] for s, _ in ans] for ans in merged.answers],
                      "overlap": self.cfg["merge"]["overlap"], "transfer": self.transfer,
                      **self.settings,
                      "student_from_first_teacher": f"{self.copied}/{self.total} tensors"},
        }
        ckpt = {"class_order": list(merged.order), "steps": [list(s) for s in merged.steps],
                "names": {str(c): n for c, n in merged.names.items()},
                **head_record(self.student), "model": self.student.state_dict(),
                "history": history}
        train_record = {"seconds": result.seconds, "iterations": result.iterations,
                        "skipped_steps": result.skipped_steps,
                        "images_per_second": result.images_per_second, "images": self.images}
        return write_step(self.step_dir, self.cfg, ckpt, metrics, self.device, train_record)


# The phases of MergeRun.prepare, in order.

def load_transfer(cfg: dict, scfg: dict, merged: MergedClasses, images: str | Path | None,
                  progress: bool) -> tuple[list, list, dict, object]:
    """The transfer set (:func:`transfer_set`) and the validation data. With ``images``, data
    the config cannot load is a warning (no evaluation, no labelled data), not an error.
    Returns ``(records, label spaces, description, val_set or None)``."""
    train_set = val_set = data_classes = None
    try:
        train_set, val_set, data_classes = load_experiment(cfg, progress)
    except UserError as e:
        if images is None:
            raise
        log.warning("no evaluation and no labelled data: %s", e)
    records, spaces, transfer = transfer_set(scfg, merged, images, train_set, data_classes)
    return records, spaces, transfer, val_set


def setup_process(tcfg: dict) -> torch.device:
    """Threads, deterministic algorithms (``train.deterministic``), the device and the seed."""
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))
    apply_deterministic(tcfg)
    device = resolve_device(tcfg["device"])
    seed_everything(int(tcfg["seed"]))
    return device


def build_criterion(cfg: dict, student: torch.nn.Module, teachers: list[Teacher],
                    merged: MergedClasses, settings: dict, spaces: list,
                    transfer: dict) -> MergeCriterion:
    """The student's loss: each teacher distils the classes it answers for, except, with
    ``merge.annotated: labels``, those the transfer set annotates (they learn from their boxes
    alone); the detection loss on those boxes when there are any."""
    skip = set(spaces[0]) if settings["annotated"] == "labels" and transfer["labels"] else set()
    merge_teachers = [MergeTeacher(tch.model, [s for s, _ in ans if s not in skip],
                                   [j for s, j in ans if s not in skip], tch.source)
                      for tch, ans in zip(teachers, merged.answers)]
    merge_teachers = [m for m in merge_teachers if m.student_labels]
    detection = DetectionLoss(cfg["loss"], student.box_coder, student.proposal_matcher) \
        if transfer["labels"] else None
    return MergeCriterion(student, merge_teachers, len(merged.order),
                          {**cfg["merge"], **settings}, detection, labelled=sorted(skip))
