"""Every YAML under configs/ must parse: the main.py configs through the real CLI (``--print_config`` validates
all types), the metrics configs of ``radvlm_tools.evaluate`` (configs/eval_metrics/) through its loader."""

import re
from pathlib import Path

import pytest
import yaml

import main

ROOT = Path(__file__).resolve().parent.parent
METRICS_CONFIGS = sorted(ROOT.joinpath("configs", "eval_metrics").rglob("*.yaml"))
# ablation variants are overlays of configs/demo/grpo.yaml (python -m radvlm_tools.ablation)
ABLATION_CONFIGS = sorted(ROOT.joinpath("configs", "demo", "ablation").glob("*.yaml"))
CONFIGS = sorted(set(ROOT.joinpath("configs").rglob("*.yaml")) - set(METRICS_CONFIGS) - set(ABLATION_CONFIGS))


def subcommand(path: Path) -> str:
    return "predict" if ("predict" in path.stem or path.stem.startswith("eval_")) else "fit"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_parses_with_print_config(path, capsys):
    with pytest.raises(SystemExit) as done:
        main.main(args=[subcommand(path), "--config", str(path), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("lightning_modules.")
    assert printed["data"]["class_path"] == "datamodules.datamodule.RadVLMDataModule"


@pytest.mark.parametrize("path", ABLATION_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_ablation_variant_parses_over_the_demo_grpo_config(path, capsys):
    base = ROOT / "configs" / "demo" / "grpo.yaml"
    with pytest.raises(SystemExit) as done:
        main.main(args=["fit", "--config", str(base), "--config", str(path), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lightning_modules.grpo.GRPOModule"
    overlay = yaml.safe_load(path.read_text())["model"]["init_args"]
    for key, value in overlay.items():  # what the variant sets is what the run gets
        got = printed["model"]["init_args"][key]
        if isinstance(value, dict) and "class_path" in value:  # an injected object: its class and given arguments
            assert got["class_path"] == value["class_path"], key
            assert {k: got["init_args"][k] for k in value.get("init_args", {})} == value.get("init_args", {}), key
        elif isinstance(value, dict):  # an option group: the values it gives (the rest are defaults)
            assert {k: got[k] for k in value} == value, key
        elif isinstance(value, list):  # a list replaces the base's: the same entries, by class
            assert [g["class_path"] for g in got] == [v["class_path"] for v in value], key
        else:
            assert got == value, key


@pytest.mark.parametrize("path", METRICS_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_metrics_config_parses_with_the_evaluation_loader(path):
    from radvlm_tools.eval_metrics import MODEL_METRICS, load_config

    cfg = load_config(path)
    assert any(cfg[name] is not None for name in MODEL_METRICS)


def test_there_are_real_and_demo_configs():
    names = {str(p.relative_to(ROOT)) for p in CONFIGS}
    for needed in ("configs/sft.yaml", "configs/coldstart.yaml", "configs/grpo_report.yaml",
                   "configs/grpo_grounding.yaml", "configs/grpo_joint.yaml", "configs/demo/sft.yaml",
                   "configs/demo/grpo.yaml"):
        assert needed in names


def test_real_grpo_config_has_the_paper_settings():
    cfg = yaml.safe_load((ROOT / "configs/grpo_report.yaml").read_text())
    args = cfg["model"]["init_args"]
    assert args["num_generations"] == 8
    loss = args["loss"]
    assert loss["class_path"] == "radvlm.objectives.GRPOLoss"
    assert (loss["init_args"]["eps_low"], loss["init_args"]["eps_high"], loss["init_args"]["dual_clip"]) == (0.2, 0.28, 3.0)
    assert loss["init_args"]["agg"] == "token-mean" and loss["init_args"]["entropy_coeff"] == 0.0
    assert args["advantage"] == {"class_path": "radvlm.objectives.GroupNormalization", "init_args": {"scale": "group"}}
    assert args["beta"] == 0.01
    assert args["optimizer"]["init_args"]["lr"] == 1.0e-6
    assert args["temperature"] == 1.0
    world = cfg["trainer"]["devices"] * cfg["trainer"]["num_nodes"]
    assert cfg["data"]["init_args"]["batch_size"] * world == 512
    assert 512 // args["ppo_mini_batch_size"] == 4


def objective_examples() -> list[dict]:
    """The YAML blocks of docs/objectives.md that configure the module (loss / advantage / rewards entries)."""
    text = (ROOT / "docs" / "objectives.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "..." not in b]
    return [b for b in blocks if isinstance(b, dict) and "model" not in b]


def test_docs_have_one_objective_example_per_variant():
    paths = [b["loss"]["class_path"].rsplit(".", 1)[1] for b in objective_examples() if "loss" in b]
    assert {"GRPOLoss", "GSPOLoss", "CISPOLoss", "SAPOLoss"} <= set(paths)
    assert any(b.get("advantage", {}).get("class_path", "").endswith("PerTermNormalization") for b in objective_examples())


@pytest.mark.parametrize("index", range(len(objective_examples())))
def test_docs_objective_example_parses_in_the_demo_config(index, tmp_path, capsys):
    block = objective_examples()[index]
    cfg = yaml.safe_load((ROOT / "configs/demo/grpo.yaml").read_text())
    args = cfg["model"]["init_args"]
    for key in ("loss", "advantage"):
        if key in block:
            args[key] = block[key]
    args["rewards"] = list(args["rewards"]) + list(block.get("rewards", []))
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as done:
        main.main(args=["fit", "--config", str(path), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    for key in ("loss", "advantage"):
        if key in block:
            assert printed[key]["class_path"] == block[key]["class_path"]
            assert {k: printed[key]["init_args"][k] for k in block[key]["init_args"]} == block[key]["init_args"]


def test_dynamic_sampling_is_an_option_group_off_in_the_real_configs(capsys):
    for name in ("grpo_report", "grpo_grounding", "grpo_joint"):
        cfg = yaml.safe_load((ROOT / f"configs/{name}.yaml").read_text())
        assert cfg["model"]["init_args"]["dynamic_sampling"] is None  # off: the paper's GRPO
    with pytest.raises(SystemExit) as done:
        main.main(args=["fit", "--config", str(ROOT / "configs/grpo_grounding.yaml"), "--print_config",
                        "--model.init_args.dynamic_sampling", "{outcome: soft_f1, min_std: 0.1, max_gen_batches: 4}"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["dynamic_sampling"]
    assert printed == {"outcome": "soft_f1", "min_std": 0.1, "max_gen_batches": 4, "max_carried": None,
                       "batch_groups": None}
