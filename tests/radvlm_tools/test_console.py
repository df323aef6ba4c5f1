"""The console scripts of setup.cfg: each names a function of ``radvlm_tools.console`` that runs the tool of its
name, and the packages setup.cfg installs include ``radvlm_tools``."""

import configparser
from pathlib import Path

import pytest
from setuptools import find_packages

from radvlm_tools import console

ROOT = Path(__file__).resolve().parents[2]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _scripts() -> dict[str, str]:
    lines = _setup_cfg()["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_every_console_script_names_the_runner_of_its_tool():
    scripts = _scripts()
    assert {"radvlm-evaluate", "radvlm-infer", "radvlm-demo"} <= scripts.keys()
    for name, target in scripts.items():
        module, func = target.split(":")
        assert module == "radvlm_tools.console", target
        assert func == name.removeprefix("radvlm-").replace("-", "_"), (name, target)
        assert callable(getattr(console, func)), target


def test_setup_cfg_packages_include_the_tools_and_not_the_tests():
    spec = _setup_cfg()["options.packages.find"]["include"].split()
    found = set(find_packages(where=str(ROOT), include=spec))
    assert {"radvlm", "radvlm_tools", "metrics", "datamodules", "lightning_modules"} <= found
    assert not {p for p in found if p.startswith(("tests", "benchmarks"))}, found


def test_a_tool_returning_its_result_exits_0(monkeypatch, capsys):
    # the tools' main return a dict for Python callers; as an exit status sys.exit would print it and exit 1
    assert console._run(lambda: {"report_generation": {"bleu": 0.5}}) == 0
    monkeypatch.setattr("sys.argv", ["radvlm-shuffle-control", "--help"])
    with pytest.raises(SystemExit) as exc:
        console.shuffle_control()
    assert exc.value.code == 0
    assert "permute" in capsys.readouterr().out
