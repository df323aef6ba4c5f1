"""The paper facts the code cites live in the repository: every ``docs/paper.md §N`` cited exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("radvlm", "radvlm_tools", "metrics", "datamodules", "lightning_modules", "configs", "benchmarks")
           for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".yaml", ".sh")] + [ROOT / "main.py"]


def test_cited_paper_sections_exist():
    sections = set(re.findall(r"^## (§\w+)", (ROOT / "docs" / "paper.md").read_text(), flags=re.M))
    cited = {}
    for path in SOURCES:
        for ref in re.findall(r"docs/paper\.md ((?:§\w+(?:, )?)+)", path.read_text(encoding="utf-8")):
            for section in re.findall(r"§\w+", ref):
                cited.setdefault(section, path.relative_to(ROOT).as_posix())
    assert cited, "the source cites docs/paper.md"
    missing = {s: f for s, f in cited.items() if s not in sections}
    assert not missing, f"cited sections missing from docs/paper.md: {missing}"


def test_no_source_cites_files_outside_the_repository():
    offenders = [p.relative_to(ROOT).as_posix() for p in SOURCES if "REFERENCE.md" in p.read_text(encoding="utf-8")]
    assert not offenders, offenders


def test_module_docstrings_are_short():
    # docs/design.md: a module docstring says the purpose and the deviations from the paper; details live with
    # the functions they describe
    import ast

    long = {}
    for path in SOURCES:
        if path.suffix == ".py":
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            if doc and len(doc.splitlines()) > 20:
                long[path.relative_to(ROOT).as_posix()] = len(doc.splitlines())
    assert not long, f"module docstrings over 20 lines: {long}"


# ------------------------------------------------------------------- README and docs/ cannot rot silently
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)
CONFIG = re.compile(r"--config[ =]+`?([\w./-]+\.yaml)")
MAIN_CALL = re.compile(r"main\.py\s+(fit|validate|test|predict)\b[^\n`]*?--config[ =]+([\w./-]+\.yaml)")
MODULE = re.compile(r"python3? -m ([A-Za-z_][\w.]*)")
SCRIPT = re.compile(r"`(radvlm-[a-z-]+)`")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a Markdown text's headings: lower case, punctuation dropped, spaces to ``-``."""
    out = set()
    for title in re.findall(r"^#+ (.+)$", text, flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-"))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative links of one Markdown file whose file (relative to the file's folder) or heading is missing,
    each as ``"FILE: TARGET (why)"`` with FILE relative to ``root``."""
    wrong = []
    for target in LINK.findall(_text(path)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            wrong.append(f"{path.relative_to(root)}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(_text(dest)):
            wrong.append(f"{path.relative_to(root)}: {target} (no such heading)")
    return wrong


def test_heading_anchors_and_broken_links_are_found(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# Real runs: launch, LoRA\n## GPU set-up (one line)\n")
    page.write_text("[a](other.md) [b](other.md#real-runs-launch-lora) [c](other.md#gpu-set-up-one-line) "
                    "[d](https://example.org/x) [e](missing.md) [f](other.md#nothing) [g](#top)\n# Top\n")
    assert heading_anchors(_text(tmp_path / "other.md")) == {"real-runs-launch-lora", "gpu-set-up-one-line"}
    assert broken_links(page, tmp_path) == ["page.md: missing.md (no such file)",
                                            "page.md: other.md#nothing (no such heading)"]


def test_every_relative_link_in_readme_and_docs_resolves():
    wrong = [w for path in DOCS for w in broken_links(path)]
    assert not wrong, "\n".join(wrong)


def configs_in(text: str, found: dict[str, str] | None = None) -> dict[str, str]:
    """{config path: the main.py subcommand it is named with} (``fit`` for a config named without one,
    ``predict`` for the ``eval_*`` ones); placeholders such as ``eval_<set>.yaml`` are skipped."""
    found = {} if found is None else found
    for sub, config in MAIN_CALL.findall(text):
        found.setdefault(config, sub)
    for config in CONFIG.findall(text):
        found.setdefault(config, "predict" if Path(config).name.startswith("eval_") else "fit")
    return found


def documented_configs() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in DOCS:
        configs_in(_text(path), found)
    return found


def test_configs_and_modules_are_read_from_commands_in_the_text():
    text = ("`python main.py predict --config configs/eval_x.yaml` then `main.py validate --trainer.devices 1 "
            "--config configs/a.yaml`; `--config configs/eval_<set>.yaml`, `--metrics-config configs/m.yaml`, "
            "`--config=configs/demo/b.yaml`; `python -m radvlm_tools.evaluate P.jsonl`, "
            "`python -m radvlm_tools.<tool>`, `python3 -m benchmarks.run_all`")
    assert configs_in(text) == {"configs/eval_x.yaml": "predict", "configs/a.yaml": "validate",
                                "configs/demo/b.yaml": "fit"}
    assert modules_in(text) == {"radvlm_tools.evaluate", "radvlm_tools", "benchmarks.run_all"}


def test_documented_configs_exist_and_parse_with_print_config(capsys):
    import main

    configs = documented_configs()
    assert {"configs/sft.yaml", "configs/grpo_report.yaml", "configs/eval_mimic_reports.yaml"} <= configs.keys()
    missing = sorted(c for c in configs if not (ROOT / c).is_file())
    assert not missing, f"configs named in README/docs that do not exist: {missing}"
    failed = {}
    for config, sub in sorted(configs.items()):  # one parse per distinct config
        # an ablation variant is an overlay: it parses on top of the demo GRPO config it is documented with
        base = ["--config", str(ROOT / "configs/demo/grpo.yaml")] if config.startswith("configs/demo/ablation/") else []
        try:
            main.main(args=[sub, *base, "--config", str(ROOT / config), "--print_config"])
            failed[config] = f"{sub}: --print_config did not exit"
        except SystemExit as exc:
            if exc.code not in (0, None):
                failed[config] = f"{sub}: exit {exc.code}: {capsys.readouterr().err[-500:]}"
        if config not in failed:
            assert "trainer:" in capsys.readouterr().out, config
    assert not failed, failed


def test_every_configs_path_named_in_readme_and_docs_exists():
    named = {m for path in DOCS for m in re.findall(r"\bconfigs/[\w./-]*\w\.yaml\b", _text(path))}
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, missing


def modules_in(text: str) -> set[str]:
    """Every ``python -m X`` of a text (``radvlm_tools.<tool>`` gives ``radvlm_tools``)."""
    return {m.rstrip(".") for m in MODULE.findall(text)}


def documented_modules() -> set[str]:
    return {m for path in DOCS for m in modules_in(_text(path))}


def test_every_python_m_module_named_in_readme_and_docs_imports():
    import importlib

    modules = documented_modules()
    assert {"radvlm_tools.evaluate", "radvlm_tools.infer", "datamodules.phantom"} <= modules
    assert not any(m.startswith("radvlm.tools") for m in modules), "the tools moved to radvlm_tools"
    failed = {}
    for module in sorted(modules):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001  (every failure is reported, by module)
            failed[module] = f"{type(exc).__name__}: {exc}"
    assert not failed, failed


def test_every_console_script_named_in_readme_and_docs_is_in_setup_cfg():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = {line.split("=")[0].strip() for line in
               cfg["options.entry_points"]["console_scripts"].strip().splitlines()}
    named = {s for path in DOCS for s in SCRIPT.findall(_text(path))}
    assert "radvlm-evaluate" in named
    assert named <= scripts, sorted(named - scripts)
