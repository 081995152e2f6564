"""The package's import graph: no cycle, no arrow up a layer, every backend module named after
its backend. Imports inside functions count: a lazy import is still a dependency."""
import ast
import os
from collections import defaultdict

import pytest

import persona_kernels
from persona_kernels.ops import registry

ROOT = os.path.dirname(persona_kernels.__file__)
# Low to high; a module may import its own layer or lower ones. The package facade
# (persona_kernels/__init__.py, __main__.py) is outside the layers.
LAYERS = [
    ["_version", "_native", "bitpack", "io", "hf", "moe", "fingerprint", "backends", "stats", "data", "testing", "builtin", "prompts",
     "distributed", "evaluate", "localize", "reuse"],
    ["ops.registry", "formats"],
    ["ops"],
    ["sites", "calibrate"],
    ["masks", "npti", "steering"],
    ["model", "export", "sparse_checkpoint", "packs"],
    ["app"],
]


def _modules() -> dict:
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                name = rel[: -len(".__init__")] if rel.endswith("__init__") else rel
                out["persona_kernels" + ("." + name if name != "__init__" else "")] = os.path.join(dirpath, f)
    return out


def _graph():
    mods = _modules()
    graph = defaultdict(set)
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        package = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(open(path).read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    return mods, graph


def _layer(mod: str):
    rel = mod.removeprefix("persona_kernels").lstrip(".")
    best = None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (rel == n or rel.startswith(n + ".")) and (best is None or len(n) > best[1]):
                best = (i, len(n))
    return None if best is None else best[0]


def test_no_import_cycle():
    mods, graph = _graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(mods):
        if m not in state and m not in ("persona_kernels", "persona_kernels.__main__"):
            visit(m)


def test_no_arrow_up_a_layer():
    mods, graph = _graph()
    bad = []
    for m, targets in graph.items():
        if m in ("persona_kernels", "persona_kernels.__main__"):
            continue
        lm = _layer(m)
        assert lm is not None, f"{m} is in no layer of this test: place it"
        for t in targets:
            if t == "persona_kernels":
                bad.append(f"{m} -> the package facade")
            elif _layer(t) > lm:
                bad.append(f"{m} (layer {lm}) -> {t} (layer {_layer(t)})")
    assert not bad, "\n".join(bad)


def test_formats_do_not_import_masks_and_only_app_imports_app():
    mods, graph = _graph()
    for m, targets in graph.items():
        if m.startswith("persona_kernels.formats"):
            assert not any(t.startswith("persona_kernels.masks") for t in targets), m
        if not m.startswith("persona_kernels.app") and m != "persona_kernels.__main__":
            assert not any(t.startswith("persona_kernels.app") for t in targets), m


def test_backend_modules_are_named_after_their_backend():
    allowed = {"__init__", "reference", "triton", "cpp", "cuda", "torch_ops", "partials", "dispatch"}
    ops_dir = os.path.join(ROOT, "ops")
    for op in registry.OPS:
        files = {f[:-3] for f in os.listdir(os.path.join(ops_dir, op)) if f.endswith(".py")}
        assert files <= allowed, f"{op}: unexpected modules {files - allowed}"
        assert "reference" in files, f"{op} has no reference"
    for (op, backend, fmt), fn in registry._KERNELS.items():
        want = f"{op}_{fmt}_{backend}" if fmt else f"{op}_{backend}"
        assert fn.__name__ in (want, f"{op}_reference", f"{op}_reference_launcher"), f"{fn.__name__} registered as {want}"
