"""The layout the README's Files section describes: top-level modules with no import cycle
(function-level imports included), and flags.py, which light scripts use, without torch."""

import ast
import glob
import os

from conftest import ROOT


def imports():
    """{module: the project's modules it imports anywhere in its source}."""
    modules = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "*.py"))}
    graph = {}
    for name in modules:
        with open(os.path.join(ROOT, name + ".py")) as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
        graph[name] = found
    return graph


def test_no_module_imports_itself_through_others():
    graph = imports()
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for other in graph[todo.pop()] & graph.keys():
                if other == start:
                    raise AssertionError(f"{start}.py imports itself through another module")
                if other not in seen:
                    seen.add(other)
                    todo.append(other)


def test_flags_needs_no_torch():
    assert not imports()["flags"] & {"torch", "numpy", "model", "training", "runtime"}
