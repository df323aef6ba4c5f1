"""Safe loading: no code runs from a file we read.

- Every ``torch.load`` in the package source passes ``weights_only=True``; nothing unpickles otherwise
  (``pickle``/``joblib``/``dill`` loads, ``numpy.load(allow_pickle=True)``); ``trust_remote_code`` is never
  enabled. Checked on the syntax tree of radvlm/, datamodules/, metrics/, lightning_modules/ and main.py.
- Our Lightning checkpoints hold only tensors and plain values, so they load with ``weights_only=True``; the
  CLI (``main.py``) passes ``weights_only=True`` for ``--ckpt_path`` unless the user says otherwise, and reads
  configuration only from the files and flags it is given.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch

import main as cli_main
from lightning_modules.common import default_optimizer, plain_value
from radvlm.policy import LoRASettings, PolicyConfig
from tests.helpers import report_record, write_records

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("radvlm", "radvlm_tools", "datamodules", "metrics", "lightning_modules")
                 for p in (ROOT / d).rglob("*.py")) + [ROOT / "main.py"]


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def dotted(node: ast.AST) -> str:
    """``torch.serialization.load`` → that string; '' for anything that is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def parsed() -> list[tuple[Path, ast.AST]]:
    return [(p, ast.parse(p.read_text(), filename=str(p))) for p in SOURCES]


def test_the_scan_sees_the_source_tree():
    names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
    assert {"main.py", "radvlm/policy.py", "lightning_modules/common.py", "datamodules/collate.py",
            "metrics/chexbert.py", "radvlm_tools/evaluate.py"} <= names
    # metrics/chexbert.py reads the CheXbert checkpoint with torch.load: the check below is not vacuous
    loads = [c for p, t in parsed() for c in calls(t) if dotted(c.func) == "torch.load"]
    assert loads


def test_every_torch_load_uses_weights_only_true():
    bad = []
    for path, tree in parsed():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
                bad += [f"{where(path, node)} imports load directly" for a in node.names if a.name == "load"]
        for call in calls(tree):
            name = dotted(call.func)
            safe = is_true(keyword(call, "weights_only"))
            if name in ("torch.load", "torch.serialization.load") and not safe:
                bad.append(f"{where(path, call)} {name} without weights_only=True")
    assert not bad, bad


def test_nothing_unpickles_files():
    bad = []
    for path, tree in parsed():
        for call in calls(tree):
            name = dotted(call.func)
            if name in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "dill.loads",
                        "cloudpickle.load", "torch.jit.load", "pd.read_pickle", "pandas.read_pickle"):
                bad.append(f"{where(path, call)} {name}")
            if name.endswith("load") and name.split(".")[0] in ("np", "numpy") and \
                    not (keyword(call, "allow_pickle") is None or
                         isinstance(keyword(call, "allow_pickle"), ast.Constant) and
                         keyword(call, "allow_pickle").value is False):
                bad.append(f"{where(path, call)} {name} with allow_pickle")
    assert not bad, bad


def test_trust_remote_code_is_never_enabled():
    bad = []
    for path, tree in parsed():
        for call in calls(tree):
            value = keyword(call, "trust_remote_code")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                bad.append(f"{where(path, call)} trust_remote_code={ast.unparse(value)}")
            if any(k.arg is None for k in call.keywords) and "trust_remote_code" in ast.unparse(call):
                bad.append(f"{where(path, call)} passes trust_remote_code through **kwargs")
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and not (
                            isinstance(v, ast.Constant) and v.value is False):
                        bad.append(f"{where(path, node)} {{'trust_remote_code': {ast.unparse(v)}}}")
    assert not bad, bad


# ------------------------------------------------------------------------------------- our checkpoints
def test_plain_value_turns_hyper_parameters_into_weights_only_safe_values():
    # dataclass → dict of fields (nested too); function → dotted name; tensors and plain values stay
    config = PolicyConfig("some/model", dtype="float32", lora=LoRASettings(r=4, alpha=8))
    out = plain_value({"policy": config, "optimizer": default_optimizer, "beta": 0.01, "tasks": ("a", "b"),
                       "w": torch.ones(2), "none": None, "dir": Path("/data/x")})
    assert out["policy"]["name_or_path"] == "some/model"
    assert out["policy"]["lora"] == dataclasses.asdict(LoRASettings(r=4, alpha=8))
    assert out["optimizer"] == "lightning_modules.common.default_optimizer"
    assert out["beta"] == 0.01 and out["tasks"] == ["a", "b"] and out["none"] is None
    assert torch.equal(out["w"], torch.ones(2)) and out["dir"] == "/data/x"
    assert plain_value(object()).startswith("<object object at")


