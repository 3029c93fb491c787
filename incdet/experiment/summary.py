"""Reads the ``step_<t>/metrics.json`` files of a work directory into one table."""
from __future__ import annotations

import json
from pathlib import Path


def read_steps(work_dir: str | Path) -> list[dict]:
    """The metrics of every completed step, in step order."""
    out = []
    for path in Path(work_dir).glob("step_*/metrics.json"):
        out.append(json.loads(path.read_text()))
    return sorted(out, key=lambda m: m["step"])


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def steps_table(steps: list[dict]) -> str:
    head = (f"{'step':>4} {'method':<9}{'old AP':>8}{'new AP':>8}{'all AP':>8}{'all AP50':>9}"
            f"{'forget':>8}{'train s':>9}{'img/s':>7}")
    lines = [head]
    for m in steps:
        forget = [v for v in m.get("forgetting", {}).values() if v is not None]
        mean_forget = sum(forget) / len(forget) if forget else None
        lines.append(f"{m['step']:>4} {m.get('method', '-'):<9}{_fmt(m['map']['old']['AP']):>8}"
                     f"{_fmt(m['map']['new']['AP']):>8}{_fmt(m['map']['all']['AP']):>8}"
                     f"{_fmt(m['map']['all']['AP50']):>9}{_fmt(mean_forget):>8}"
                     f"{m['train']['seconds']:>9.0f}{m['train']['images_per_second']:>7.1f}")
    return "\n".join(lines)
