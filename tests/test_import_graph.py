"""Every import points down the layers of docs/design.md and no two modules import each other, directly or
through others (parsed from the source, no module is imported; lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = {"tasks", "chat", "grpo", "lora", "policy", "processor", "generation", "prefix", "vocab_chunks", "rollout",
        "tiny", "batch", "rewards", "sharding", "rollout_correction", "fast_engine", "vllm_engine", "objectives"}
TOOLS = {"evaluate", "eval_metrics", "eval_tables", "prediction_files", "bootstrap", "draw", "infer",
         "shuffle_control", "synthesize_thinking", "teachers", "demo", "ablation", "console"}
ALLOWED = {
    "metrics": {"metrics"},
    "core": {"core"},
    "data": {"core", "data", "metrics"},
    "tools": {"core", "data", "metrics", "tools"},
    "training": {"core", "data", "metrics", "tools", "training"},
}
LIGHTNING_OK = {"training", "data/datamodule"}
PACKAGES = ("metrics", "radvlm", "datamodules", "radvlm_tools", "lightning_modules")
PROJECT = (*PACKAGES, "benchmarks")  # the cycle check covers the support code too (and main.py)
FOLDER_LAYER = {"metrics": "metrics", "datamodules": "data", "lightning_modules": "training"}
# folder by folder, lowest first: each may import only itself and the folders before it (metrics and the core
# are peers that import nothing of each other; ALLOWED, module by module, says so)
FOLDERS = ("metrics", "radvlm", "datamodules", "radvlm_tools", "lightning_modules", "main", "benchmarks")


def layer_of(module: str) -> str | None:
    """``radvlm.policy`` → ``core``, ``radvlm_tools.evaluate`` → ``tools``; a package (``radvlm``) counts as its
    layer; ``None`` for a third-party or standard-library module, ``unknown`` for a project module not listed."""
    parts = module.split(".")
    top = parts[0]
    if top in FOLDER_LAYER:
        return FOLDER_LAYER[top]
    if top == "radvlm":
        return "core" if len(parts) == 1 or parts[1] in CORE | {"__init__"} else "unknown"
    if top == "radvlm_tools":
        return "tools" if len(parts) == 1 or parts[1] in TOOLS | {"__init__"} else "unknown"
    return None


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module.split(".")[0] in PACKAGES:  # ``from radvlm_tools import infer``: maybe a module
                names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def package_modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[tuple[str, Path]]:
    """(dotted name, path) of every module of ``packages`` under ``root``, sub-packages included; a package's
    ``__init__.py`` is named after the package (``radvlm``)."""
    out = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


def import_graph(modules: list[tuple[str, Path]]) -> dict[str, set[str]]:
    """{module: the project modules it imports}: ``from a import b`` points at ``a.b`` when that is a module of
    ``modules``, else at ``a``; ``import a.b.c`` at ``a.b.c``; names outside ``modules`` are dropped."""
    names = {name for name, _ in modules}
    graph: dict[str, set[str]] = {}
    for name, path in modules:
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                          for a in node.names}
        graph[name] = {e for e in edges if e in names and e != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative): each is a set
    of modules that import each other, directly or through the others; sorted, for a stable message."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return sorted(out)


def upward_imports(graph: dict[str, set[str]], order: tuple[str, ...]) -> list[str]:
    """Imports from a top-level folder to one later in ``order`` (lowest first): ``"a.x (a) imports b.y (b)"``;
    a folder missing from ``order`` is an error, so that a new package gets its place."""
    rank = {folder: i for i, folder in enumerate(order)}
    wrong = []
    for module, imported in sorted(graph.items()):
        here = module.split(".")[0]
        if here not in rank:
            raise ValueError(f"folder {here!r} (module {module}) has no place in {order}")
        wrong += [f"{module} ({here}) imports {other} ({other.split('.')[0]})" for other in sorted(imported)
                  if rank[other.split(".")[0]] > rank[here]]
    return wrong


def project_graph() -> dict[str, set[str]]:
    """The import graph of the four packages, ``benchmarks/`` and ``main.py``."""
    return import_graph(package_modules(ROOT, PROJECT) + [("main", ROOT / "main.py")])


def test_every_module_has_a_layer():
    unknown = [name for name, _ in package_modules() if layer_of(name) == "unknown"]
    assert not unknown, f"add these modules to a layer in docs/design.md and this test: {unknown}"


def test_imports_point_down_the_layers():
    wrong = []
    for name, path in package_modules():
        here = layer_of(name)
        for imported in imports_of(path):
            there = layer_of(imported)
            if there is not None and there not in ALLOWED[here]:
                wrong.append(f"{name} ({here}) imports {imported} ({there})")
    assert not wrong, "\n".join(wrong)


def test_only_training_data_module_and_main_import_lightning():
    wrong = []
    for name, path in package_modules():
        key = "data/datamodule" if name == "datamodules.datamodule" else layer_of(name)
        if key in LIGHTNING_OK:
            continue
        if any(i == "lightning" or i.startswith(("lightning.", "pytorch_lightning")) for i in imports_of(path)):
            wrong.append(name)
    assert not wrong, f"Lightning imported outside lightning_modules/ and the data module: {wrong}"


def test_design_doc_lists_the_tools_and_core():
    text = (ROOT / "docs" / "design.md").read_text()
    for name in sorted(CORE | TOOLS):
        assert name in text, name


def test_no_two_modules_import_each_other():
    cycles = import_cycles(project_graph())
    assert not cycles, "modules that import each other (move what they share into a module below them): " + \
        "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_check_finds_a_planted_cycle_and_passes_a_chain():
    # a -> b -> c -> a is one circle of three; d -> a hangs off it; e <-> f a second, direct one
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}, "p.e": {"p.f"}, "p.f": {"p.e"}}
    assert import_cycles(graph) == [["p.a", "p.b", "p.c"], ["p.e", "p.f"]]
    assert import_cycles({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": set(), "p.d": {"p.a", "p.c"}}) == []


def test_graph_parses_a_planted_lazy_cycle_in_a_package(tmp_path):
    # pkg.low imports pkg.high inside a function (the shape evaluate <-> shuffle_control had); pkg.free is clean
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "high.py").write_text("from pkg import low\nimport json\n")
    (pkg / "low.py").write_text("def f():\n    from pkg.high import g\n    return g\n")
    (pkg / "free.py").write_text("from pkg.low import f\n")
    graph = import_graph(package_modules(tmp_path, ("pkg",)))
    assert graph == {"pkg": set(), "pkg.free": {"pkg.low"}, "pkg.high": {"pkg.low"}, "pkg.low": {"pkg.high"}}
    assert import_cycles(graph) == [["pkg.high", "pkg.low"]]


def test_folders_import_only_the_folders_below_them():
    assert set(FOLDERS) == {name.split(".")[0] for name in project_graph()}
    wrong = upward_imports(project_graph(), FOLDERS)
    assert not wrong, "imports up the folder order " + " < ".join(FOLDERS) + ":\n" + "\n".join(wrong)


def test_folder_check_finds_a_planted_upward_import():
    order = ("low", "mid", "top")
    graph = {"low.a": {"low.b"}, "low.b": set(), "mid.c": {"low.a", "mid.d"}, "mid.d": set(), "top.e": {"mid.c"}}
    assert upward_imports(graph, order) == []
    planted = {**graph, "low.b": {"mid.d"}, "mid.d": {"top.e", "low.a"}}
    assert upward_imports(planted, order) == ["low.b (low) imports mid.d (mid)", "mid.d (mid) imports top.e (top)"]
    with pytest.raises(ValueError, match="folder 'new'"):
        upward_imports({"new.x": set()}, order)
