"""Configuration: defaults in one place, YAML files with one level of ``_base_``, dotted overrides.

A config file only needs the keys it changes. Every key must exist in :data:`DEFAULTS`; an unknown
(for example misspelled) key is a :class:`~incdet.base.errors.UserError` that names the key and
the file.
``--set a.b=value`` overrides are parsed as YAML scalars (``5``, ``0.1``, ``null``, ``[1, 2]``).
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from incdet.base.errors import UserError
from incdet.base.io import atomic_write_text

# Default values for every key. A value that is a dict here is a section: the user's value for it
# must be a dict too, and its keys are checked. Anything else is a leaf and may take any YAML value.
# The defaults are the CPU preset for the built-in dataset (from-scratch mobilenet_v3_large FPN
# with a halved last stage, narrow head, 128 px images, batch 16, AdamW); the COCO / VOC configs
# override the model and schedule.
DEFAULTS: dict[str, Any] = {
    "data": {
        "format": "coco",  # coco | voc
        "root": "data/shapes",  # other data paths are relative to it (and it to the config file)
        # image folder and annotation file (COCO json; VOC: the ImageSets list), under root
        "train": {"images": "images/train", "annotations": "annotations/train.json"},
        # validation; COCO: or a list of {images, annotations} (say the old classes' own file
        # and the new data's): each image is evaluated for the classes its file lists
        "val": {"images": "images/val", "annotations": "annotations/val.json"},
        # auto: a class takes the id of the known class of its name (an imported detector's),
        # else its file's id if free, else the next free one | file: the files' ids as they are
        # | {name: id, ...}: pinned ids, the others auto (design.md, "Your classes' ids")
        "category_ids": "auto",
        # true: generate the built-in dataset at `root` when that folder is missing or empty
        # (never into a folder with other files). False by default so that a mistyped root is an
        # error, not a silent switch to the built-in data; the shapes presets set it to true.
        "synthetic": {"generate": False, "num_train": 2000, "num_val": 300, "image_size": 128,
                      "seed": 0},
        "val_max_images": None,  # evaluate on the first N validation images only (null: all)
        # every training image belongs to one step only (no image is trained at two steps): an
        # image with classes of several steps goes to one of them, drawn uniformly from its
        # image id (design.md, "Disjoint steps"); false: the standard protocol, where it is
        # trained at each of its steps. joint at step t: every image of steps 0..t, all boxes
        "disjoint_steps": False,
    },
    "split": "5+5",  # "40+40", "40+10x4", or a list of steps (lists of category ids or names)
    "class_order": None,  # null: ascending category id; or a list of ids / names
    # classes the experiment knows besides the dataset's, [{id, name}, ...]: an imported
    # detector's (tools/import_detector.py writes them); an id in both must have the same name
    "categories": None,
    "model": {
        # resnet18 | resnet34 | resnet50 | mobilenet_v2 (ImageNet weights reachable here:
        # make weights) | mobilenet_v3_large | mobilenet_v3_small (11 blocks, not 15: a
        # shallower student for compression; benchmarks.md)
        "backbone": "mobilenet_v3_large",
        "weights": None,  # null | torchvision weights name (local cache only) | path to a file
        "width_mult": 1.0,  # mobilenets only: channel multiplier (from scratch)
        "reduced_tail": True,  # mobilenets only: halve the channels of the last stage
        "trainable_layers": 5,  # backbone stages trained when weights are given (0-5)
        # auto (frozen for a ResNet with weights, else batchnorm) | batchnorm | groupnorm | frozen |
        # frozen_eval (frozen, computed as BatchNorm2d in eval mode: imported BatchNorm detectors)
        "norm": "auto",
        "fpn_channels": 64,  # width of the FPN and of the heads
        "fpn_norm": "none",  # none | batchnorm | groupnorm: normalisation after the FPN convs
        "head_convs": 2,  # convs in each head tower (torchvision: 4)
        "head_norm": "groupnorm",  # groupnorm | none
        "p6_from": "p5",  # p5 (torchvision's v1) | c5 (torchvision's v2): input of P6-P7
        # one entry per FPN level P3..P7: a base size (expanded to anchor_scales octave scales)
        # or a list of sizes taken as they are (imported torchvision detectors)
        "anchor_sizes": [16, 32, 64, 128, 256],
        "anchor_scales": 3,  # octave scales per level: size * 2**(i/n), i < n
        "aspect_ratios": [1.0],  # the built-in shapes are roughly square; COCO uses 0.5, 1, 2
        "fg_iou_thresh": 0.4,  # anchor-to-box IoU for a positive anchor
        "bg_iou_thresh": 0.3,  # below it an anchor is background; between the two, ignored
        "min_size": 128,  # images are resized so that the shorter side is min_size
        "max_size": 128,  # ... and the longer side at most max_size
        "score_thresh": 0.05,  # detections below this score are dropped
        "nms_thresh": 0.5,  # IoU of the class-wise NMS
        "detections_per_img": 100,  # kept per image (per step with caps_per_step)
        "topk_candidates": 1000,  # best scores kept per FPN level before NMS
        "prior_probability": 0.01,  # focal-loss prior: initial score of a new class
        "image_mean": None,  # null: torchvision's ImageNet mean; or [r, g, b] in [0, 1]
        "image_std": None,  # null: torchvision's ImageNet std
        # auto (on for branch) | true | false: topk_candidates and detections_per_img apply to
        # each step's classes on their own, so that added classes cannot push old detections out
        "caps_per_step": "auto",
    },
    "augment": {
        "hflip": 0.5,  # probability
        "scale": [0.75, 1.25],  # scale jitter range (null: off)
        "scale_p": 0.5,  # probability of the scale jitter
        "crop_p": 0.3,  # probability of a random crop that keeps every box
        "brightness_contrast_p": 0.5,  # probability of the brightness / contrast jitter
        "brightness": 0.2,  # brightness jitter limit
        "contrast": 0.2,  # contrast jitter limit
    },
    "loss": {
        "box": "giou",  # giou | l1 | smooth_l1
        "focal_alpha": 0.25,  # focal loss alpha
        "focal_gamma": 2.0,  # focal loss gamma
        # weight of each loss term; loss_distill_cls applies to every loss_distill_cls_<step>
        "weights": {"loss_cls": 1.0, "loss_box": 1.0, "loss_distill_cls": 1.0,
                    "loss_distill_box": 1.0},
    },
    "train": {
        "epochs": 12,  # per step, when max_iters and iters_per_class are null
        "max_iters": None,  # stop after this many iterations (overrides epochs when set)
        # a step's budget scales with its classes: this many iterations per class the step adds
        # (overrides max_iters and epochs when set; the equal-compute joint trains the sum)
        "iters_per_class": None,
        "batch_size": 16,  # images per iteration and process (new images; memory replay adds)
        "optimizer": "adamw",  # sgd | adamw
        "lr": 0.007,  # AdamW at batch 16 (5e-3 was tuned at batch 8)
        # learning rate of the backbone body (not its FPN) as a fraction of lr: below 1 for a
        # pretrained body, which fine-tunes slower than the layers trained from scratch
        "backbone_lr_scale": 1.0,
        "momentum": 0.9,  # sgd only
        "weight_decay": 0.05,  # not applied to biases and norm weights
        "schedule": "cosine",  # cosine | step
        "lr_steps": [0.67, 0.89],  # step schedule: fractions of the run at which lr *= lr_gamma
        "lr_gamma": 0.1,  # step schedule: learning-rate factor at each of lr_steps
        "warmup_iters": 100,  # linear warm-up iterations
        "warmup_factor": 0.001,  # learning-rate factor at iteration 0
        "grad_clip": 10.0,  # max gradient norm (null: off)
        "seed": 0,  # training seed (initialisation, data order, augmentation)
        "num_workers": 1,  # loader processes, or auto: the free CPU cores (at most 8)
        "threads": None,  # torch intra-op threads (null: torch's default)
        # CPU training: keep freed memory in the process instead of handing it back to the
        # system at every iteration (glibc's malloc; elsewhere nothing changes): about 8 % faster;
        # off by default (benchmarks.md: the run-to-run spread first blamed on it was the
        # unseeded augmentation)
        "keep_freed_memory": False,
        # torch.use_deterministic_algorithms (GPU: also cuBLAS workspace, no cuDNN benchmark):
        # GPU runs bitwise repeatable, or an error naming an operator without a deterministic
        # kernel; CPU training repeats without it (it costs there: new tensors are NaN-filled)
        "deterministic": False,
        "device": "auto",  # auto | cpu | cuda | cuda:N (under torchrun: one GPU per process)
        # null | auto | bf16 | fp16: autocast mixed precision (fp16 on CUDA only; auto: bf16 on
        # a GPU that supports it, full precision elsewhere)
        "amp": None,
        "channels_last": False,  # memory format for convolutions (faster on recent GPUs)
        "sync_bn": False,  # SyncBatchNorm across processes under torchrun (GPUs)
        "log_every": 20,  # TensorBoard logging interval, iterations
        "checkpoint_every": 200,  # also save last.pt every N iterations (0: at epoch ends only)
    },
    # every_iters: also evaluate every N training iterations (a multiple of
    # train.checkpoint_every), written to metrics.json "curve": how converged a step is
    "eval": {"batch_size": 16, "every_iters": None},
    "incremental": {
        "method": "incdet",  # incdet | finetune | joint | branch
        # branch: what the new classes get of their own: tower (a classification tower, reading
        # the shared FPN) | fpn (a tower and a copy of the FPN: more to learn with, and more
        # cost) | backbone (a tower, an FPN and a backbone body: a whole network per step)
        "branch_from": "tower",
        # joint's budget at step t: equal (the sum of the incremental run's step budgets up to t:
        # equal compute, the upper bound) | step (one step's budget: a weaker reference)
        "joint_budget": "equal",
        "temperature": 2.0,  # distillation temperature T (sigmoid_kd)
        "cls_distill": "sigmoid_kd",  # sigmoid_kd | l2
        "box_distill": "l2",  # l2 | smooth_l1 | none
        "anchors": "erd",  # which anchors are distilled: erd | topk | all
        # an anchor matched to an annotated box: labels (every class but the box's is a negative
        # there, also outside the image's label space, and the teacher is not distilled there)
        # | teacher (the focal loss covers the label space only; the teacher is distilled there)
        "labelled_anchors": "teacher",
        # learning rate of a step that goes on from the previous model (incdet, finetune, branch
        # at t >= 1) as a fraction of train.lr; step 0 and joint (a fresh model) train at train.lr
        "lr_scale": 1.0,
        "topk": 100,  # anchors per image for anchors: topk
        "pseudo_labels": False,  # teacher's old-class detections become extra targets
        "pseudo_thresh": 0.5,  # score threshold for pseudo-labels
    },
    "memory": {
        "budget": 100,  # images in total, shared equally among seen classes (0: no memory)
        "per_class": None,  # or images per class (then budget must be null)
        "selection": "herding",  # herding | closest | random
        # memory images per batch, as a fraction of train.batch_size (0.25: 4 at batch 16)
        "replay_fraction": 0.25,
        # add: they come on top of a full batch of new images | share: they take batch places
        "replay_mode": "add",
        # pooled: one loss normalisation for the whole batch | separate: new and memory images
        # each normalised by their own foreground anchors (the new classes' loss is not diluted)
        "replay_loss": "pooled",
        "feature_size": 4,  # RoIAlign output size for memory features
        # at most N images per new class whose features the memory pass computes and ranks (a
        # seeded random sample of the class's images; null: all). Bounds selection at COCO size
        "candidates_per_class": None,
        # End-to-End Incremental Learning's balanced fine-tuning, after a step's main training
        "balanced_finetune": {"enabled": False, "iters": 100, "lr_scale": 0.1},
    },
    # tools/merge.py: several teachers distilled into one student (docs/design.md, "Merging")
    "merge": {
        "iters": None,  # training iterations (null: the step budget of the union's classes)
        "temperature": 2.0,  # distillation temperature T of the classification term
        # modulating factor |p - q| ** gamma of the classification term; auto: 0 (plain KL)
        # when the student starts from a teacher's weights (merging), 2 when it starts
        # untrained (compression); each measured best for its use: benchmarks.md, "Merge and
        # compress detectors"
        "gamma": "auto",
        # the box teacher's lowest class probability for an anchor's box; auto: 0.2 when the
        # student starts from a teacher's weights, 0.5 when it starts untrained (benchmarks.md)
        "box_thresh": "auto",
        # classes the transfer set annotates: distil (their boxes and their teachers both
        # train them) | labels (their boxes alone; teachers distil the other classes) | auto
        # (labels when the student starts from a teacher's weights, else distil)
        "annotated": "auto",
        # weight of the classification distillation in a merge (it replaces
        # loss.weights.loss_distill_cls there); auto: 0.25 when the student starts from a
        # teacher's weights (a stronger pull held the annotated classes back), else 1
        "cls_weight": "auto",
        # anchors the classification distillation covers: all | erd (those where the
        # teachers are confident: mean + 2 std of the image's highest probabilities, as
        # incremental.anchors) | auto (erd when the student starts from a teacher's weights,
        # else all)
        "anchors": "auto",
        # a class several teachers know: error | first (the first teacher answers) | mean
        "overlap": "error",
        "labels": True,  # the transfer set's boxes train too, where it has them
        "transfer_step": None,  # with the config's data: only this step's training images
    },
}


def _check_keys(cfg: dict, ref: dict, source: str, prefix: str = "") -> None:
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if key not in ref:
            known = ", ".join(sorted(ref))
            raise UserError(f"{source}: unknown config key '{dotted}' (known keys here: {known})")
        if dotted == "data.val" and isinstance(value, list):  # several validation files
            for i, part in enumerate(value):
                if not isinstance(part, dict):
                    raise UserError(f"{source}: data.val[{i}] must be a mapping "
                                    f"{{images, annotations}}, got {part!r}")
                _check_keys(part, ref[key], source, f"{dotted}[{i}].")
        elif dotted == "data.category_ids":
            continue  # auto | file | {class name: id}: names are the user's
        elif isinstance(ref[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"{source}: config key '{dotted}' must be a mapping, got {value!r}")
            _check_keys(value, ref[key], source, dotted + ".")


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read config file ({e.strerror}); check the path") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{path}: not valid YAML ({first}); fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of keys, "
                        f"got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=0.1"`` -> ``("train.lr", 0.1)``; the value is parsed as YAML."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, for example train.max_iters=5")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_override(cfg: dict, key: str, value: Any) -> None:
    node, ref = cfg, DEFAULTS
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(ref, dict) or part not in ref:
            raise UserError(f"--set {key}: unknown config key '{'.'.join(parts[:i + 1])}'")
        if i == len(parts) - 1:
            if key == "data.val" and isinstance(value, list):  # several validation files
                _check_keys({"val": value}, {"val": ref[part]}, "--set", "data.")
                node[part] = copy.deepcopy(value)
            elif key == "data.category_ids":
                node[part] = value  # auto | file | {class name: id}
            elif isinstance(ref[part], dict) and not isinstance(value, dict):
                raise UserError(f"--set {key}: '{key}' is a section; set one of its keys")
            elif isinstance(value, dict):
                _check_keys(value, ref[part], "--set", key + ".")
                node[part] = _merge(node.get(part, {}), value)
            else:
                node[part] = value
        else:
            node, ref = node.setdefault(part, {}), ref[part]


def apply_overrides(cfg: dict, items: list[str] | None) -> None:
    """Apply ``--set`` items (``"key=value"``) to ``cfg`` in order."""
    for item in items or []:
        apply_override(cfg, *parse_override(item))


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> dict:
    """Resolve a config: defaults <- ``_base_`` file <- the file <- overrides.

    ``data.root`` is made absolute relative to the directory of the file that set it, so that a
    config works from any working directory. The result carries ``_source`` (the file path).
    """
    cfg = copy.deepcopy(DEFAULTS)
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        user = _read_yaml(path)
        layers = []
        base = user.pop("_base_", None)
        if base is not None:
            base_path = (path.parent / base).resolve()
            base_cfg = _read_yaml(base_path)
            if "_base_" in base_cfg:
                raise UserError(f"{base_path}: only one level of _base_ is supported; "
                                "merge the chain into one base file")
            layers.append((base_path, base_cfg))
        layers.append((path, user))
        for layer_path, layer in layers:
            _check_keys(layer, DEFAULTS, str(layer_path))
            root = layer.get("data", {}).get("root")
            if isinstance(root, str) and not os.path.isabs(root):
                layer = _merge(layer, {"data": {"root": str((layer_path.parent / root).resolve())}})
            cfg = _merge(cfg, layer)
        source = str(path)
    apply_overrides(cfg, overrides)
    cfg["data"]["root"] = str(Path(cfg["data"]["root"]).resolve())
    cfg["_source"] = source
    return cfg


def dump_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomic)."""
    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    atomic_write_text(path, yaml.safe_dump(clean, sort_keys=False))


