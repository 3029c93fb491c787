"""The exemplar memory: a few annotated images per class, chosen by herding on RoI features,
stored as a self-contained COCO subset and replayed at the next steps.

Selection (after each step, with the step's final model)
    For every ground-truth box of the step's training images, ``MultiScaleRoIAlign`` on the FPN
    levels at the box, average-pooled and L2-normalised (:func:`roi_features`). An image's
    feature for class ``c`` is the mean of its class-``c`` box features, L2-normalised again.
    Features are computed in batches and only these per-(image, class) vectors are kept.

Ranking (pure functions returning ranked index lists, as Avalanche's storage policies do)
    ``herding`` (iCaRL): repeatedly pick the image whose addition brings the mean of the picked
    features closest to the class mean; ``closest`` (closest-to-mean); ``random``.

Budget
    ``memory.budget: K`` images in total shared equally among the seen classes (quota
    ``K // n`` each, the remainder going to the earliest classes in class order), or
    ``memory.per_class: c``. A class keeps the prefix of its ranking of length quota; shrinking
    the memory is truncating those prefixes. The memory is the union of the prefixes. An image
    that is in the prefix of several classes is stored once and counts towards each of those
    classes' quotas, so the number of stored images never exceeds the sum of the quotas (<= K).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchvision.ops import MultiScaleRoIAlign
from tqdm import tqdm

from incdet.base.errors import UserError, check_choice
from incdet.data.dataset import read_image, to_tensor
from incdet.data.records import ImageRecord
from incdet.model.builder import batch_transform

RANKINGS = ("herding", "closest", "random")


def herding_rank(features: torch.Tensor, limit: int | None = None) -> list[int]:
    """iCaRL herding over (n, d) features: indices in selection order (at most ``limit``)."""
    n = features.shape[0]
    limit = n if limit is None else min(limit, n)
    if limit == 0:
        return []
    feats = features.double()
    mu = feats.mean(0)
    sq = (feats * feats).sum(1)  # (n,)
    running = torch.zeros_like(mu)
    chosen = torch.zeros(n, dtype=torch.bool)
    order: list[int] = []
    for k in range(1, limit + 1):
        # distance of the class mean to the mean of the picked features plus each candidate,
        # ||a - f/k||^2 with a = mu - running/k, expanded so that one matrix-vector product is
        # the only (n, d) work per pick: no (n, d) temporaries (linear time, 5x faster at 5000)
        a = mu - running / k
        dist = (a @ a) - (2.0 / k) * (feats @ a) + sq / (k * k)
        dist[chosen] = float("inf")
        i = int(torch.argmin(dist))
        order.append(i)
        chosen[i] = True
        running += feats[i]
    return order


def closest_rank(features: torch.Tensor, limit: int | None = None) -> list[int]:
    """Indices by increasing distance to the mean feature."""
    dist = ((features.double() - features.double().mean(0)) ** 2).sum(1)
    order = torch.argsort(dist, stable=True).tolist()
    return order if limit is None else order[:limit]


def random_rank(n: int, seed: int, limit: int | None = None) -> list[int]:
    order = np.random.default_rng(seed).permutation(n).tolist()
    return order if limit is None else order[:limit]


def quotas(class_ids: Sequence[int], budget: int | None = None,
           per_class: int | None = None) -> dict[int, int]:
    """Images allowed per class, for classes in class order (see the module docstring)."""
    if (budget is None) == (per_class is None):
        raise UserError("memory: set exactly one of memory.budget and memory.per_class (e.g. "
                        "--set memory.per_class=5 --set memory.budget=null)")
    if per_class is not None:
        return {c: int(per_class) for c in class_ids}
    n = len(class_ids)
    base, extra = divmod(int(budget), n) if n else (0, 0)
    return {c: base + (1 if i < extra else 0) for i, c in enumerate(class_ids)}


def select_images(rankings: dict[int, list[int]], quota: dict[int, int]) -> list[int]:
    """The union of each class's ranking prefix of length ``quota`` (first occurrence order)."""
    out, seen = [], set()
    for c, q in quota.items():
        for image_id in rankings.get(c, [])[:q]:
            if image_id not in seen:
                seen.add(image_id)
                out.append(image_id)
    return out


@torch.no_grad()
def roi_features(model, records: Sequence[ImageRecord], batch_size: int, device,
                 output_size: int = 4,
                 progress: bool = False) -> dict[tuple[int, int], torch.Tensor]:
    """Per (image id, category id), the L2-normalised mean RoI feature of its boxes: (C,)."""

    model.eval()
    pooler = None
    sums: dict[tuple[int, int], torch.Tensor] = {}
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for start in tqdm(range(0, len(records), batch_size), desc="memory features",
                      disable=not progress, leave=False):
        batch = records[start:start + batch_size]
        images = [to_tensor(read_image(r.path)).to(device) for r in batch]
        targets = [{"boxes": torch.as_tensor(r.boxes, dtype=torch.float32, device=device),
                    "labels": torch.zeros(len(r.boxes), dtype=torch.int64, device=device)}
                   for r in batch]
        image_list, targets = batch_transform(model.transform, images, targets)
        features = model.backbone(image_list.tensors)
        if pooler is None:
            names = [k for k in features.keys() if k in ("0", "1", "2")]
            pooler = MultiScaleRoIAlign(names, output_size=output_size, sampling_ratio=2)
        boxes = [t["boxes"] for t in targets]
        if sum(len(b) for b in boxes) == 0:
            continue
        pooled = pooler(features, boxes, image_list.image_sizes)  # (M, C, s, s)
        vecs = torch.nn.functional.normalize(pooled.mean(dim=(2, 3)), dim=1).cpu()
        i = 0
        for rec in batch:
            for cid in rec.category_ids.tolist():
                key = (rec.id, int(cid))
                sums[key] = sums[key] + vecs[i] if key in sums else vecs[i].clone()
                counts[key] += 1
                i += 1
    return {k: torch.nn.functional.normalize(v / counts[k], dim=0) for k, v in sums.items()}


