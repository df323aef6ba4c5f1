"""Every YAML under configs/ must parse: the main.py configs through the real CLI (``--print_config`` validates
all types), the metrics configs of ``radvlm.tools.evaluate`` (configs/eval_metrics/) through its loader."""

from pathlib import Path

import pytest
import yaml

import main

ROOT = Path(__file__).resolve().parent.parent
METRICS_CONFIGS = sorted(ROOT.joinpath("configs", "eval_metrics").rglob("*.yaml"))
CONFIGS = sorted(set(ROOT.joinpath("configs").rglob("*.yaml")) - set(METRICS_CONFIGS))


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


@pytest.mark.parametrize("path", METRICS_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_metrics_config_parses_with_the_evaluation_loader(path):
    from radvlm.tools.eval_metrics import MODEL_METRICS, load_config

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
    assert (args["eps_low"], args["eps_high"], args["dual_clip"], args["beta"]) == (0.2, 0.28, 3.0, 0.01)
    assert args["optimizer"]["init_args"]["lr"] == 1.0e-6
    assert args["loss_agg"] == "token-mean" and args["temperature"] == 1.0
    world = cfg["trainer"]["devices"] * cfg["trainer"]["num_nodes"]
    assert cfg["data"]["init_args"]["batch_size"] * world == 512
    assert 512 // args["ppo_mini_batch_size"] == 4


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
