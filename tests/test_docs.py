"""The paper facts the code cites live in the repository: every ``docs/paper.md §N`` cited exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for d in ("radvlm", "metrics", "datamodules", "lightning_modules", "configs", "benchmarks")
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
