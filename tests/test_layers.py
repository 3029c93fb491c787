"""The package's layers (``incdet/__init__.py`` has the table): every module imports from its
own layer or a lower one, at the top of the file, and the imports between modules form no
cycle. Parsed with ``ast``: nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path

import incdet

PACKAGE = Path(incdet.__file__).parent
# a function-level import is allowed only for these optional or heavy third-party packages
LAZY_ALLOWED = ("onnx", "onnxruntime", "matplotlib", "torch.utils.tensorboard")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return len(incdet.LAYERS)  # the package root: the public API, above every layer
    if parts[1] not in incdet.LAYERS:
        raise AssertionError(f"{module}: not in a layer folder; incdet.LAYERS lists them")
    return incdet.LAYERS.index(parts[1])


def layer_name(module: str) -> str:
    index = layer_of(module)
    return incdet.LAYERS[index] if index < len(incdet.LAYERS) else "the package root"


def imports(path: Path):
    """``(line, imported incdet module or third-party name, top_level, comment)`` per import."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    top = {id(node) for node in tree.body}
    # imports in a top-level `try:` (an optional module) or `if` count as top-level
    for node in tree.body:
        if isinstance(node, (ast.Try, ast.If)):
            for part in [node.body, node.orelse] + [h.body for h in getattr(node, "handlers", [])]:
                top.update(id(n) for n in part)
    here = module_name(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - (path.name == "__init__.py"))[0]
                names = [f"{base}.{node.module}" if node.module else base]
            elif node.module == "incdet" or (node.module or "").startswith("incdet."):
                names = []
                for a in node.names:  # `from incdet.x import y`: y may be a module
                    sub = f"{node.module}.{a.name}"
                    is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file() or \
                        (PACKAGE.parent / sub.replace(".", "/")).is_dir()
                    names.append(sub if is_module else node.module)
            else:
                names = [node.module]
        else:
            continue
        comment = lines[node.lineno - 1].partition("#")[2].strip()
        for name in names:
            yield node.lineno, name, id(node) in top, comment


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_every_module_imports_downward_at_the_top_of_its_file():
    problems = []
    for path in modules():
        here = module_name(path)
        rel = path.relative_to(PACKAGE.parent)
        for line, name, top_level, comment in imports(path):
            if name == "incdet" or name.startswith("incdet."):
                if not top_level:
                    problems.append(f"{rel}:{line}: imports {name} inside a function; import it "
                                    "at the top (a cycle it dodges means a module is in the "
                                    "wrong layer)")
                elif layer_of(name) > layer_of(here):
                    problems.append(f"{rel}:{line}: {here} (layer {layer_name(here)}) imports "
                                    f"{name} (layer {layer_name(name)}), a higher layer")
            elif not top_level and not (name.startswith(LAZY_ALLOWED) and comment):
                problems.append(f"{rel}:{line}: imports {name} inside a function; only optional "
                                f"or heavy packages ({', '.join(LAZY_ALLOWED)}) may be, with a "
                                "comment saying why")
    assert not problems, "\n".join(problems)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_imports_between_modules_form_no_cycle():
    graph = {}
    for path in modules():
        here = module_name(path)
        graph[here] = {name for _, name, _, _ in imports(path)
                       if name.startswith("incdet.") and name != here
                       and not here.startswith(name + ".")}  # a module's own package __init__
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_find_what_they_look_for():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("incdet.base.errors") < layer_of("incdet.model.builder") < \
        layer_of("incdet.tools.cli") < layer_of("incdet")


def test_the_version_is_the_same_in_the_package_and_in_setup_cfg():
    setup_cfg = (PACKAGE.parent / "setup.cfg").read_text()
    declared = [line.split("=", 1)[1].strip() for line in setup_cfg.splitlines()
                if line.replace(" ", "").startswith("version=")]
    assert declared == [incdet.__version__]