def rank_classes(feats: dict[tuple[int, int], torch.Tensor], class_ids: Sequence[int],
                 method: str, limit: int, seed: int = 0) -> dict[int, list[int]]:
    """Per class, image ids ranked by ``method`` (at most ``limit`` each)."""
    check_choice("memory.selection", method, RANKINGS)
    by_class: dict[int, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for (image_id, cid), v in sorted(feats.items()):
        by_class[cid].append((image_id, v))
    out = {}
    for c in class_ids:
        items = by_class.get(c, [])
        if not items:
            out[c] = []
            continue
        ids = [i for i, _ in items]
        mat = torch.stack([v for _, v in items])
        if method == "herding":
            order = herding_rank(mat, limit)
        elif method == "closest":
            order = closest_rank(mat, limit)
        else:
            order = random_rank(len(ids), seed + c, limit)
        out[c] = [ids[i] for i in order]
    return out


@dataclass
class Memory:
    """Stored images with their annotations and label spaces, and each class's ranking."""

    records: dict[int, ImageRecord] = field(default_factory=dict)  # image id -> record
    label_spaces: dict[int, list[int]] = field(default_factory=dict)  # image id -> category ids
    rankings: dict[int, list[int]] = field(default_factory=dict)  # category id -> image ids
    quotas: dict[int, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    def to_json(self, root: str | os.PathLike, categories: Sequence[dict], step: int) -> dict:
        """A COCO-format subset (file paths relative to the dataset root) plus the rankings."""
        root = Path(root)
        images, anns = [], []
        for image_id, rec in sorted(self.records.items()):
            try:
                rel = str(Path(rec.path).relative_to(root))
            except ValueError:
                rel = rec.path
            images.append({"id": image_id, "file_name": rel, "width": rec.width,
                           "height": rec.height})
            for box, cid in zip(rec.boxes.tolist(), rec.category_ids.tolist()):
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(cid),
                             "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                             "area": (box[2] - box[0]) * (box[3] - box[1]), "iscrowd": 0})
        return {"format": "incdet-memory", "step": step, "images": images, "annotations": anns,
                "categories": [{"id": c["id"], "name": c["name"]} for c in categories],
                "label_spaces": {str(k): v for k, v in sorted(self.label_spaces.items())},
                "rankings": {str(k): v for k, v in self.rankings.items()},
                "quotas": {str(k): v for k, v in self.quotas.items()}}

    @classmethod
    def from_json(cls, path: str | os.PathLike, root: str | os.PathLike) -> "Memory":
        path, root = Path(path), Path(root)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != "incdet-memory":
                raise ValueError("not an incdet memory file")
            mem = cls()
            boxes = defaultdict(list)
            for a in data["annotations"]:
                x, y, w, h = a["bbox"]
                boxes[a["image_id"]].append(([x, y, x + w, y + h], a["category_id"]))
            for img in data["images"]:
                file_path = root / img["file_name"]
                if not file_path.is_file():
                    raise UserError(f"{path}: memory image {file_path} is missing; restore it "
                                    "or retrain the previous step")
                items = boxes.get(img["id"], [])
                mem.records[img["id"]] = ImageRecord(
                    id=img["id"], path=str(file_path), width=img["width"], height=img["height"],
                    boxes=np.array([b for b, _ in items], np.float32).reshape(-1, 4),
                    category_ids=np.array([c for _, c in items], np.int64),
                    iscrowd=np.zeros(len(items), bool))
            mem.label_spaces = {int(k): list(v) for k, v in data["label_spaces"].items()}
            mem.rankings = {int(k): list(v) for k, v in data["rankings"].items()}
            mem.quotas = {int(k): int(v) for k, v in data["quotas"].items()}
        except UserError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: cannot read memory file ({e}); retrain the previous step") \
                from None
        return mem


def build_memory(previous: Memory | None, new_rankings: dict[int, list[int]],
                 new_records: dict[int, ImageRecord], new_label_space: Sequence[int],
                 seen: Sequence[int], mcfg: dict) -> Memory:
    """The memory after a step: earlier classes keep their rankings (truncated to the new
    quotas), the step's classes add theirs; stored images are the union of the prefixes."""
    rankings = dict(previous.rankings) if previous else {}
    rankings.update(new_rankings)
    quota = quotas(list(seen), mcfg.get("budget"), mcfg.get("per_class"))
    mem = Memory(quotas=quota, rankings={c: rankings.get(c, [])[:quota[c]] for c in seen})
    for image_id in select_images(mem.rankings, quota):
        parts = []
        if previous and image_id in previous.records:
            parts.append((previous.records[image_id], previous.label_spaces[image_id]))
        if image_id in new_records:
            parts.append((new_records[image_id], list(new_label_space)))
        rec = parts[0][0]
        if len(parts) == 2:  # chosen at two steps: merge annotations and label spaces
            other = parts[1][0]
            rec = ImageRecord(id=rec.id, path=rec.path, width=rec.width, height=rec.height,
                              boxes=np.concatenate([rec.boxes, other.boxes]),
                              category_ids=np.concatenate([rec.category_ids, other.category_ids]),
                              iscrowd=np.zeros(len(rec.boxes) + len(other.boxes), bool))
        mem.records[image_id] = rec
        mem.label_spaces[image_id] = sorted({c for _, s in parts for c in s})
    return mem
