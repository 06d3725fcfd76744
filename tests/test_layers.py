"""The house, read from the code's own imports (an AST walk over runner/, nothing is imported):
every module sits in a layer, imports only from its own layer or below, no import circle, and
no function-level import of what the module already imports at its top. docs/layout.md: Layout."""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

pytestmark = pytest.mark.unit

RUNNER = Path(__file__).resolve().parent.parent / "runner"

# lowest first; a module may import from its own layer and the ones before it
LAYERS: List[Tuple[str, List[str]]] = [
    ("base", ["runner", "runner.errors", "runner.schema", "runner.config"]),
    ("jobs", ["runner.jobs", "runner.jobs.*"]),
    ("store", ["runner.store", "runner.store.*", "runner.faults"]),
    ("engine", ["runner.engine", "runner.engine.*"]),
    ("inputs", ["runner.inputs", "runner.inputs.*"]),
    ("runtimes", ["runner.runtimes", "runner.runtimes.*"]),
    ("run", ["runner.run", "runner.run.*"]),
    ("results", ["runner.results", "runner.results.*"]),
    ("task", ["runner.task", "runner.task.*"]),
    ("launch", ["runner.launch", "runner.launch.*"]),
    ("ui", ["runner.ui", "runner.ui.*", "runner.api", "runner.__main__"]),
]

def _name(path: Path) -> str:
    parts = list(path.relative_to(RUNNER.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: Dict[str, Path] = {_name(p): p for p in RUNNER.rglob("*.py")}


def _targets(module: str, node, is_pkg: bool) -> List[str]:
    """The runner modules an import statement names (`from .x import y` is module x.y when that
    is a module, else x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "runner"]
    base = module.split(".")
    if node.level:
        base = base if is_pkg else base[:-1]
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "runner":
        return []
    return [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]


def imports() -> Dict[str, Dict[str, Set[str]]]:
    """module -> {"top": modules imported at module level, "fn": inside a function}."""
    out = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        got = {"top": set(), "fn": set()}

        def visit(node, in_fn: bool):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    got["fn" if in_fn else "top"].update(t for t in _targets(module, child, is_pkg) if t != module)
                visit(child, in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(tree, False)
        out[module] = got
    return out


def layer_of(module: str) -> int:
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to the layout section of docs/layout.md")


def edges() -> Set[Tuple[str, str]]:
    return {(m, t) for m, got in imports().items() for t in got["top"] | got["fn"]}


def upward(all_edges) -> Set[Tuple[str, str]]:
    return {(m, t) for m, t in all_edges if layer_of(t) > layer_of(m)}


def cycles(all_edges) -> List[List[str]]:
    """The import circles (strongly connected components of more than one module)."""
    graph: Dict[str, Set[str]] = {}
    for a, b in all_edges:
        graph.setdefault(a, set()).add(b)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    out: List[List[str]] = []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_every_module_is_in_a_layer():
    for m in MODULES:
        layer_of(m)


def test_no_import_from_a_higher_layer():
    bad = upward(edges())
    assert not bad, "imports from a higher layer: " + ", ".join(
        f"{m} ({LAYERS[layer_of(m)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})" for m, t in sorted(bad))


def test_no_import_circle():
    circles = cycles(edges())
    assert not circles, f"import circles: {circles}"


def test_no_function_level_reimport():
    """A function importing what its module already imports at the top is noise (or a circle dodge)."""
    bad = {(m, t) for m, got in imports().items() for t in got["fn"] & got["top"]}
    assert not bad, f"function-level imports of modules already imported at the top: {sorted(bad)}"


def test_the_walk_sees_what_it_must():
    """The checks above would pass on an empty graph: the walk finds real edges, both kinds."""
    got = imports()
    assert "runner.inputs" in got["runner.run.plan"]["top"]
    assert "runner.inputs.base" in got["runner.inputs.files"]["top"]
    assert "runner.engine.model" in got["runner.inputs.lmdb"]["fn"]
    assert upward({("runner.store.manifest", "runner.run.plan")}) and cycles({("a", "b"), ("b", "a")}) == [["a", "b"]]


# ---- launchers and container runtimes: each choice is made in one place ---------------------

LAUNCHER_NAMES = {"local", "slurm"}
RUNTIME_NAMES = {"apptainer", "charliecloud", "podman", "docker", "pyxis"}


def _name_tests(module: str, names) -> List[str]:
    """`x == "slurm"`, `x in ("podman", "docker")`, ... in a module: where it asks which one."""
    out = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                consts = [side] if isinstance(side, ast.Constant) else list(getattr(side, "elts", []))
                hit = [c.value for c in consts if isinstance(c, ast.Constant) and c.value in names]
                if hit:
                    out.append(f"{module}:{node.lineno} tests {hit}")
    return out


def test_only_the_launchers_ask_which_launcher_and_only_the_runtimes_which_runtime():
    """The plan (and everything below the launchers) never asks `launcher.name == "slurm"`; no
    module outside runner/runtimes/ branches on a runtime's name (today's bugs came from such
    branches living beside the table they belonged in)."""
    bad = [hit for m in MODULES if not m.startswith("runner.launch") for hit in _name_tests(m, LAUNCHER_NAMES)]
    bad += [hit for m in MODULES if not m.startswith("runner.runtimes") for hit in _name_tests(m, RUNTIME_NAMES)]
    assert not bad, bad
    # the check sees such a branch where one is allowed
    assert _name_tests("runner.runtimes.oci", RUNTIME_NAMES)


def test_the_plan_and_the_tasks_import_no_launcher_and_the_registry_no_implementation():
    got = imports()
    below = [m for m in MODULES if layer_of(m) < layer_of("runner.launch")]
    assert not [(m, t) for m in below for t in got[m]["top"] | got[m]["fn"] if t.startswith("runner.launch")]
    # launch/registry.py imports the implementations by name (importlib), when a launch starts
    assert not {"runner.launch.local", "runner.launch.slurm"} & (got["runner.launch.registry"]["top"]
                                                                 | got["runner.launch.registry"]["fn"])
    assert "runner.launch.base" in got["runner.launch.local"]["top"] and "runner.runtimes" in got["runner.run.plan"]["top"]


def test_no_private_name_imported_across_modules():
    """`from .local import _die_with_parent` couples two modules through a name neither promises."""
    bad = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and _targets(module, node, path.name == "__init__.py"):
                bad += [f"{module}:{node.lineno} {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def test_every_hdf5_file_is_opened_through_one_opener():
    """Each protocol once (issue 38): an HDF5 file is opened only by runner/store/h5.py's open_h5 (no
    HDF5 file locking, which fails on many cluster file systems); an h5py.File elsewhere would
    bring back the one spot that forgot locking=False."""
    offenders = [f"{p.relative_to(RUNNER.parent)}:{n}" for p in RUNNER.rglob("*.py") if p.name != "h5.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if "h5py.File(" in line]
    assert offenders == []