# Keys whose default changed the model's shape after configs were first saved without them: a
# saved config that lacks one was trained with the value given here, not today's default.
_VALUE_BEFORE_KEY: dict[tuple[str, str], Any] = {("model", "reduced_tail"): False}


def with_defaults(saved: dict) -> dict:
    """A config saved by an earlier version, completed with today's defaults for new keys (or, for
    a key in ``_VALUE_BEFORE_KEY``, with the behaviour the earlier version had)."""
    saved = copy.deepcopy(saved)
    for (section, key), value in _VALUE_BEFORE_KEY.items():
        if isinstance(saved.get(section), dict):
            saved[section].setdefault(key, value)
    return _merge(DEFAULTS, saved)


def differing_keys(a: dict, b: dict) -> list[str]:
    """The keys (sorted) whose values differ between two config sections (a missing key counts
    as None)."""
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def strip_private(cfg: dict) -> dict:
    """The config without keys starting with ``_`` (what is saved in checkpoints)."""
    return {k: copy.deepcopy(v) for k, v in cfg.items() if not k.startswith("_")}


def _source_comments() -> dict[str, str]:
    """The comment of each dotted key in the source of :data:`DEFAULTS`: the comment lines just
    above the key and the comment at the end of its line."""
    lines = Path(__file__).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("DEFAULTS"))
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, key) of the open sections
    above: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("}"):
            break
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# ").strip())
            continue
        m = re.match(r'^(\s*)"(\w+)":', line)
        if m is None:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [m.group(2)])
        inline = line.split("  # ", 1)[1].strip() if "  # " in line else ""
        out[dotted] = " ".join(above + ([inline] if inline else []))
        above = []
        if line.rstrip().endswith("{"):
            stack.append((indent, m.group(2)))
    return out


