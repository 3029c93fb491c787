"""The commands in README.md and docs/*.md run as written.

Every ``python tools/<name>.py ...`` (or ``torchrun ... tools/<name>.py ...``) command in a fenced
code block, or in an inline code span that starts with ``python tools/``, must name a tool that
exists and use only ``--flags`` that the tool's ``--help`` lists. Every ``configs/*.yaml`` path,
every ``make`` target and every relative link (with its ``#anchor``) must exist.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`(python tools/[^`]+)`")
ASSIGN = re.compile(r"^([A-Za-z_]\w*)=(.*)$")
TOOL = re.compile(r"^tools/(\w+)\.py$")
CONFIG = re.compile(r"configs/[\w.+\-]+\.yaml")
LINK = re.compile(r"\]\(([^)\s]+)\)")
PYTHONS = ("python", "python3", sys.executable)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _lineno(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _logical_lines(block: str, first_line: int):
    """(line number, line) of a code block, backslash-continued lines joined."""
    pending, start = "", first_line
    for i, line in enumerate(block.splitlines()):
        if not pending:
            start = first_line + i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def _commands(path: Path):
    """(where, tool name, argv after the tool) for every tool command in one document."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        variables: dict[str, str] = {}
        for lineno, line in _logical_lines(m.group(1), _lineno(text, m.start(1))):
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:  # not shell (a YAML or Python block)
                continue
            if len(tokens) == 1 and ASSIGN.match(tokens[0]):  # NAME="--a b" used later as $NAME
                name, value = ASSIGN.match(tokens[0]).groups()
                variables[name] = value
                continue
            expanded = []
            for tok in tokens:
                var = re.fullmatch(r"\$\{?(\w+)\}?", tok)
                if var and var.group(1) in variables:
                    expanded += shlex.split(variables[var.group(1)])
                else:
                    expanded.append(tok)
            out += _tool_calls(expanded, f"{_rel(path)}:{lineno}")
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for m in INLINE.finditer(prose):
        out += _tool_calls(shlex.split(" ".join(m.group(1).split())),
                           f"{_rel(path)}:{_lineno(prose, m.start())}")
    return out


def _tool_calls(tokens: list[str], where: str):
    for i, tok in enumerate(tokens):
        m = TOOL.match(tok)
        if m and i > 0 and (tokens[i - 1] in PYTHONS or tokens[0] == "torchrun"):
            return [(where, m.group(1), tokens[i + 1:])]
    return []


COMMANDS = [c for doc in DOCS for c in _commands(doc)]


@functools.lru_cache(maxsize=None)
def _help(tool: str) -> str:
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    proc = subprocess.run([sys.executable, f"tools/{tool}.py", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"tools/{tool}.py --help failed:\n{proc.stderr}"
    return proc.stdout


def test_commands_found():
    """The extraction works: the README shows the main tools, and the docs have commands."""
    tools = {tool for where, tool, _ in COMMANDS if where.startswith("README.md")}
    assert {"run_protocol", "train_step", "evaluate", "import_detector", "export",
            "infer"} <= tools
    assert any(where.startswith("docs/benchmarks.md") for where, _, _ in COMMANDS)


@pytest.mark.parametrize("where, tool, args", COMMANDS,
                         ids=[f"{w}:{t}" for w, t, _ in COMMANDS])
def test_command_runs_as_written(where, tool, args):
    assert (ROOT / "tools" / f"{tool}.py").is_file(), f"{where}: no tools/{tool}.py"
    text = _help(tool)
    for arg in args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
                f"{where}: tools/{tool}.py has no {flag} (see its --help)")


@pytest.mark.parametrize("doc", DOCS, ids=[_rel(d) for d in DOCS])
def test_config_paths_exist(doc):
    missing = sorted({p for p in CONFIG.findall(doc.read_text()) if not (ROOT / p).is_file()})
    assert not missing, f"{_rel(doc)} names configs that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=[_rel(d) for d in DOCS])
def test_make_targets_exist(doc):
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    text = doc.read_text()
    used = {t for m in FENCE.finditer(text)
            for t in re.findall(r"^make ([\w-]+)", m.group(1), re.M)}
    assert used <= targets, f"{_rel(doc)}: no Makefile target {sorted(used - targets)}"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file."""
    text = FENCE.sub("", path.read_text())
    out = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(slug)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=[_rel(d) for d in DOCS])
def test_relative_links_exist(doc):
    text = FENCE.sub("", doc.read_text())
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        assert dest.exists(), f"{_rel(doc)}: link to missing {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{_rel(doc)}: no heading for #{anchor} in {file}"
