"""Disjoint steps (``data.disjoint_steps``): every training image belongs to exactly one step.

In the standard protocol an image holding classes of two steps is trained at both, each time
annotated for that step's classes; its objects of later classes are then in the images of earlier
steps. Under disjoint steps each such image is *owned* by one step and is trained there only, as
in a deployment where every step brings images of its own.

The rule (:func:`assign_steps`): among the steps whose classes the image holds (non-crowd boxes),
one is drawn uniformly, from a number hashed from the image id alone. So each box keeps its
annotation with probability 1 / (the number of steps in its image), whatever its class and however
many boxes of its own step surround it; the choice is the same for every training seed, method
and order of the records. Then a class of a step left with none of its images (possible on small
or skewed data) gets back the image holding most of its boxes (ties: lowest id) whose owner keeps
an image of each of its own classes without it.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

from incdet.data.records import ImageRecord, filter_for_classes


def _draw(image_id: int) -> float:
    """A number in [0, 1) fixed by the image id alone (no seed, no record order)."""
    digest = hashlib.blake2b(f"incdet-disjoint-steps:{image_id}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 11) / 2.0 ** 53  # 53 bits: never rounds to 1.0


def _step_classes(rec: ImageRecord, steps: Sequence[Sequence[int]]) -> dict[int, set[int]]:
    """Step -> the classes of that step with a non-crowd box in ``rec``."""
    ids = set(rec.category_ids[~rec.iscrowd].tolist())
    present = {s: ids & set(step) for s, step in enumerate(steps)}
    return {s: cs for s, cs in present.items() if cs}


def assign_steps(records: Iterable[ImageRecord],
                 steps: Sequence[Sequence[int]]) -> dict[int, int]:
    """Image id -> the one step that trains on it, for every image with a non-crowd box of a
    step's classes (the module docstring has the rule)."""
    records = list(records)
    held = {rec.id: _step_classes(rec, steps) for rec in records}
    owner = {}
    for rec in records:
        candidates = sorted(held[rec.id])
        if candidates:
            owner[rec.id] = candidates[int(_draw(rec.id) * len(candidates))]
    # coverage: how many owned images each (step, class) has
    owned: dict[tuple[int, int], int] = {}
    for image, s in owner.items():
        for c in held[image][s]:
            owned[s, c] = owned.get((s, c), 0) + 1
    boxes = {rec.id: rec.category_ids[~rec.iscrowd] for rec in records}
    for s, step in enumerate(steps):
        for c in step:
            if owned.get((s, c)):
                continue
            candidates = sorted((image for image in owner if c in held[image].get(s, ())),
                                key=lambda image: (-int((boxes[image] == c).sum()), image))
            for image in candidates:  # the first whose owner keeps every class without it
                other = owner[image]
                if all(owned[other, k] > 1 for k in held[image][other]):
                    for k in held[image][other]:
                        owned[other, k] -= 1
                    for k in held[image][s]:
                        owned[s, k] = owned.get((s, k), 0) + 1
                    owner[image] = s
                    break
    return owner


def training_records(records: Sequence[ImageRecord], steps: Sequence[Sequence[int]],
                     class_ids: Sequence[int], disjoint: bool) -> list[ImageRecord]:
    """The training images of a step that trains on ``class_ids``, with only their boxes of
    those classes (:func:`~incdet.data.records.filter_for_classes`). With ``disjoint``, only the
    images owned by the steps whose classes it trains on: an incremental step ``t`` gets the
    images of step ``t``; ``joint`` at step ``t`` (every seen class) those of steps ``0..t``."""
    if disjoint:
        wanted = set(class_ids)
        owners = {s for s, step in enumerate(steps) if wanted & set(step)}
        owner = assign_steps(records, steps)
        records = [rec for rec in records if owner.get(rec.id) in owners]
    return filter_for_classes(records, class_ids)
