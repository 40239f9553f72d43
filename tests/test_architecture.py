"""The package's shape: data flows one way (engine -> formats -> runtime -> train / infer -> commands),
with no import cycle anywhere, and library code never imports the command line.

Every import counts, the ones inside functions too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "loraforge"

# Lower layers never import higher ones. Same-layer imports are allowed (no cycles, checked below).
LAYERS = [
    ["loraforge.errors"],
    [
        "loraforge.config",
        "loraforge.quant",
        "loraforge.layers",
        "loraforge.kernels",
        "loraforge.model",
        "loraforge.combine",
        "loraforge.optim",
    ],
    # loraforge.jobs: content addressing (CIDs, CAR, the store) down here, so the runtime can resolve
    # a CID; the job modules, runner and commands, which run train/infer, sit with eval and tools.
    [
        "loraforge.bases",
        "loraforge.flags",
        "loraforge.formats",
        "loraforge.data",
        "loraforge.examples",
        "loraforge.jobs",
    ],
    ["loraforge.runtime"],
    ["loraforge.train", "loraforge.infer"],
    [
        "loraforge.eval",
        "loraforge.tools",
        "loraforge.jobs.modules",
        "loraforge.jobs.runner",
        "loraforge.jobs.cli",
        "loraforge.serve",
    ],
    ["loraforge.cli"],
]

# The one allowed upward edge: LoraModel keeps PEFT's method names for files (save_pretrained,
# load_adapter, from_pretrained), which hand over to the PEFT format's reader and writer.
ALLOWED_UPWARD = {("loraforge.model", "loraforge.formats.peft")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The loraforge modules `name` imports (anywhere in its file)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import submodule` depends on the submodule; `from mod import name` on mod.
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        for target in targets:
            while target and target not in known:  # `import loraforge.x.y` of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith("loraforge") and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    """The layer of the most specific name that covers `module` (loraforge.jobs.runner before loraforge.jobs)."""
    matches = [
        (len(n), i)
        for i, names in enumerate(LAYERS)
        for n in names
        if module == n or module.startswith(n + ".")
    ]
    if matches:
        return max(matches)[1]
    if module == "loraforge":
        return 1  # the package's __init__ re-exports the engine; the jobs it names load lazily
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_train_and_infer_do_not_import_each_other():
    graph = import_graph()
    bad = [
        (m, t)
        for m, targets in graph.items()
        for t in targets
        if (m.startswith("loraforge.train") and t.startswith("loraforge.infer"))
        or (m.startswith("loraforge.infer") and t.startswith("loraforge.train"))
    ]
    assert bad == []


def test_library_never_imports_the_cli():
    graph = import_graph()
    assert [m for m, targets in graph.items() if "loraforge.cli" in targets] == []


def test_data_flows_one_way():
    graph = import_graph()
    upward = [
        f"{m} -> {t}"
        for m, targets in graph.items()
        for t in targets
        if layer_of(t) > layer_of(m) and (m, t) not in ALLOWED_UPWARD
    ]
    assert upward == []


@pytest.mark.parametrize("source, expected", [("from loraforge.runtime import x", {"loraforge.runtime"})])
def test_import_reader(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert imports_of("loraforge.m", path, {"loraforge.runtime", "loraforge.m"}) == expected