def test_module_checkpoint_loads_with_weights_only(tiny_ckpt, tmp_path):
    from datamodules.datamodule import RadVLMDataModule
    from lightning_modules.sft import SFTModule

    path = write_records(tmp_path, [report_record(i) for i in range(2)])
    module = SFTModule(PolicyConfig(str(tiny_ckpt), dtype="float32", lora=LoRASettings(r=2, alpha=4)))
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(path)], batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True, map_location="cpu")  # raises on any object
    assert ckpt["hyper_parameters"]["policy"]["lora"]["r"] == 2
    assert ckpt["hyper_parameters"]["optimizer"] == "lightning_modules.common.default_optimizer"
    assert ckpt["datamodule_hyper_parameters"]["train_files"] == [str(path)]
    assert ckpt["global_step"] == 1 and "optimizer_states" in ckpt and "radvlm" in ckpt


# ------------------------------------------------------------------------------------------------ the CLI
def cli_args(tiny_ckpt, tmp_path, *extra: str) -> list[str]:
    data = write_records(tmp_path, [report_record(i) for i in range(4)])
    return ["fit", "--model", "lightning_modules.sft.SFTModule",
            "--model.policy.name_or_path", str(tiny_ckpt), "--model.policy.dtype", "float32",
            "--data", "datamodules.datamodule.RadVLMDataModule",
            "--data.train_files", f"[{data}]", "--data.batch_size", "2", "--trainer.accelerator", "cpu",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.limit_val_batches", "0", "--seed_everything", "0", *extra]


def record_fit(monkeypatch) -> dict:
    """Replace ``Trainer.fit`` by one that records its arguments (same signature: the CLI reads it)."""
    seen: dict = {}

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None,
            weights_only=None):
        seen.update(model=model, ckpt_path=ckpt_path, weights_only=weights_only)

    monkeypatch.setattr(L.Trainer, "fit", fit)
    return seen


@pytest.mark.parametrize("extra, expected", [((), True), (("--weights_only", "false"), False)])
def test_cli_passes_weights_only_true_unless_told_otherwise(tiny_ckpt, tmp_path, monkeypatch, extra,
                                                            expected):
    seen = record_fit(monkeypatch)
    cli = cli_main.main(cli_args(tiny_ckpt, tmp_path, *extra))
    assert seen["weights_only"] is expected
    assert cli.config.fit.weights_only is expected  # also what the saved config.yaml records
    # the default optimizer reaches the module as a function, not as its import path string
    assert seen["model"].optimizer_factory is default_optimizer


def test_cli_reads_configuration_only_from_what_it_is_given(tiny_ckpt, tmp_path, monkeypatch):
    record_fit(monkeypatch)
    monkeypatch.setenv("PL_FIT__TRAINER__MAX_STEPS", "7")  # environment parsing is off: ignored
    cli = cli_main.main(cli_args(tiny_ckpt, tmp_path))
    fit_parser = cli.parser._subcommands_action._name_parser_map["fit"]
    for parser in (cli.parser, fit_parser):
        assert parser.default_config_files == [] and parser.default_env is False
    assert cli.config.fit.trainer.max_steps == -1


def test_cli_resume_from_its_own_checkpoint_loads_weights_only(tiny_ckpt, tmp_path, monkeypatch):
    cli_main.main(cli_args(tiny_ckpt, tmp_path, "--trainer.max_steps", "1"))
    (ckpt,) = tmp_path.rglob("*.ckpt")
    real_load = torch.load
    modes = []

    def spy(*args, **kwargs):
        modes.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    cli = cli_main.main(cli_args(tiny_ckpt, tmp_path / "again", "--trainer.max_steps", "2",
                                 "--ckpt_path", str(ckpt)))
    # the restore (and, through AtomicCheckpointIO, nothing else: the CLI no longer peeks at the hyper-parameters)
    assert len(modes) >= 1 and all(m is True for m in modes)
    assert cli.trainer.global_step == 2
