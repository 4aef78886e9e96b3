"""The package's import rules, read from the code's own imports (ast), so a wrong-way import fails CI.

Rules (README "Layout"):
- nothing outside `mskjax.train` imports it (the core, the pipeline and the CLIs never depend on
  the trainer);
- no command-line module imports another;
- models import neither data nor training;
- no import circles (module level or inside functions);
- function-local imports only of optional third-party packages, never of mskjax.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mskjax"
CLIS = {"mskjax.segment", "mskjax.localize", "mskjax.convert", "mskjax.demo", "mskjax.train.__main__",
        "mskjax.data.synthetic.__main__", "mskjax.view"}
# Optional third-party packages that may be imported inside a function (each with a comment there).
OPTIONAL = {"torch", "h5py", "timm", "safetensors", "tensorboardX"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path]):
    """{module: [(imported module, line, inside a function)]}, names resolved to modules."""
    out = {}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        found = []

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    found.extend((a.name, child.lineno, inside) for a in child.names)
                elif isinstance(child, ast.ImportFrom):
                    target = _resolve(mod, path.name == "__init__.py", child)
                    for a in child.names:  # `from pkg import module` imports the module
                        sub = f"{target}.{a.name}"
                        found.append((sub if sub in modules else target, child.lineno, inside))
                visit(child, inside)

        visit(tree, False)
        out[mod] = found
    return out


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
IMPORTS = _imports(MODULES)


def _ours(name: str) -> bool:
    return name == "mskjax" or name.startswith("mskjax.")


def _violations(rule) -> list[str]:
    return [f"{mod} line {line} imports {target}" for mod, found in IMPORTS.items()
            for target, line, inside in found if _ours(target) and rule(mod, target)]


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_rules_see_the_package():
    # The test reads real modules: a broken walk would pass every rule vacuously.
    assert {"mskjax.pipeline", "mskjax.train.loop", "mskjax.models.resnet", "mskjax.segment"} <= set(MODULES)
    assert any(t == "mskjax.train.loop" for t, _, _ in IMPORTS["mskjax.train.classifier"])


def test_nothing_outside_train_imports_it():
    assert _violations(lambda mod, t: _in(t, "mskjax.train") and not _in(mod, "mskjax.train")) == []


def test_no_cli_imports_another_cli():
    assert _violations(lambda mod, t: mod in CLIS and t in CLIS and t != mod) == []


def test_models_import_neither_data_nor_training():
    assert _violations(lambda mod, t: _in(mod, "mskjax.models")
                       and (_in(t, "mskjax.data") or _in(t, "mskjax.train"))) == []


def test_no_function_local_imports_of_mskjax_and_only_optional_packages():
    bad = [f"{mod} line {line} imports {t} inside a function" for mod, found in IMPORTS.items()
           for t, line, inside in found if inside and (_ours(t) or t.split(".")[0] not in OPTIONAL)]
    assert bad == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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

    for v in list(graph):
        if v not in index:
            strong(v)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for mod, found in IMPORTS.items():
        edges = set()
        for t, _, _ in found:
            if t in MODULES and t != mod and not (mod == "mskjax" or _in(mod, t) and MODULES[t].name == "__init__.py"):
                edges.add(t)
        graph[mod] = edges
    return graph


def test_no_import_circles():
    # A package's __init__ importing its own submodules is not a circle; a submodule importing the
    # package it lives in, while that package imports it back, is.
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(CLIS))
def test_cli_modules_exist(module):
    assert module in MODULES
