"""Every path of a run follows ``--trainer.default_root_dir`` (issue 26): checkpoints, TensorBoard logs and the
export of the demo configs land under the run's own folder, ``--ckpt_path last`` finds only that folder's
checkpoints and says when they were trained on other data, and ``--trainer.callbacks.init_args.dirpath`` reaches
the GRPO configs' ModelCheckpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from jsonargparse import Namespace

import main
from tests.helpers import report_record, write_records


def test_follow_root_replaces_the_placeholder_in_every_string():
    config = Namespace(trainer=Namespace(logger=Namespace(init_args=Namespace(save_dir="{default_root_dir}")),
                                         callbacks=[Namespace(init_args=Namespace(
                                             dirpath="{default_root_dir}/checkpoints", filename="{epoch}-{step}"))]),
                       model=Namespace(init_args=Namespace(export_dir="{default_root_dir}/hf_export", lr=0.5,
                                                           extra={"out": ["{default_root_dir}/a", "b"]})))
    assert main.follow_root(config, "OUT") is config
    assert config.trainer.logger.init_args.save_dir == "OUT"
    assert config.trainer.callbacks[0].init_args.dirpath == "OUT/checkpoints"
    assert config.trainer.callbacks[0].init_args.filename == "{epoch}-{step}"  # Lightning's own templates stay
    assert config.model.init_args.export_dir == "OUT/hf_export" and config.model.init_args.lr == 0.5
    assert config.model.init_args.extra == {"out": ["OUT/a", "b"]}


@pytest.mark.parametrize("name", ["sft.yaml", "coldstart.yaml", "grpo.yaml", "grpo_thinking.yaml"])
def test_no_demo_config_hard_codes_an_output_path(name):
    config = yaml.safe_load((main.CONFIG_DIR / "demo" / name).read_text())
    trainer = config["trainer"]
    assert trainer["logger"]["init_args"]["save_dir"] == "{default_root_dir}"
    checkpoint = trainer["callbacks"][-1]  # last: --trainer.callbacks.init_args.dirpath X reaches it
    assert checkpoint["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"
    assert checkpoint["init_args"]["dirpath"] == "{default_root_dir}/checkpoints"
    assert config["model"]["init_args"]["export_dir"] == "{default_root_dir}/hf_export"


def test_the_checkpoint_folder_of_a_grpo_config_is_set_from_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main.main(args=["fit", "--config", "configs/demo/grpo.yaml", "--trainer.callbacks.init_args.dirpath",
                        str(tmp_path / "ckpts"), "--print_config"])
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    checkpoint = [c for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    assert len(checkpoint) == 1 and checkpoint[0]["init_args"]["dirpath"] == str(tmp_path / "ckpts")
    assert checkpoint[0]["init_args"]["every_n_train_steps"] == 20  # the rest of the config's callback kept


def demo_sft(tiny_ckpt, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", "configs/demo/sft.yaml", "--model.init_args.policy.name_or_path", str(tiny_ckpt),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
            "--data.init_args.batch_size", "2",
            "--data.init_args.num_workers", "0", "--model.init_args.num_generation_samples", "0",
            "--model.init_args.lr_scheduler", "null", "--trainer.callbacks.init_args.every_n_train_steps", "1",
            *extra]


def test_default_root_dir_puts_checkpoints_logs_and_the_export_under_it(tiny_ckpt, phantom_dir, tmp_path):
    root = tmp_path / "OUT"
    cli = main.main(args=demo_sft(tiny_ckpt, root, "--data.init_args.phantom_dir", str(phantom_dir)))
    assert cli.trainer.global_step == 2
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert cli.trainer.logger.log_dir == str(root / "version_0") and any((root / "version_0").glob("events.*"))
    assert (root / "hf_export" / "config.json").is_file()
    saved = yaml.safe_load((root / "version_0" / "config.yaml").read_text())  # the saved config: real paths
    assert saved["model"]["init_args"]["export_dir"] == str(root / "hf_export")
    assert "{default_root_dir}" not in json.dumps(saved)


def test_resuming_a_checkpoint_trained_on_other_data_says_so(tiny_ckpt, tmp_path, caplog):
    first = write_records(tmp_path / "first", [report_record(i) for i in range(4)], name="first.json")
    second = write_records(tmp_path / "second", [report_record(i) for i in range(4)], name="second.json")
    root = tmp_path / "run"

    def run(files: Path, *extra: str):
        return main.main(args=demo_sft(tiny_ckpt, root, "--data.init_args.phantom_dir", "null",
                                       "--data.init_args.train_files", f"[{files}]", "--model.init_args.export_dir",
                                       "null", *extra))

    run(first)
    with caplog.at_level(logging.WARNING, logger="lightning_modules.common"):
        cli = run(second, "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert cli.trainer.global_step == 3
    assert "trained on other data than this run's" in caplog.text
    assert f"train_files: ['{first}'] → ['{second}']" in caplog.text  # in full, not shortened


def test_a_resumed_run_continues_its_tensorboard_version(tiny_ckpt, phantom_dir, tmp_path, caplog):
    """The resumed fit logs on in version_0 (Lightning started version_1: the curves split in two runs)."""
    root = tmp_path / "run"
    args = demo_sft(tiny_ckpt, root, "--data.init_args.phantom_dir", str(phantom_dir), "--model.init_args.export_dir",
                    "null", "--trainer.log_every_n_steps", "1")
    main.main(args=args)
    with caplog.at_level(logging.INFO, logger="main"):
        cli = main.main(args=[*args, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 4 and cli.trainer.logger.version == 0
    assert sorted(p.name for p in root.glob("version_*")) == ["version_0"]
    assert f"logging on in {root / 'version_0'}" in caplog.text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = {e.step for e in EventAccumulator(str(root / "version_0")).Reload().Scalars("train/grad_norm")}
    assert steps == {0, 1, 2, 3}  # Lightning logs batch n at step n−1: both runs' batches on one curve


def test_a_run_that_fails_before_logging_leaves_no_version(tiny_ckpt, phantom_dir, tmp_path):
    root = tmp_path / "run"
    (root / "version_0").mkdir(parents=True)
    (root / "version_0" / "config.yaml").write_text("an earlier run's")  # not this run's: kept
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_text("another run's model")
    with pytest.raises(FileExistsError, match="already holds files"):  # at on_fit_start: config.yaml was written
        main.main(args=demo_sft(tiny_ckpt, root, "--data.init_args.phantom_dir", str(phantom_dir),
                                "--model.init_args.export_dir", str(export)))
    assert sorted(p.name for p in root.iterdir()) == ["version_0"]
    assert (root / "version_0" / "config.yaml").read_text() == "an earlier run's"


def test_remove_unused_log_dir_removes_only_versions_without_values(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    empty, used, with_ckpt = tmp_path / "version_0", tmp_path / "version_1", tmp_path / "version_2"
    for folder in (empty, used, with_ckpt):
        SummaryWriter(str(folder)).close()  # an event file with its header only
        (folder / "config.yaml").write_text("seed_everything: 0\n")
    with SummaryWriter(str(used)) as writer:
        writer.add_scalar("train/loss", 1.5, 0)
    (with_ckpt / "checkpoints").mkdir()
    (with_ckpt / "checkpoints" / "last.ckpt").write_bytes(b"PK")
    assert [main.remove_unused_log_dir(f) for f in (empty, used, with_ckpt)] == [True, False, False]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_1", "version_2"]


def test_resumed_log_version_reads_the_saved_position_or_lightnings_layout(tmp_path):
    from lightning_modules.resume import resumed_log_version

    saved = {"root": "/runs/sft", "version": 3}
    assert resumed_log_version(saved, tmp_path / "checkpoints" / "last.ckpt") == saved
    layout = tmp_path / "sft" / "version_7" / "checkpoints" / "epoch=0-step=2.ckpt"
    assert resumed_log_version(None, layout) == {"root": str(tmp_path / "sft"), "version": 7}
    assert resumed_log_version({}, tmp_path / "checkpoints" / "last.ckpt") is None  # no position: a new version
    assert resumed_log_version(None, tmp_path / "version_x" / "checkpoints" / "a.ckpt") is None


@pytest.mark.parametrize("first, grpo", [("sft", "grpo"), ("coldstart", "grpo_thinking")])
def test_the_demo_stages_chain_through_their_exports(first, grpo):
    """``make demo``: GRPO starts from the first stage's export, ``{default_root_dir}/hf_export`` of its run."""
    def load(name: str) -> dict:
        return yaml.safe_load((main.CONFIG_DIR / "demo" / f"{name}.yaml").read_text())

    first_root = load(first)["trainer"]["default_root_dir"]
    assert first_root == f"runs/demo/{first}"
    assert load(grpo)["model"]["init_args"]["policy"]["name_or_path"] == f"{first_root}/hf_export"
    assert load(grpo)["trainer"]["default_root_dir"] == f"runs/demo/{grpo}"  # demo.py predicts with its export
