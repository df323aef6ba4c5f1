"""The real configs' precisions through ``main.py`` on CPU with the tiny checkpoint.

The real training configs (``configs/{sft,coldstart,grpo_*}.yaml``) fit in ``bf16-mixed`` with
``policy.dtype: bfloat16``: float32 master weights (what AdamW updates and keeps state for), bf16 compute
(autocast here, FSDP2's ``MixedPrecisionPolicy`` on many GPUs); the evaluation configs predict in ``bf16-true``.
Here each stage runs a few steps through the CLI in those precisions: SFT (full and LoRA), the thinking cold
start, GRPO (full fine-tune with a frozen bf16 reference, LoRA with the adapters-off reference, joint rewards
with a model-based metric), validation, ``predict`` and ``test``. The runs must finish with weights that
changed and are finite, trainable weights must be float32, and every tensor of the RL math (rewards,
advantages, log-probs, loss terms) must be float32. ``bf16-true`` given to a fit is turned into
``bf16-mixed`` unless ``policy.master_dtype`` asks for bf16 weights.

Tolerance against float32: the same weights and batch give an SFT loss within 2 % and GRPO log-probs within
0.1 nats on average of a float32 run (measured here: 0.1–0.3 % and ~0.02 nats).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import main
import radvlm.grpo as grpo_math
from lightning_modules import grpo_rewards
from radvlm import objectives

ROOT = Path(__file__).resolve().parent.parent
TRAIN_CONFIGS = ("sft.yaml", "coldstart.yaml", "grpo_report.yaml", "grpo_grounding.yaml", "grpo_joint.yaml")
EVAL_CONFIGS = ("eval_mimic_reports.yaml", "eval_vindr.yaml")


def real_precision(names) -> str:
    """The precision every config of ``names`` uses (they must agree)."""
    found = {yaml.safe_load((ROOT / "configs" / name).read_text())["trainer"]["precision"] for name in names}
    assert len(found) == 1, f"real configs disagree on precision: {found}"
    return found.pop()


PRECISION = real_precision(TRAIN_CONFIGS)  # fit
EVAL_PRECISION = real_precision(EVAL_CONFIGS)  # validate / test / predict


def test_real_configs_train_over_float32_master_weights_and_predict_in_bf16():
    assert PRECISION == "bf16-mixed" and EVAL_PRECISION == "bf16-true"
    for name in TRAIN_CONFIGS:
        policy = yaml.safe_load((ROOT / "configs" / name).read_text())["model"]["init_args"]["policy"]
        assert (policy["dtype"], policy["master_dtype"]) == ("bfloat16", "float32"), name


def assert_master_float32(policy) -> None:
    """Trainable weights float32, frozen ones bfloat16, forward passes in bfloat16."""
    assert policy.compute_dtype == torch.bfloat16
    dtypes = {(p.requires_grad, p.dtype) for p in policy.parameters()}
    assert {d for trainable, d in dtypes if trainable} == {torch.float32}, dtypes
    assert {d for trainable, d in dtypes if not trainable} <= {torch.bfloat16}, dtypes


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def assert_trained(start: Path, export: Path) -> None:
    """The export loads, every weight is finite and some weights moved away from the start checkpoint."""
    before, after = weights(start), weights(export)
    assert after, f"no weights exported to {export}"
    assert not any("lora" in k for k in after), "LoRA adapters must be merged into the export"
    assert all(bool(torch.isfinite(v.float()).all()) for v in after.values())
    changed = [k for k, v in after.items() if k in before and not torch.equal(v.float(), before[k].float())]
    assert changed, "no weight changed"


def run(*args: str):
    cli = main.main(args=list(args))
    return cli.trainer


def common(tmp_path: Path, tiny_ckpt: Path, phantom_dir: Path, precision: str = PRECISION) -> list[str]:
    dtype = "bfloat16" if precision.startswith("bf16") else "float32"
    return [
        "--trainer.precision", precision, "--model.init_args.policy.dtype", dtype,
        "--model.init_args.policy.name_or_path", str(tiny_ckpt),
        "--data.init_args.phantom_dir", str(phantom_dir),
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.init_args.num_workers", "0",
    ]


def sft_args(tmp_path, tiny_ckpt, phantom_dir, config="configs/demo/sft.yaml", steps=3, precision=PRECISION):
    return ["fit", "--config", config, *common(tmp_path, tiny_ckpt, phantom_dir, precision),
            "--trainer.callbacks", "null", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps), "--trainer.limit_val_batches", "1",
            "--model.init_args.lr_scheduler.init_args.total_steps", str(steps),
            "--model.init_args.max_new_tokens", "6", "--model.init_args.num_generation_samples", "2",
            "--data.init_args.batch_size", "4", "--data.init_args.eval_batch_size", "4",
            "--model.init_args.export_dir", str(tmp_path / "export")]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_runs_in_real_precision_and_trains(tiny_ckpt, phantom_dir, tmp_path, lora):
    args = sft_args(tmp_path, tiny_ckpt, phantom_dir)
    if lora:
        args += ["--model.init_args.policy.lora", "{r: 4, alpha: 8, dropout: 0.0}"]
    trainer = run(*args)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss_step"])
    assert_master_float32(trainer.lightning_module.policy)
    assert_trained(tiny_ckpt, tmp_path / "export")


def test_bf16_true_fit_keeps_float32_master_weights_unless_asked(tiny_ckpt, phantom_dir, tmp_path, caplog):
    """``bf16-true`` would cast the master weights to bf16: a fit uses ``bf16-mixed`` instead (warned), unless
    ``master_dtype: bfloat16`` asks for bf16 weights (then they are bf16, also warned)."""
    trainer = run(*sft_args(tmp_path / "default", tiny_ckpt, phantom_dir, steps=1, precision="bf16-true"))
    assert trainer.precision == "bf16-mixed" and "using precision=bf16-mixed instead" in caplog.text
    assert_master_float32(trainer.lightning_module.policy)
    caplog.clear()
    trainer = run(*sft_args(tmp_path / "asked", tiny_ckpt, phantom_dir, steps=1, precision="bf16-true"),
                  "--model.init_args.policy.master_dtype", "bfloat16")
    assert trainer.precision == "bf16-true" and "training bfloat16 master weights" in caplog.text
    assert {p.dtype for p in trainer.lightning_module.policy.parameters()} == {torch.bfloat16}


def test_cold_start_runs_in_real_precision(tiny_ckpt, phantom_dir, tmp_path):
    trainer = run(*sft_args(tmp_path, tiny_ckpt, phantom_dir, config="configs/demo/coldstart.yaml", steps=2))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["val/loss"])
    assert_trained(tiny_ckpt, tmp_path / "export")


def test_sft_loss_in_real_precision_matches_float32(tiny_ckpt, phantom_dir, tmp_path):
    """The same weights and validation batches: bf16 loss within 2 % of the float32 loss."""
    losses = {}
    for precision in ("32-true", PRECISION):
        args = sft_args(tmp_path / precision, tiny_ckpt, phantom_dir, precision=precision)
        args[0] = "validate"
        args = [a for a in args if not a.startswith("--model.init_args.export_dir")]
        args = args[: args.index("--trainer.max_steps")] + ["--trainer.limit_val_batches", "2"]
        losses[precision] = float(run(*args).callback_metrics["val/loss"])
    ref, low = losses["32-true"], losses[PRECISION]
    assert abs(low - ref) / ref < 0.02, losses


class DtypeSpy:
    """Records the dtype of every tensor entering or leaving the GRPO math during a run."""

    def __init__(self, monkeypatch) -> None:
        self.seen: dict[str, set[torch.dtype]] = {}
        for name in ("group_advantages", "group_reward_std", "kl_k3", "aggregate"):
            monkeypatch.setattr(grpo_math, name, self.wrap(name, getattr(grpo_math, name)))
        # the configured policy loss (radvlm.objectives) and advantage estimator: every call of either
        monkeypatch.setattr(objectives.PolicyLoss, "__call__", self.wrap("policy_loss", objectives.PolicyLoss.__call__))
        monkeypatch.setattr(objectives.GroupNormalization, "__call__",
                            self.wrap("advantage", objectives.GroupNormalization.__call__))
        monkeypatch.setattr(grpo_rewards, "compute_rewards", self.wrap("compute_rewards", grpo_rewards.compute_rewards))

    def note(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            self.seen.setdefault(name, set()).add(value.dtype)
        elif isinstance(value, (tuple, list)):
            for v in value:
                self.note(name, v)
        elif isinstance(value, dict):
            for v in value.values():
                self.note(name, v)
        elif hasattr(value, "total"):  # RewardResult
            self.note(name, value.total)
            self.note(name, value.values)

    def wrap(self, name, fn):
        def spied(*args, **kwargs):
            out = fn(*args, **kwargs)
            for value in (*args, *kwargs.values(), out):
                self.note(name, value)
            return out

        return spied


def grpo_args(tmp_path, tiny_ckpt, phantom_dir, steps=2):
    return ["fit", "--config", "configs/demo/grpo.yaml", *common(tmp_path, tiny_ckpt, phantom_dir),
            "--trainer.callbacks", "null", "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "1",
            "--trainer.limit_val_batches", "1", "--model.init_args.max_new_tokens", "12",
            "--model.init_args.num_generations", "4", "--model.init_args.ppo_mini_batch_size", "1",
            "--data.init_args.batch_size", "2", "--data.init_args.eval_batch_size", "2",
            "--model.init_args.export_dir", str(tmp_path / "export")]


def assert_rl_math_float32(spy: DtypeSpy) -> None:
    for name in ("compute_rewards", "group_advantages", "advantage", "policy_loss", "kl_k3", "aggregate"):
        assert spy.seen.get(name) == {torch.float32}, f"{name}: {spy.seen.get(name)}"


@pytest.mark.parametrize("lora", [False, True], ids=["full-frozen-reference", "lora-adapters-off-reference"])
def test_grpo_runs_in_real_precision_with_float32_rl_math(tiny_ckpt, phantom_dir, tmp_path, monkeypatch, lora):
    spy = DtypeSpy(monkeypatch)
    args = grpo_args(tmp_path, tiny_ckpt, phantom_dir)
    if lora:
        args += ["--model.init_args.policy.lora", "{r: 4, alpha: 8, dropout: 0.0}"]
    trainer = run(*args)
    module = trainer.lightning_module
    assert trainer.global_step == 2  # one rollout batch of 2 prompts, 1 prompt per update: 2 optimizer steps
    assert (module.reference_model is None) == lora
    assert_master_float32(module.policy)
    if not lora:  # nothing updates the reference: no float32 copy of it
        assert {p.dtype for p in module.reference_model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(trainer.callback_metrics["train/kl"])
    assert "val/soft_f1" in trainer.callback_metrics
    assert_rl_math_float32(spy)
    assert_trained(tiny_ckpt, tmp_path / "export")


JOINT = """
model:
  init_args:
    rewards:
      - class_path: radvlm.rewards.RewardTerm
        init_args:
          metric: {class_path: metrics.grounding.SoftF1}
          tasks: [abnormality_grounding]
          name: soft_f1
      - class_path: radvlm.rewards.RewardTerm
        init_args:
          metric:
            class_path: metrics.bertscore.BERTScore
            init_args: {model_type: BERT_DIR, num_layers: 2, device: cpu, strict: true}
          tasks: [report_generation]
          name: bertscore
    val_metrics: []
