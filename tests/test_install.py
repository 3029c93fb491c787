"""``pip install .`` gives a user the tools outside the checkout: console scripts and
``python -m incdet.tools.<tool>``, running the installed package (not the checkout's files).

The package is built as a wheel and installed without dependencies into a fresh virtual
environment, which borrows torch and the other dependencies from the test environment through a
``.pth`` file (no download)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from incdet.tools import CONSOLE

from conftest import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    pytest.importorskip("setuptools", reason="the wheel is built without build isolation")
    tmp = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp / "wheel"), str(ROOT)], check=True,
                   capture_output=True)
    (wheel,) = (tmp / "wheel").glob("incdet-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "incdet_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True)
    return {"wheel": wheel, "venv": venv, "python": python, "cwd": tmp}


def _run(installed, *cmd):
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(c) for c in cmd], cwd=installed["cwd"], env=env,
                          capture_output=True, text=True, timeout=300)


def test_wheel_holds_the_tools_and_their_console_scripts(installed):
    with zipfile.ZipFile(installed["wheel"]) as z:
        names = set(z.namelist())
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        entry_points = z.read(entry).decode()
    for tool in CONSOLE:
        assert f"incdet/tools/{tool}.py" in names
        assert f"incdet-{tool.replace('_', '-')} = incdet.tools:{tool}" in entry_points
    # every checkout script is a thin entry to a packaged tool
    for script in (ROOT / "tools").glob("*.py"):
        assert f"incdet/tools/{script.name}" in names
        assert f"from incdet.tools.{script.stem} import main" in script.read_text()


def test_installed_tools_run_the_installed_package(installed):
    r = _run(installed, installed["python"], "-c", "import incdet; print(incdet.__file__)")
    assert r.returncode == 0, r.stderr
    assert str(installed["venv"]) in r.stdout and str(ROOT) not in r.stdout
    for tool in CONSOLE:
        script = installed["venv"] / "bin" / f"incdet-{tool.replace('_', '-')}"
        r = _run(installed, script, "--help")
        assert r.returncode == 0, f"{script.name}: {r.stderr}"
        assert r.stdout.startswith(f"usage: {script.name}")
    r = _run(installed, installed["python"], "-m", "incdet.tools.train_step", "--help")
    assert r.returncode == 0 and "--work-dir" in r.stdout


def test_installed_tools_do_work_and_report_user_errors(installed, tmp_path):
    bin_dir = installed["venv"] / "bin"
    r = _run(installed, bin_dir / "incdet-make-dataset", "--out-dir", tmp_path / "shapes",
             "--train", "6", "--val", "3", "--size", "64")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "shapes" / "annotations" / "val.json") as f:
        assert len(json.load(f)["images"]) == 3
    missing = tmp_path / "nope.yaml"
    r = _run(installed, bin_dir / "incdet-train-step", "--config", missing, "--step", "0",
             "--work-dir", tmp_path / "w")
    assert r.returncode == 2
    assert r.stderr.strip() == (f"error: {missing}: cannot read config file (No such file or "
                                "directory); check the path")
    assert not (tmp_path / "w").exists()
