"""The package layout: imports point one way only, cli → reports → evaluation → metrics →
kernels, and no two modules import each other, directly or through others.

Every ``import`` / ``from … import`` statement of every module under ``qmetrics/`` and
``kernels/`` (installed as ``qmetrics.kernels``) is read with :mod:`ast`, including those inside
functions and ``if TYPE_CHECKING:`` blocks. A module may import its own layer and the layers to
its right. The facade — the modules directly in ``qmetrics/`` (``__init__``, ``legacy_paths``,
``__main__``, public re-export modules) — sits above every layer: it may import anything, and
no layer may import it. Package ``__init__`` files of a layer belong to that layer.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Layers from left (may import everything to its right) to right.
LAYERS = ("cli", "reports", "evaluation", "metrics", "kernels")
FACADE = "facade"

Graph = dict[str, set[str]]


def module_files() -> dict[str, Path]:
    """Dotted module name → file, for every module of the installed package."""
    out: dict[str, Path] = {}
    for base, prefix in ((ROOT / "qmetrics", "qmetrics"), (ROOT / "kernels", "qmetrics.kernels")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([prefix, *parts])] = path
    return out


def layer_of(module: str) -> str:
    """The layer a dotted module name belongs to (:data:`FACADE` for the root's own modules)."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    return FACADE


def imported_modules(
    tree: ast.AST, module: str, is_package: bool, known: Iterable[str]
) -> set[str]:
    """The project modules that ``tree`` (the source of ``module``) imports anywhere in it.

    ``from a.b import c`` imports ``a.b.c`` when that is a module, else ``a.b``; relative
    imports are resolved against ``module``'s package. Names outside the project are dropped.
    """
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                     for alias in node.names]  # fmt: skip
        else:
            continue
        for name in names:
            while name and name not in known:  # `import qmetrics.x.y` where y is an attribute
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> Graph:
    files = module_files()
    graph: Graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[module] = imported_modules(tree, module, path.name == "__init__.py", files)
    return graph


def order_violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Every import against the layer order, as ``"importer -> imported (layer -> layer)"``."""
    bad = []
    for module, targets in sorted(graph.items()):
        src = layer_of(module)
        if src == FACADE:
            continue
        for target in sorted(targets):
            dst = layer_of(target)
            if dst == FACADE or LAYERS.index(dst) < LAYERS.index(src):
                bad.append(f"{module} -> {target} ({src} -> {dst})")
    return bad


def import_cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every
    module in one can reach every other, i.e. they import each other through a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(cycles)


# --- the checker itself -----------------------------------------------------------------------


def _graph_of(sources: Mapping[str, str]) -> Graph:
    """The import graph of in-memory modules (name ending in ``.__init__``: a package)."""
    names = {m.removesuffix(".__init__") for m in sources}
    return {
        m.removesuffix(".__init__"): imported_modules(
            ast.parse(src), m.removesuffix(".__init__"), m.endswith(".__init__"), names
        )
        for m, src in sources.items()
    }


def test_checker_reads_every_kind_of_import() -> None:
    graph = _graph_of({
        "qmetrics.metrics.__init__": "",
        "qmetrics.metrics.a": "def f():\n    from qmetrics.evaluation import b\n",
        "qmetrics.metrics.c": "from . import a\nfrom .a import f\nimport numpy\n",
        "qmetrics.evaluation.__init__": "",
        "qmetrics.evaluation.b": "import qmetrics.metrics.a.f\nfrom ..metrics import c\n",
        "qmetrics.kernels.k": "if TYPE_CHECKING:\n    from qmetrics.metrics.c import X\n",
    })  # fmt: skip
    assert graph["qmetrics.metrics.a"] == {"qmetrics.evaluation.b"}
    assert graph["qmetrics.metrics.c"] == {"qmetrics.metrics.a"}
    assert graph["qmetrics.evaluation.b"] == {"qmetrics.metrics.a", "qmetrics.metrics.c"}
    assert order_violations(graph) == [
        "qmetrics.kernels.k -> qmetrics.metrics.c (kernels -> metrics)",
        "qmetrics.metrics.a -> qmetrics.evaluation.b (metrics -> evaluation)",
    ]
    # b -> c -> a -> b: the three form one cycle
    assert import_cycles(graph) == [
        ["qmetrics.evaluation.b", "qmetrics.metrics.a", "qmetrics.metrics.c"]
    ]


def test_checker_facade_and_clean_graph() -> None:
    graph = {
        "qmetrics": {"qmetrics.cli", "qmetrics.kernels.k"},
        "qmetrics.cli": {"qmetrics.reports.r", "qmetrics.kernels.k"},
        "qmetrics.reports.r": {"qmetrics.evaluation.e"},
        "qmetrics.evaluation.e": {"qmetrics.metrics.m", "qmetrics"},
        "qmetrics.metrics.m": {"qmetrics.kernels.k"},
        "qmetrics.kernels.k": set(),
    }
    assert order_violations(graph) == ["qmetrics.evaluation.e -> qmetrics (evaluation -> facade)"]
    assert import_cycles(graph) == [
        ["qmetrics", "qmetrics.cli", "qmetrics.evaluation.e", "qmetrics.reports.r"]
    ]
    graph["qmetrics.evaluation.e"].discard("qmetrics")
    assert order_violations(graph) == [] and import_cycles(graph) == []


# --- the tree ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph()


def test_every_layer_has_modules(graph: Graph) -> None:
    layers = {layer_of(m) for m in graph}
    assert set(LAYERS) <= layers, f"no module found in {set(LAYERS) - layers}"
    assert "qmetrics.metrics.logit_stats" in graph
    assert "qmetrics.kernels.logit_compare_torch" in graph["qmetrics.metrics.functional"]


def test_imports_follow_the_layer_order(graph: Graph) -> None:
    bad = order_violations(graph)
    assert not bad, "imports against cli → reports → evaluation → metrics → kernels:\n" + "\n".join(
        bad
    )


def test_no_import_cycles(graph: Graph) -> None:
    cycles = import_cycles(graph)
    assert not cycles, "modules importing each other (directly or through others):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )
