"""A COCO-size annotation file with COCO's statistics, and no images: for measuring bookkeeping.

:func:`coco_like` builds, from a seed, a dict shaped like ``instances_train2017.json``: 118,287
images (ids sparse in 1..581,929, ``%012d.jpg`` file names, 640 px on the long side), about
860,000 boxes and COCO's 80 categories with their ids (1..90 with gaps, from
``coco_categories.json``). It follows COCO's statistics where they matter to bookkeeping:

* boxes per image: about 0.9 % of the images have none; the others hold ``1 + NegBin`` boxes
  (mean 7.3, a long tail clipped at 93, COCO's maximum);
* classes per image: each image draws a small palette of classes (``1 + Poisson(3)`` draws, at
  most its box count) and its boxes take classes from the palette, so classes co-occur (2.4 distinct
  classes per image at the default size, 2.9 in COCO);
* class frequencies: Zipf-like over a seeded order with ``person`` first (a third of the boxes;
  COCO: 30 %), the rarest classes about 800 boxes (COCO: about 200);
* box sizes: log-normal side and aspect ratio, about 41 / 35 / 24 % small / medium / large boxes
  as in COCO; about 1 % crowd boxes; a polygon ``segmentation`` of ``polygon_points`` vertices
  inscribed in the box (polygons are the bulk of a COCO file's bytes; COCO's have more points).

Everything is vectorised with one NumPy generator: the default size builds in seconds.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import numpy as np

from incdet.base.io import atomic_write_text

COCO_TRAIN_IMAGES = 118_287
COCO_TRAIN_BOXES = 860_001
COCO_MAX_IMAGE_ID = 581_929
EMPTY_FRACTION = 1021 / 118_287  # train2017 images without annotations
MAX_BOXES = 93


def coco_categories() -> list[dict]:
    """COCO's 80 categories ``[{"id", "name", "supercategory"}]`` (ids 1..90 with gaps)."""
    text = resources.files("incdet.data").joinpath("coco_categories.json").read_text()
    return [{"id": int(c["id"]), "name": str(c["name"]),
             "supercategory": c.get("supercategory", "")} for c in json.loads(text)]


def coco_like(num_images: int = COCO_TRAIN_IMAGES, boxes_per_image: float = 7.27,
              polygon_points: int = 8, seed: int = 0) -> dict:
    """A COCO-format annotation dict (see the module docstring); ``boxes_per_image`` is the mean
    over all images, empty ones included (COCO train2017: 860,001 / 118,287 = 7.27)."""
    rng = np.random.default_rng(seed)
    cats = coco_categories()
    cat_ids = np.array([c["id"] for c in cats], np.int64)
    k = len(cats)

    # images: sparse ids, COCO's usual sizes (640 on the long side, portrait a quarter of them)
    ids = np.sort(rng.choice(np.arange(1, max(COCO_MAX_IMAGE_ID, num_images) + 1), num_images,
                             replace=False))
    short = rng.integers(300, 641, num_images)
    portrait = rng.random(num_images) < 0.25
    width = np.where(portrait, short, 640)
    height = np.where(portrait, 640, short)

    # boxes per image: 1 + negative binomial with the requested mean among non-empty images
    nonempty_mean = boxes_per_image / (1 - EMPTY_FRACTION)
    r = 1.5
    extra = rng.negative_binomial(r, r / (r + nonempty_mean - 1), num_images)
    counts = np.minimum(1 + extra, MAX_BOXES)
    counts[rng.random(num_images) < EMPTY_FRACTION] = 0
    total = int(counts.sum())

    # classes: a palette per image drawn by Zipf-like frequency (person first), boxes from it
    order = np.concatenate([[0], 1 + rng.permutation(k - 1)])  # index 0 is person (id 1)
    weight = np.empty(k)
    weight[order] = 1.0 / np.arange(1, k + 1) ** 1.3
    weight /= weight.sum()
    palette = np.minimum(1 + rng.poisson(3.0, num_images), np.maximum(counts, 1))
    palette_start = np.concatenate([[0], np.cumsum(palette)[:-1]])
    palette_cats = rng.choice(k, int(palette.sum()), p=weight)
    image_of_box = np.repeat(np.arange(num_images), counts)
    slot = (rng.random(total) * palette[image_of_box]).astype(np.int64)
    box_cat = cat_ids[palette_cats[palette_start[image_of_box] + slot]]

    # box geometry: log-normal side (sqrt of the area; 41 / 35 / 24 % below 32 px, 32-96 px and
    # above, as COCO), log-normal aspect, uniform position inside the image
    w_img, h_img = width[image_of_box].astype(np.float64), height[image_of_box].astype(np.float64)
    side = np.maximum(np.exp(rng.normal(3.735, 1.168, total)), 2.0)
    aspect = np.exp(rng.normal(0.0, 0.6, total))
    bw = np.minimum(side * np.sqrt(aspect), w_img)
    bh = np.minimum(side / np.sqrt(aspect), h_img)
    bx = rng.random(total) * (w_img - bw)
    by = rng.random(total) * (h_img - bh)
    crowd = rng.random(total) < 0.01
    angles = np.linspace(0, 2 * np.pi, polygon_points, endpoint=False)

    images = [{"license": 1, "file_name": f"{i:012d}.jpg", "height": int(h), "width": int(w),
               "id": int(i)} for i, w, h in zip(ids.tolist(), width.tolist(), height.tolist())]
    polys = np.empty((total, 2 * polygon_points))
    polys[:, 0::2] = (bx + bw / 2)[:, None] + 0.5 * bw[:, None] * np.cos(angles)
    polys[:, 1::2] = (by + bh / 2)[:, None] + 0.5 * bh[:, None] * np.sin(angles)
    bw, bh = bw.round(2), bh.round(2)
    rows = zip(ids[image_of_box].tolist(), box_cat.tolist(), bx.round(2).tolist(),
               by.round(2).tolist(), bw.tolist(), bh.tolist(), (0.6 * bw * bh).round(2).tolist(),
               crowd.tolist(), polys.round(2).tolist())
    anns = [{"segmentation": [poly], "area": a, "iscrowd": int(c), "image_id": iid,
             "bbox": [x, y, w, h], "category_id": cid, "id": j + 1}
            for j, (iid, cid, x, y, w, h, a, c, poly) in enumerate(rows)]
    return {"info": {"description": f"incdet COCO-like annotations (seed {seed})"},
            "licenses": [{"id": 1, "name": "synthetic"}], "images": images,
            "annotations": anns, "categories": cats}


def write_coco_like(path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`coco_like` (same keyword arguments) as compact JSON at ``path``."""
    path = Path(path)
    atomic_write_text(path, json.dumps(coco_like(**kwargs), separators=(",", ":")))
    return path
