"""The package's modules form no import circle (issue 33) and each imports alone, in a fresh process.

The static check reads every ``import`` of a package module (at module level and inside functions: a lazy import
that closes a circle still ties the two modules together), resolves it to the module file, and fails on any strongly
connected set of more than one module. The dynamic check imports each module in its own forked child of a process that
has imported only the package root (``import lightning_vidalign``, which every import of a submodule runs first) and
the heavy third-party libraries (torch, lightning, diffusers, transformers, peft: outside the check, loaded once).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: pyproject's package-dir mapping: package name -> folder
PACKAGE_DIRS = {
    "lightning_vidalign": "lightning_vidalign",
    "lightning_vidalign.algorithms": "algorithms",
    "lightning_vidalign.rewards": "rewards",
    "lightning_vidalign.rewards.motion": "rewards/motion",
    "lightning_vidalign.datamodules": "datamodules",
    "lightning_vidalign.backbones": "lightning_vidalign/backbones",
}


def package_modules() -> dict[str, str]:
    """``{module name: file}`` of every module of the package (``__init__`` files name their package)."""
    out = {}
    for package, folder in PACKAGE_DIRS.items():
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                out[package if name == "__init__.py" else f"{package}.{name[:-3]}"] = os.path.join(ROOT, folder, name)
    return out


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """``{module: package modules it imports}``; ``from pkg import name`` counts ``pkg.name`` when that is a module,
    else ``pkg``. A package's own ``__init__`` importing its children is not an edge back from them."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = module.split(".") if is_package else module.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_circle_finder_finds_a_circle():
    """The check can fail: a two-module circle (the former ``backbones.wan`` ↔ ``diffusers_components``) is found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert circles(graph) == [["a", "b"]]


def test_no_import_circle_between_package_modules():
    modules = package_modules()
    assert len(modules) > 40 and "lightning_vidalign.algorithms.grpo" in modules
    graph = import_graph(modules)
    assert "lightning_vidalign.rollouts" in graph["lightning_vidalign.algorithms.grpo"]
    found = circles(graph)
    assert not found, "import circles (each set imports itself through the others): " + "; ".join(" ↔ ".join(c) for c in found)


def test_every_module_imports_alone_in_a_fresh_process():
    """Each module imported in a forked child of a process holding only the package root: an import that works only
    after another module was imported (an order-dependent circle) fails here, naming the module."""
    script = """
import os, sys, traceback
import lightning_vidalign
# third-party libraries loaded once (not part of the check: they are outside the package), so each child only runs
# the package's own imports
import torch, lightning, torchmetrics, diffusers, transformers, peft  # noqa: E401
import diffusers.models, transformers.models.bert  # noqa: E401
names = sys.argv[1:]
loaded = sorted(m for m in sys.modules if m.startswith("lightning_vidalign."))
failed = []
for name in names:
    pid = os.fork()
    if pid == 0:
        try:
            __import__(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        failed.append(name)
print("PRELOADED", loaded)
print("FAILED", failed)
"""
    names = sorted(package_modules())
    out = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("PRELOADED", "FAILED")))
    assert lines["FAILED"] == "[]", f"modules that do not import alone: {lines['FAILED']}\n{out.stderr[-3000:]}"
    assert lines["PRELOADED"] == "['lightning_vidalign._compat', 'lightning_vidalign.diffusers_components']", lines["PRELOADED"]
