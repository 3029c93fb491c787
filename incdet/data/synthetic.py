"""The built-in dataset: coloured shapes on cluttered, textured backgrounds, in COCO format.

Ten classes of shapes that a detector must tell apart by outline alone (colour is random per object
and can be close to the background): some pairs are close on purpose (circle / hexagon / ring,
square / L-shape at small sizes). Objects vary in scale, aspect and rotation and may partly occlude
each other; backgrounds carry low-frequency texture, lines and blobs. Category ids have gaps, as in
COCO, so that a model label that equals a category id by accident is caught by the tests.

Everything is deterministic for a given seed: image ``i`` of subset ``s`` uses its own generator
seeded by ``(seed, s, i)``, so a dataset can be regenerated piecewise and identically.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from incdet.base.errors import UserError
from incdet.base.io import atomic_write_json

CATEGORIES = [
    {"id": 1, "name": "circle"},
    {"id": 2, "name": "triangle"},
    {"id": 4, "name": "square"},
    {"id": 5, "name": "hexagon"},
    {"id": 7, "name": "star"},
    {"id": 9, "name": "cross"},
    {"id": 11, "name": "ring"},
    {"id": 14, "name": "crescent"},
    {"id": 16, "name": "arrow"},
    {"id": 18, "name": "lshape"},
]

_SUBSETS = {"train": 0, "val": 1}
MARKER = ".incdet-builtin.json"  # written first by generate(): this folder is ours to (re)write
RADIUS = (0.05, 0.25)  # object radius as a fraction of the image side (log-uniform)
_SS = 3  # supersampling factor for anti-aliased masks


def _ngon(n: int, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    a = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


_W = 0.36  # arm half-width of cross and L-shape
_SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    # Each shape is a list of (polygon in unit coordinates, fill) drawn in order; fill 0 cuts holes.
    "circle": [(_ngon(48), 255)],
    "triangle": [(_ngon(3, -math.pi / 2), 255)],
    "square": [(_ngon(4, math.pi / 4) * 0.95, 255)],
    "hexagon": [(_ngon(6), 255)],
    "star": [(_star(), 255)],
    "cross": [(np.array([[-_W, -1], [_W, -1], [_W, -_W], [1, -_W], [1, _W], [_W, _W], [_W, 1],
                         [-_W, 1], [-_W, _W], [-1, _W], [-1, -_W], [-_W, -_W]]), 255)],
    "ring": [(_ngon(48), 255), (_ngon(48) * 0.55, 0)],
    "crescent": [(_ngon(48), 255), (_ngon(48) * 0.85 + np.array([0.45, -0.1]), 0)],
    "arrow": [(np.array([[-1, -0.3], [0.2, -0.3], [0.2, -0.75], [1, 0], [0.2, 0.75], [0.2, 0.3],
                         [-1, 0.3]]), 255)],
    "lshape": [(np.array([[-0.8, -1], [-0.8 + 2 * _W * 1.1, -1], [-0.8 + 2 * _W * 1.1, 1 - 2 * _W],
                          [0.8, 1 - 2 * _W], [0.8, 1], [-0.8, 1]]), 255)],
}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], shape (size, size)."""
    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    base = rng.uniform(40, 215, 3)
    tint = rng.uniform(-70, 70, 3)
    noise = _smooth_noise(rng, size, int(rng.integers(3, 9)))[..., None]
    fine = rng.normal(0, rng.uniform(4, 14), (size, size, 3))
    arr = np.clip(base + tint * (noise - 0.5) * 2 + fine, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):  # clutter: lines, dots and irregular blobs
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        kind = rng.random()
        if kind < 0.45:
            pts = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
            draw.line(pts, fill=colour, width=int(rng.integers(1, 4)))
        elif kind < 0.75:
            c, r = rng.uniform(0, size, 2), rng.uniform(1, 4)
            draw.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=colour)
        else:
            # soft elongated smudges: clutter must not look like a member of a class (a random
            # 3-5 vertex polygon is a triangle or square the annotations never mention)
            c, r = rng.uniform(0, size, 2), rng.uniform(2, 6, 2)
            draw.ellipse([c[0] - r[0], c[1] - r[1] / 3, c[0] + r[0], c[1] + r[1] / 3],
                         fill=colour)
    return img


