"""Every import points down the layers of docs/design.md (parsed from the source, no module is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = {"tasks", "chat", "grpo", "lora", "policy", "rollout", "tiny", "batch", "rewards", "sharding",
        "rollout_correction", "fast_engine", "vllm_engine", "objectives"}
TOOLS = {"evaluate", "eval_metrics", "eval_tables", "prediction_files", "draw", "infer", "shuffle_control", "synthesize_thinking",
         "teachers", "demo"}
ALLOWED = {
    "metrics": {"metrics"},
    "core": {"core"},
    "data": {"core", "data", "metrics"},
    "tools": {"core", "data", "metrics", "tools"},
    "training": {"core", "data", "metrics", "tools", "training"},
}
LIGHTNING_OK = {"training", "data/datamodule"}
PACKAGES = ("metrics", "radvlm", "datamodules", "lightning_modules")


def layer_of(module: str) -> str | None:
    """``radvlm.policy`` → ``core``, ``radvlm.tools.evaluate`` → ``tools``; ``radvlm`` (the package itself) counts as core."""
    parts = module.split(".")
    top = parts[0]
    if top == "metrics":
        return "metrics"
    if top == "datamodules":
        return "data"
    if top == "lightning_modules":
        return "training"
    if top == "radvlm":
        if len(parts) > 1 and parts[1] == "tools":  # the package radvlm.tools and every module in it
            return "tools" if len(parts) == 2 or parts[2] in TOOLS | {"__init__"} else "unknown"
        if len(parts) == 1 or parts[1] in CORE or parts[1] == "__init__":
            return "core"
        return "unknown"
    return None  # a third-party or standard-library module


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            if node.module.split(".")[0] in PACKAGES:  # ``from radvlm.tools import infer``: maybe a module
                names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def package_modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every module of the four packages, sub-packages (``radvlm.tools``) included."""
    out = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            out.append((".".join(path.relative_to(ROOT).with_suffix("").parts), path))
    return out


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
