"""docs/tutorial.md runs as written: every ``bash`` and ``python`` block, in order, in a fresh
folder (with the repository's ``tools/`` and ``demo/`` beside it), as a user runs them from the
repository root. The commands live only in the document; this test reads them from it."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

TUTORIAL = ROOT / "docs" / "tutorial.md"


def blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block to run, in document order."""
    found = re.findall(r"^```(\w+)\n(.*?)^```", TUTORIAL.read_text(), re.S | re.M)
    return [(lang, code) for lang, code in found if lang in ("bash", "python")]


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_tutorial_runs_as_written_and_measures_old_and_new_classes(tmp_path):
    for name in ("tools", "demo"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT), NO_ALBUMENTATIONS_UPDATE="1")
    data_before = None
    outputs = []
    runnable = blocks()
    assert [lang for lang, _ in runnable].count("bash") >= 6, "the tutorial lost its commands"
    for i, (lang, code) in enumerate(runnable):
        if lang == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", code]
        else:  # a block that names its file (first line "# tutorial/x.py: ...") is written there
            named = re.match(r"# (tutorial/\S+\.py)", code)
            script = tmp_path / (named.group(1) if named else f"tutorial/block_{i}.py")
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_text(code)
            cmd = [sys.executable, str(script.relative_to(tmp_path))]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, f"block {i} ({lang}):\n{code}\n--- stderr:\n{r.stderr[-3000:]}"
        outputs.append(r.stdout)
        if data_before is None and (tmp_path / "tutorial" / "data" / "annotations").is_dir():
            data_before = snapshot(tmp_path / "tutorial" / "data")
    runs = tmp_path / "tutorial" / "runs"
    # the user's data: not one byte written, renamed or added after it was made
    assert data_before and snapshot(tmp_path / "tutorial" / "data") == data_before
    # step 0: the imported detector, evaluated on the old classes' own validation file
    imported = json.loads((runs / "imported" / "step_0" / "metrics.json").read_text())
    assert imported["map"]["old"]["AP"] is None and imported["map"]["all"]["AP"] > 0.2
    # step 1 of every method: old and new classes measured together, ids given by name
    old_val, new_val = (str(tmp_path / "tutorial" / "data" / "annotations" / f)
                        for f in ("old_val.json", "new_val.json"))
    new_train = str(tmp_path / "tutorial" / "data" / "annotations" / "new_train.json")
    for method in ("incdet", "branch", "finetune"):
        m = json.loads((runs / "compare" / method / "step_1" / "metrics.json").read_text())
        assert m["map"]["old"]["AP"] is not None and m["map"]["new"]["AP"] is not None
        assert m["category_ids"][new_train] == {"1": 8, "2": 9, "4": 10, "5": 11}
        assert m["val_files"]["1"] == [old_val] and m["val_files"]["8"] == [new_val]
        assert sorted(map(int, m["per_class_ap"])) == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    branch = json.loads((runs / "compare" / "branch" / "step_1" / "metrics.json").read_text())
    # branch keeps the old classes' detections bit for bit, so their AP too
    assert branch["map"]["old"]["AP"] == imported["map"]["all"]["AP"]
    report = (runs / "compare" / "report.md").read_text()
    assert all(m in report for m in ("incdet", "branch", "finetune"))
    # the exported detector, run by a plain torchvision script, names the classes
    exported = json.loads((tmp_path / "tutorial" / "detector.ts.json").read_text())
    assert exported["category_ids"] == [1, 2, 4, 5, 7, 3, 8, 9, 10, 11]
    assert "cross" in exported["names"] and exported["names"][6] == "cross"
    # the Python route wrote the same kind of step folder
    api = json.loads((runs / "api" / "step_1" / "metrics.json").read_text())
    assert api["method"] == "incdet" and api["category_ids"] == m["category_ids"]
    assert (tmp_path / "tutorial" / "api_detector.pt").is_file()
    assert any("old AP" in out for out in outputs)