data:
  init_args:
    tasks: [report_generation, abnormality_grounding]
"""


def test_grpo_joint_rewards_with_a_model_based_metric_in_real_precision(tiny_ckpt, phantom_dir, bert_dir, tmp_path,
                                                                     monkeypatch):
    spy = DtypeSpy(monkeypatch)
    joint = tmp_path / "joint.yaml"
    joint.write_text(JOINT.replace("BERT_DIR", str(bert_dir)))
    args = grpo_args(tmp_path, tiny_ckpt, phantom_dir)
    args[3:3] = ["--config", str(joint)]
    args += ["--data.init_args.batch_size", "4", "--model.init_args.ppo_mini_batch_size", "2"]
    trainer = run(*args)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/reward/bertscore"])
    assert float(metrics["train/reward_failed/bertscore"]) == 0 and float(metrics["train/reward_failed/soft_f1"]) == 0
    assert float(metrics["train/reward_unavailable_frac"]) == 0.0
    assert torch.isfinite(metrics["val/bertscore"])
    assert_rl_math_float32(spy)


def test_grpo_logprobs_in_bf16_match_float32(tiny_ckpt, phantom_dir):
    """Same rollout batch, bf16 vs float32 policy: per-token log-probs within 0.1 nats on average."""
    from datamodules.collate import PromptCollator
    from datamodules.datamodule import RadVLMDataModule
    from radvlm.policy import PolicyConfig
    from radvlm.rollout import HFEngine, Sampling

    data = RadVLMDataModule(str(tiny_ckpt), phantom_dir=str(phantom_dir), collator=PromptCollator, batch_size=2,
                            tasks=["abnormality_grounding"], num_workers=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    policies = {d: PolicyConfig(str(tiny_ckpt), dtype=d).build() for d in ("float32", "bfloat16")}
    torch.manual_seed(0)
    gen = HFEngine().generate(policies["float32"], batch, Sampling(num_generations=2, max_new_tokens=12))
    rollout = gen.model_batch()
    mask = gen.completion_mask
    out = {}
    for dtype, policy in policies.items():
        with torch.no_grad():
            out[dtype] = policy.token_logprobs(rollout, mask)
        assert out[dtype].dtype == torch.float32  # the log-softmax runs in float32 for any model dtype
    gap = (out["bfloat16"] - out["float32"]).abs()[mask.bool()].mean()
    assert float(gap) < 0.1, float(gap)


def test_validate_test_and_predict_in_bf16_true(tiny_ckpt, phantom_dir, tmp_path):
    base = common(tmp_path, tiny_ckpt, phantom_dir, precision=EVAL_PRECISION)
    grpo = ["--config", "configs/demo/grpo.yaml", *base, "--trainer.callbacks", "null",
            "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
            "--model.init_args.val_max_new_tokens", "8", "--data.init_args.eval_batch_size", "2"]
    assert "val/soft_f1" in run("validate", *grpo).callback_metrics
    assert "test/soft_f1" in run("test", *grpo).callback_metrics
    out = tmp_path / "pred.jsonl"
    run("predict", "--config", "configs/demo/predict.yaml", *base, "--trainer.limit_predict_batches", "1",
        "--trainer.callbacks.init_args.output", str(out), "--model.init_args.max_new_tokens", "6",
        "--data.init_args.eval_batch_size", "2")
    header, *rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "radvlm_prediction_header" in header
    assert len(rows) == 2 and all(1 <= r["completion_tokens"] <= 6 for r in rows)
