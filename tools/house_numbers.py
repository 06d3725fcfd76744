#!/usr/bin/env python3
"""The house in numbers (issue 38), read from the code alone (nothing is imported):

    python3 tools/house_numbers.py [REPO]      # REPO defaults to this checkout

modules per package of runner/, the largest files and the longest functions, import circles and
imports running back up (the layers of REPO's tests/test_layers.py), and how many imports sit
inside functions. Run it on a checkout before and after a move to compare.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
from collections import Counter
from pathlib import Path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    repo = Path(argv[0] if argv else Path(__file__).resolve().parent.parent).resolve()
    spec = importlib.util.spec_from_file_location("house_layers", repo / "tests" / "test_layers.py")
    layers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(layers)                      # its RUNNER is REPO/runner

    modules = layers.MODULES
    per_package = Counter(".".join(m.split(".")[:-1]) if not p.name == "__init__.py" else m
                          for m, p in modules.items())
    print(f"modules: {len(modules)} in {len(per_package)} packages")
    for pkg, n in sorted(per_package.items()):
        print(f"  {pkg:22} {n}")

    sizes = sorted(((len(p.read_text().splitlines()), str(p.relative_to(repo))) for p in modules.values()), reverse=True)
    print("largest files: " + ", ".join(f"{name} {n}" for n, name in sizes[:5]))
    funcs = []
    for m, p in modules.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{p.relative_to(repo)}:{node.name}"))
    funcs.sort(reverse=True)
    print("longest functions: " + ", ".join(f"{name} {n}" for n, name in funcs[:5]))

    got = layers.imports()
    edges = layers.edges()
    top = sum(len(g["top"]) for g in got.values())
    fn = sum(len(g["fn"]) for g in got.values())
    print(f"imports between runner modules: {len(edges)} edges ({top} at module level, {fn} inside functions)")
    print(f"layers: {len(layers.LAYERS)} ({', '.join(name for name, _ in layers.LAYERS)})")
    print(f"import circles: {len(layers.cycles(edges))}")
    print(f"imports running back up: {len(layers.upward(edges))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