def _object_mask(rng: np.random.Generator, name: str, radius: float) -> Image.Image:
    """An anti-aliased mask of one shape, rotated and stretched, in a square patch."""
    angle = rng.uniform(0, 2 * math.pi)
    aspect = math.exp(rng.uniform(-0.25, 0.25))
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    stretch = np.array([aspect ** 0.5, aspect ** -0.5])
    half = int(math.ceil(radius * 1.5)) + 1
    side = 2 * half * _SS
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for poly, fill in _SHAPES[name]:
        pts = (poly * stretch) @ rot.T * radius * _SS + side / 2
        draw.polygon([tuple(p) for p in pts], fill=fill)
    return mask.resize((2 * half, 2 * half), Image.BOX)


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render_image(seed: int, subset: int, index: int, size: int = 128) -> tuple[Image.Image, list]:
    """One image and its objects ``[(category_id, [x0, y0, x1, y1]), ...]``."""
    rng = np.random.default_rng([seed, subset, index])
    img = _background(rng, size)
    objects: list[tuple[int, list[float]]] = []
    for _ in range(int(rng.integers(1, 7))):
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        radius = size * math.exp(rng.uniform(math.log(RADIUS[0]), math.log(RADIUS[1])))
        mask = _object_mask(rng, cat["name"], radius)
        bbox = mask.getbbox()
        if bbox is None:
            continue
        for _attempt in range(10):
            ox = int(rng.integers(-bbox[0], size - bbox[2] + 1))
            oy = int(rng.integers(-bbox[1], size - bbox[3] + 1))
            box = [float(ox + bbox[0]), float(oy + bbox[1]), float(ox + bbox[2]),
                   float(oy + bbox[3])]
            # partial occlusion is allowed, hiding most of an object is not
            if all(_iou(box, other) < 0.3 for _, other in objects):
                break
        else:
            continue
        hue = rng.uniform(30, 230, 3)
        shade = _smooth_noise(rng, mask.size[0], 3)[..., None] * rng.uniform(0, 60)
        patch = np.clip(hue + shade - 30 + rng.normal(0, 6, (*mask.size[::-1], 3)), 0, 255)
        img.paste(Image.fromarray(patch.astype(np.uint8)), (ox, oy), mask)
        objects.append((cat["id"], box))
    return img, objects


def generate(root: str | os.PathLike, num_train: int = 2000, num_val: int = 300,
             image_size: int = 128, seed: int = 0, progress: bool = True) -> Path:
    """Write the dataset under ``root``: ``images/{train,val}/*.png``, ``annotations/*.json``.

    ``root`` must be missing, empty or a folder this function wrote before (it holds
    :data:`MARKER`, written first): generating never writes into a user's data. The annotation
    files are written last and atomically, so a dataset with both JSON files is complete; an
    interrupted run is simply regenerated.
    """
    root = Path(root)
    if folder_state(root) == "other":
        raise UserError(f"{root} holds files that the built-in generator did not write; it "
                        "writes only into a missing or empty folder: choose another one")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(root / MARKER, {"generator": "incdet.data.synthetic", "num_train": num_train,
                                      "num_val": num_val, "image_size": image_size, "seed": seed})
    for subset, count in (("train", num_train), ("val", num_val)):
        img_dir = root / "images" / subset
        img_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in tqdm(range(count), desc=f"generating {subset}", disable=not progress,
                      leave=False):
            img, objects = render_image(seed, _SUBSETS[subset], i, image_size)
            name = f"{i:06d}.png"
            img.save(img_dir / name, compress_level=1)
            images.append({"id": i + 1, "file_name": name, "width": image_size,
                           "height": image_size})
            for cat_id, (x0, y0, x1, y1) in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1,
                                    "category_id": cat_id, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        atomic_write_json(root / "annotations" / f"{subset}.json",
                          {"images": images, "annotations": annotations,
                           "categories": [dict(c, supercategory="shape") for c in CATEGORIES]})
    return root