def reference_markdown() -> str:
    """``docs/configuration.md``: every key with its default and comment, from :data:`DEFAULTS`
    and this file's comments (``python -m incdet.base.config > docs/configuration.md``)."""
    comments = _source_comments()
    out = ["# Configuration reference", "",
           "Every key, its default and what it does, generated from `incdet/base/config.py` by "
           "`python -m incdet.base.config > docs/configuration.md` (a test checks that this file "
           "is current). A config file only gives the keys it changes; `_base_: FILE` inherits one "
           "file; `--set key.sub=value` overrides any key from the command line (values are "
           "YAML); an unknown key is an error naming the key and the file.", ""]

    def walk(section: dict, prefix: str, level: int) -> None:
        rows = []
        for key, value in section.items():
            dotted = prefix + key
            if isinstance(value, dict) and key not in ("weights",):
                continue
            default = yaml.safe_dump(value, default_flow_style=True).strip()
            default = default.removesuffix("...").strip().replace("|", "\\|")
            note = comments.get(dotted, "").replace("|", "\\|")
            rows.append(f"| `{dotted}` | `{default}` | {note} |")
        if rows:
            out.extend(["| key | default | meaning |", "|---|---|---|", *rows, ""])
        for key, value in section.items():
            if isinstance(value, dict) and key not in ("weights",):
                note = comments.get(prefix + key, "")
                out.extend(["#" * level + f" `{prefix}{key}`", ""] + ([note, ""] if note else []))
                walk(value, prefix + key + ".", level + 1)

    out.extend(["## Top level", ""])
    walk(DEFAULTS, "", 2)
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
