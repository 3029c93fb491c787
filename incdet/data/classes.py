"""Class bookkeeping, computed once: category id <-> model label <-> name, and the split into steps.

The model's label index of a class is its position in the *class order* (the concatenation of the
steps), so the classes of step t always occupy the label indices after those of steps < t, and
growing the head appends channels. Category ids (COCO: 1..90 with gaps) are never used as labels.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from incdet.base.errors import UserError

_SPLIT_RE = re.compile(r"^\s*\d+(\s*x\s*\d+)?(\s*\+\s*\d+(\s*x\s*\d+)?)*\s*$")


def parse_split_sizes(split: str) -> list[int]:
    """``"40+10x4"`` -> ``[40, 10, 10, 10, 10]``; ``"15+1x5"`` -> ``[15, 1, 1, 1, 1, 1]``."""
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise UserError(f"split {split!r}: expected sizes like '40+40', '40+10x4' or '15+1x5', "
                        "or a list of steps (lists of category ids or names)")
    sizes: list[int] = []
    for part in split.replace(" ", "").split("+"):
        if "x" in part:
            size, times = (int(v) for v in part.split("x"))
            if times == 0:
                raise UserError(f"split {split!r}: '{part}' repeats a step zero times")
            sizes += [size] * times
        else:
            sizes.append(int(part))
    if any(s == 0 for s in sizes):
        raise UserError(f"split {split!r}: a step has no classes; every step needs at least one")
    return sizes


def merge_categories(dataset: Sequence[dict], extra: Sequence[dict] | None,
                     source: str) -> list[dict]:
    """The dataset's categories (from ``source``) plus ``extra`` ones (the config's
    ``categories``: an imported detector's classes), by id. An id in both must name the same
    class; otherwise the new data would be trained as, and evaluated against, an old class."""
    if not extra:
        return list(dataset)
    if not isinstance(extra, (list, tuple)) or not all(
            isinstance(c, dict) and isinstance(c.get("id"), int) and "name" in c for c in extra):
        raise UserError("categories: expected a list of {id: int, name: str} mappings")
    names = {int(c["id"]): str(c["name"]) for c in dataset}
    for c in extra:
        cid, name = int(c["id"]), str(c["name"])
        if cid in names and names[cid] != name:
            raise UserError(f"{source}: category id {cid} is {names[cid]!r} there but {name!r} in "
                            "the imported detector's classes (config key categories); set "
                            "data.category_ids: auto (the default) to number classes by name")
    extra_ids = {int(c["id"]) for c in extra}
    by_name = {str(c["name"]): int(c["id"]) for c in extra}
    for cid, name in names.items():
        if cid not in extra_ids and name in by_name:
            raise UserError(f"{source}: class {name!r} has id {cid} there but id {by_name[name]} "
                            "in the imported detector's classes (config key categories); use one "
                            "id per class")
    return list(dataset) + [{"id": int(c["id"]), "name": str(c["name"])} for c in extra
                            if int(c["id"]) not in names]


@dataclass(frozen=True)
class StepClasses:
    """The classes of one step, as category ids, in class order."""

    step: int
    old: tuple[int, ...]
    new: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]  # one entry per step <= t, the classes that step added

    @property
    def seen(self) -> tuple[int, ...]:
        return self.old + self.new


class ClassSpace:
    """Category ids, names, class order and steps of one experiment.

    Args:
        categories: ``[{"id": int, "name": str}, ...]`` as in a COCO annotation file.
        split: ``"40+40"``-style string, or a list of steps (each a list of ids or names).
        class_order: optional explicit order (ids or names) for string splits; default ascending id.
    """

    def __init__(self, categories: Sequence[dict], split: Any, class_order: Any = None):
        self.names: dict[int, str] = {int(c["id"]): str(c["name"]) for c in categories}
        self._by_name = {name: cid for cid, name in self.names.items()}
        if isinstance(split, int) and not isinstance(split, bool):
            split = str(split)  # "split: 80" (YAML reads it as a number): one step
        if isinstance(split, str):
            sizes = parse_split_sizes(split)
            order = (self._resolve_list(class_order, "class_order") if class_order is not None
                     else sorted(self.names))
            if sum(sizes) != len(order):
                raise UserError(f"split {split!r}: adds up to {sum(sizes)} classes but the dataset "
                                f"has {len(order)}; make the step sizes sum to {len(order)}")
            steps, start = [], 0
            for size in sizes:
                steps.append(order[start:start + size])
                start += size
        elif isinstance(split, (list, tuple)) and split:
            if class_order is not None:
                raise UserError("class_order: give the order either by an explicit split (a list "
                                "of steps) or by class_order with a string split, not both")
            steps = []
            for t, step in enumerate(split):
                if not isinstance(step, (list, tuple)) or not step:
                    raise UserError(f"split step {t}: {step!r} is empty or not a list; every step "
                                    "needs a list of at least one category id or name")
                steps.append(self._resolve_list(step, f"split step {t}"))
            flat = [c for s in steps for c in s]
            dup = sorted({c for c in flat if flat.count(c) > 1})
            if dup:
                raise UserError(f"split: classes {dup} appear in more than one step; each class "
                                "belongs to exactly one step")
        else:
            raise UserError(f"split {split!r}: expected a string like '40+40' or a non-empty list "
                            "of steps")
        self.steps: list[tuple[int, ...]] = [tuple(s) for s in steps]
        self.order: tuple[int, ...] = tuple(c for s in self.steps for c in s)
        self.label_of: dict[int, int] = {cid: i for i, cid in enumerate(self.order)}

    def _resolve_list(self, items: Any, where: str) -> list[int]:
        if not isinstance(items, (list, tuple)):
            raise UserError(f"{where}: expected a list of category ids or names, got {items!r}")
        out = []
        for item in items:
            if isinstance(item, bool):
                cid = None
            elif isinstance(item, int):
                cid = item if item in self.names else None
            else:
                cid = self._by_name.get(str(item))
            if cid is None:
                known = ", ".join(f"{i}:{n}" for i, n in sorted(self.names.items())[:12])
                raise UserError(f"{where}: unknown class {item!r}; known classes are category ids "
                                f"or names of the dataset ({known}, ...)")
            out.append(cid)
        if len(set(out)) != len(out):
            raise UserError(f"{where}: a class is listed twice ({items!r})")
        return out

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def step(self, t: int) -> StepClasses:
        if not 0 <= t < self.num_steps:
            raise UserError(f"--step {t}: the split has steps 0..{self.num_steps - 1}")
        old = tuple(c for s in self.steps[:t] for c in s)
        return StepClasses(step=t, old=old, new=self.steps[t], groups=tuple(self.steps[:t + 1]))

    def labels(self, category_ids: Sequence[int]) -> list[int]:
        return [self.label_of[c] for c in category_ids]

    def to_dict(self) -> dict:
        """Plain data for checkpoints."""
        return {"steps": [list(s) for s in self.steps],
                "names": {str(c): self.names[c] for c in self.order}}