def folder_state(root: str | os.PathLike) -> str:
    """What ``root`` is, for deciding whether the built-in dataset may be written there.

    ``missing`` or ``empty``: nothing to lose; ``builtin``: a complete built-in dataset (both
    annotation files parse; datasets written before :data:`MARKER` existed count when the folder
    holds nothing but ``images/`` and ``annotations/``); ``partial``: an interrupted generation
    (:data:`MARKER` present, nothing but the generator's folders); ``other``: anything else,
    which is a user's data and read-only.
    """
    root = Path(root)
    if not root.exists():
        return "missing"
    if not root.is_dir():
        return "other"
    entries = {p.name for p in root.iterdir()}
    if not entries:
        return "empty"
    if not entries - {MARKER} <= {"images", "annotations"}:
        return "other"
    if is_complete(root):
        return "builtin"
    return "partial" if MARKER in entries else "other"


def is_complete(root: str | os.PathLike) -> bool:
    root = Path(root)
    for subset in _SUBSETS:
        path = root / "annotations" / f"{subset}.json"
        if not path.is_file():
            return False
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):
            return False
    return True


def write_user_data(out: str | os.PathLike, num_old: int = 5, num_train: int = 400,
                    num_val: int = 100, image_size: int = 128, seed: int = 0,
                    progress: bool = True) -> dict[str, Path]:
    """The built-in images as a user's data looks when new classes arrive (docs/tutorial.md):
    ``out/images/{train,val}/`` and three COCO files in ``out/annotations/``:

    * ``new_train.json`` and ``new_val.json``: the classes after the first ``num_old``, numbered
      from 1 as a labelling tool numbers them, annotated on the images that hold them (nothing
      of the old classes);
    * ``old_val.json``: the first ``num_old`` classes with the built-in ids (those of a detector
      trained on them), on every validation image: the old classes' own validation file.

    The folder is a user's folder afterwards (no generator marker): incdet only reads it.
    ``out`` must be missing or empty. Returns the three files."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty; the practice data goes into a new folder")
    staging = out.parent / f".{out.name}.generating"
    if staging.exists():
        shutil.rmtree(staging)
    generate(staging, num_train, num_val, image_size, seed, progress)
    old, new = CATEGORIES[:num_old], CATEGORIES[num_old:]
    number = {c["id"]: i + 1 for i, c in enumerate(new)}

    def subset(data: dict, cats: list[dict], ids: dict[int, int], every_image: bool) -> dict:
        anns = [dict(a, category_id=ids[a["category_id"]]) for a in data["annotations"]
                if a["category_id"] in ids]
        shown = {a["image_id"] for a in anns}
        return {"images": [i for i in data["images"] if every_image or i["id"] in shown],
                "annotations": anns, "categories": cats}

    read = {s: json.loads((staging / "annotations" / f"{s}.json").read_text()) for s in _SUBSETS}
    renumbered = [{"id": number[c["id"]], "name": c["name"]} for c in new]
    files = {"new_train": subset(read["train"], renumbered, number, False),
             "new_val": subset(read["val"], renumbered, number, False),
             "old_val": subset(read["val"], old, {c["id"]: c["id"] for c in old}, True)}
    out.mkdir(parents=True, exist_ok=True)
    (staging / "images").rename(out / "images")
    written = {}
    for name, data in files.items():
        written[name] = out / "annotations" / f"{name}.json"
        atomic_write_json(written[name], data)
    shutil.rmtree(staging)
    return written
