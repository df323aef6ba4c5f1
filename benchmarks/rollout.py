"""Rollout throughput: completion tokens/s of the rollout engines for several batch sizes (plain, shared, fast, vLLM).

``python -m benchmarks.rollout [--size small] [--batch-sizes 1 2 4] [--g 8] [--max-new-tokens 100]
[--modes plain shared fast] [--lora 16]``

Each row samples ``G`` completions for each of ``B`` report prompts with one image each, from the same seed in
every mode (rollout engine, ``make_engine``), and prints tokens/s beside the decode memory-bandwidth bound
(method, timing and the two "same samples" checks: ``run`` and ``greedy_check``). Results go to
``benchmarks/results/rollout.json``.

Deviations from the paper's setup: random noise images and randomly initialised Qwen3-VL weights of the real
shapes (``--size``, ``build_policy``; ``--model PATH`` loads a checkpoint instead), with the tiny checkpoint's
tokenizer and image processor.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: the repo root, not benchmarks/, must be importable
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch


def _mrope(section: list[int]) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": section, "mrope_interleaved": True}


def _text(hidden: int, mlp: int, layers: int, heads: int, kv: int, head_dim: int, section: list[int],
          vocab: int | None = None) -> dict[str, Any]:
    out = {"hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": head_dim, "rope_parameters": _mrope(section)}
    if vocab is not None:
        out.update(vocab_size=vocab, max_position_embeddings=262144)
    return out


def _vision(depth: int, hidden: int, mlp: int, heads: int, out: int, deepstack: list[int]) -> dict[str, Any]:
    return {"depth": depth, "hidden_size": hidden, "intermediate_size": mlp, "num_heads": heads,
            "out_hidden_size": out, "num_position_embeddings": 2304, "deepstack_visual_indexes": deepstack}


#: model shapes; ``text``/``vision`` override the tiny checkpoint's config. 8B: hidden 4096, 36 layers, 32
#: heads (8 KV), head_dim 128, MLP 12288, untied head; vision 27 blocks × 1152 (transformers' Qwen3-VL
#: vision defaults), merged into 4096, deepstack after blocks 8/16/24. 2B: hidden 2048, 28 layers, 16 heads
#: (8 KV), MLP 6144, tied head; vision 24 × 1024 into 2048, deepstack 5/11/17.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"text": {}, "vision": {}, "tie": False},
    "small": {"text": _text(512, 1024, 4, 16, 4, 32, [6, 5, 5]),
              "vision": _vision(4, 256, 512, 4, 512, [1, 2]), "tie": False},
    "2b": {"text": _text(2048, 6144, 28, 16, 8, 128, [24, 20, 20], vocab=151936),
           "vision": _vision(24, 1024, 4096, 16, 2048, [5, 11, 17]), "tie": True},
    "8b": {"text": _text(4096, 12288, 36, 32, 8, 128, [24, 20, 20], vocab=151936),
           "vision": _vision(27, 1152, 4304, 16, 4096, [8, 16, 24]), "tie": False},
}

PROMPTS = (
    "Write a radiology report for this Chest X-ray.",
    "Generate the findings section of the report for this chest radiograph.",
    "Please write a detailed radiology report for this frontal Chest X-ray.",
    "Describe the findings on this Chest X-ray as a radiologist would.",
)
REPORTS = (
    "The heart size is normal. There is a small left pleural effusion. No pneumothorax.",
    "Mild cardiomegaly. Patchy right lower lobe opacity may reflect pneumonia. No effusion.",
    "The lungs are clear. No focal consolidation, pleural effusion or pneumothorax.",
    "Moderate pulmonary edema with bilateral pleural effusions. Enlarged cardiac silhouette.",
)


def write_prompt_records(folder: str | Path, n: int, image_size: int, seed: int = 0,
                         task: str = "report_generation") -> Path:
    """``n`` RadVLM report records (random-noise PNGs of ``image_size``²) as ``folder/prompts.json``."""
    from PIL import Image

    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        path = folder / "img" / f"{image_size}_{i}.png"
        if not path.exists():
            Image.fromarray((rng.random((image_size, image_size)) * 255).astype("uint8")).save(path)
        records.append({"id": f"p{i}", "image": str(path.relative_to(folder)), "task": task, "conversations": [
            {"from": "human", "value": "<image>\n" + PROMPTS[i % len(PROMPTS)]},
            {"from": "gpt", "value": REPORTS[i % len(REPORTS)]},
        ]})
    out = folder / "prompts.json"
    out.write_text(json.dumps(records))
    return out


def tiny_folder(work: Path) -> Path:
    """The tiny checkpoint folder (tokenizer, image processor, tiny weights), written once under ``work``."""
    from radvlm.tiny import write_tiny_checkpoint

    folder = work / "tiny"
    if not (folder / "config.json").exists():
        write_tiny_checkpoint(folder, seed=0)
    return folder


def shaped_config(tiny_dir: Path, size: str):
    """The tiny checkpoint's config (special-token ids of its tokenizer) with the text/vision shape of ``size``."""
    from transformers import AutoConfig, Qwen3VLConfig

    shape = SHAPES[size]
    base = AutoConfig.from_pretrained(str(tiny_dir)).to_dict()
    drop = ("layer_types", "architectures", "transformers_version", "_name_or_path", "dtype")
    text = {k: v for k, v in base["text_config"].items() if k not in drop}
    text.update(shape["text"], tie_word_embeddings=shape["tie"])
    vision = {k: v for k, v in base["vision_config"].items() if k not in drop}
    vision.update(shape["vision"])
    ids = {k: base[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=shape["tie"], **ids)
    config.eos_token_id, config.pad_token_id = base.get("eos_token_id"), base.get("pad_token_id")
    return config


def build_policy(size: str = "tiny", device: str = "cpu", dtype: str = "float32", image_size: int = 672,
                 model_path: str | None = None, work: str | Path | None = None, lora: Any = None,
                 gradient_checkpointing: bool = False, seed: int = 0):
    """A ``Policy`` of the given size (random weights, built on ``device``) or loaded from ``model_path``.

    Sizes (``SHAPES``): ``tiny`` (the test checkpoint: text 128 wide × 2 layers), ``small`` (text 512 × 4
    layers, vision 256 × 4 blocks: a CPU-sized model where the prompt, not Python overhead, costs), ``2b`` and
    ``8b`` (the real Qwen3-VL shapes, random weights, for GPUs). All use the tokenizer and image processor of a
    freshly written tiny checkpoint (no network); with the real 151 936-token vocabulary, ids the tiny
    tokenizer lacks are suppressed so completions decode to text, but the full-vocabulary head is still
    computed every step.
    """
    from radvlm.policy import Policy, resolve_dtype
    from radvlm.processor import load_processor

    pixels = {"min_pixels": 32 * 32, "max_pixels": image_size * image_size}
    if model_path is not None:
        policy = Policy.from_pretrained(model_path, dtype=dtype, lora=lora,
                                        gradient_checkpointing=gradient_checkpointing, **pixels)
        return policy.to(device)
    from transformers import Qwen3VLForConditionalGeneration

    tiny = tiny_folder(Path(work or tempfile.mkdtemp(prefix="radvlm-bench-")))
    config = shaped_config(tiny, size)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=resolve_dtype(dtype),
                                                             attn_implementation="sdpa")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora.peft_config())
    model.train()
    policy = Policy(model, load_processor(tiny, **pixels))
    known = len(policy.tokenizer)
    vocab = config.text_config.vocab_size
    if vocab > known:  # random weights over a vocabulary the tiny tokenizer cannot decode: keep its ids only
        policy.suppress_token_ids = sorted(set(policy.suppress_token_ids) | set(range(known, vocab)))
    return policy


def prompt_batch(policy, records_file: Path, n: int, device: str) -> dict:
    from datamodules.collate import PromptCollator
    from datamodules.records import load_records

    batch = PromptCollator(policy.processor)(load_records(records_file)[:n])
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_engine(mode: str):
    """The rollout engine a benchmark mode names.

    Modes are rollout engines (``radvlm.rollout``): ``plain`` = ``HFEngine()`` (every prompt repeated G times,
    vision tower and prefill G times), ``shared`` = ``HFEngine(shared_prefill=True)`` (vision tower and prefill
    once per prompt, KV cache copied G times), ``fast`` = ``FastHFEngine()`` (shared prefill + LoRA merged for
    the rollout, restored after; its merge/restore cost is inside its time), ``fsdp2`` = ``HFEngine(shared_prefill=
    True)`` on a copy of the policy sharded by FSDP2 over this one process (``sharded_copy``): its time and peak
    memory include gathering the whole weights once per call (``radvlm.sharding.whole_weights``), as on many
    GPUs, where the gather crosses the GPUs; ``vllm`` = ``VLLMEngine()`` (needs vLLM and a GPU).
    """
    from radvlm.fast_engine import FastHFEngine
    from radvlm.rollout import HFEngine

    if mode == "vllm":
        from radvlm.vllm_engine import VLLMEngine

        return VLLMEngine()
    return {"plain": lambda: HFEngine(), "shared": lambda: HFEngine(shared_prefill=True),
            "fsdp2": lambda: HFEngine(shared_prefill=True), "fast": lambda: FastHFEngine()}[mode]()


def sharded_copy(policy, device: str):
    """A copy of ``policy`` sharded with the project's ``shard_policy`` over a one-process mesh (a process group
    of one is started if none exists; ``end_process_group`` ends it)."""
    import copy
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_modules.strategies import shard_policy

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # an explicit address, not MASTER_ADDR/MASTER_PORT: processes started later must not inherit them
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        sharded_copy.started = True
    clone = copy.deepcopy(policy)
    shard_policy(clone, init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (1,)))
    return clone


def end_process_group() -> None:
    """End the process group ``sharded_copy`` started (a test process must not stay "distributed")."""
    import torch.distributed as dist

    if getattr(sharded_copy, "started", False) and dist.is_initialized():
        dist.destroy_process_group()
        sharded_copy.started = False


def time_generate(policy, batch: dict, g: int, max_new_tokens: int, shared: bool | str, seed: int, device: str,
                  temperature: float = 1.0, engine=None) -> tuple[dict, torch.Tensor]:
    """One sampled rollout (``engine``, else ``HFEngine(shared_prefill=shared)``): wall and CPU seconds,
    completion tokens, tokens/s, peak memory (GPU).

    tokens/s = completion tokens incl. the stop token ÷ wall time of ``generate``.
    """
    from radvlm.rollout import HFEngine, Sampling

    engine = engine or HFEngine(shared_prefill=bool(shared))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    torch.manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    engine.sync_weights(policy)
    out = engine.generate(policy, batch, Sampling(num_generations=g, max_new_tokens=max_new_tokens,
                                                  temperature=temperature))
    synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    tokens = int(out.completion_mask.sum())
    rows = out.completion_mask.shape[0]
    row = {"seconds": round(seconds, 4), "cpu_seconds": round(cpu_seconds, 4), "tokens": tokens,
           "tokens_per_s": round(tokens / seconds, 2), "completion_len_mean": round(tokens / rows, 1)}
    if out.logprobs is not None:  # an engine with log-probs of its own (vLLM): how far from the trainer's
        from radvlm.rollout_correction import logprob_agreement

        with torch.no_grad():
            trainer = policy.token_logprobs(out.model_batch(), out.completion_mask, temperature=temperature)
        known = torch.isfinite(out.logprobs) & out.completion_mask.bool()
        mean, top = logprob_agreement(trainer.float(), torch.nan_to_num(out.logprobs), known.long())
        row.update(logprob_diff_mean=round(mean, 4), logprob_diff_max=round(top, 4))
    if device.startswith("cuda"):
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row, out.completion_ids


#: a greedy token within this many standard deviations of the position's largest logit counts as an arg-max
GREEDY_TIE_TOLERANCE = 0.1


@torch.no_grad()
def greedy_gap(policy, prompt_inputs: dict, out, suppress: torch.Tensor, rows_per_pass: int = 8) -> float:
    """Largest ``(max logit − logit of the greedy token) / std(logits)`` over the completion positions of ``out``,
    from one forward pass without KV cache over prompt + completion (suppressed ids excluded)."""
    from radvlm.batch import append_completions, select_rows

    full = append_completions(prompt_inputs, out.completion_ids, out.completion_mask)
    ids, mask = out.completion_ids, out.completion_mask.bool()  # (N, C)
    n, c = ids.shape
    worst = 0.0
    for start in range(0, n, rows_per_pass):
        rows = list(range(start, min(n, start + rows_per_pass)))
        h = policy.hidden_states(select_rows(full, rows))[:, -c - 1 : -1]  # (n, C, H): state before each token
        logits = policy.hf_model.lm_head(h).float()  # (n, C, V)
        logits[..., suppress] = float("nan")  # excluded from max, mean and std alike
        top = logits.nan_to_num(float("-inf")).amax(-1)  # (n, C)
        mean = logits.nanmean(-1, keepdim=True)  # (n, C, 1)
        std = ((logits - mean) ** 2).nanmean(-1).sqrt()  # (n, C)
        chosen = logits.gather(-1, ids[rows].unsqueeze(-1)).squeeze(-1)  # (n, C); NaN if a suppressed id
        gap = ((top - chosen) / std).nan_to_num(float("inf"))[mask[rows]]  # (kept positions,)
        if gap.numel():
            worst = max(worst, float(gap.max()))
    return worst


def greedy_check(policy, batch: dict, g: int, tokens: int) -> dict:
    """Greedy decoding of the same fixed-shape batch by both paths, checked against a cache-free forward pass:
    ``greedy_consistent``, ``greedy_equal_frac`` and the largest gap per path.

    ``greedy_consistent`` (holds in bf16, unlike ``identical_samples``, see ``run``): both paths decode the same
    fixed-shape batch greedily (``--greedy-tokens``); one forward pass without KV cache over prompt +
    completion then gives the logits at every completion position, and each greedy token must be the arg-max
    there up to a near-tie: ``max logit − logit(token) ≤ GREEDY_TIE_TOLERANCE × std(logits)`` (suppressed ids
    excluded). A broken cache (wrong rows, positions or prompt) puts tokens several standard deviations below
    the maximum; bf16 rounding only tips near-ties. ``greedy_equal_frac`` (share of positions where the two
    greedy outputs agree) and the largest gap of each path are reported beside it.
    """
    from radvlm.policy import Policy, repeat_batch

    was_training = policy.training
    policy.eval()
    try:
        outs = {mode: policy.generate(batch, num_return_sequences=g, max_new_tokens=tokens, do_sample=False,
                                      shared_prefill=mode == "shared") for mode in ("plain", "shared")}
        prompt = repeat_batch(Policy.model_inputs(batch), g)
        suppress = torch.as_tensor(policy.suppress_token_ids, dtype=torch.long, device=batch["input_ids"].device)
        gaps = {mode: greedy_gap(policy, prompt, out, suppress) for mode, out in outs.items()}
    finally:
        policy.train(was_training)
    a, b = (outs[m].completion_ids.cpu() for m in ("plain", "shared"))
    ma, mb = (outs[m].completion_mask.cpu().bool() for m in ("plain", "shared"))
    width = max(a.shape[1], b.shape[1])  # generation stops early when every row has stopped: pad to one width
    pad = lambda t, fill: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)  # noqa: E731
    a, b, ma, mb = pad(a, -1), pad(b, -2), pad(ma, False), pad(mb, False)
    either = ma | mb  # (N*G, C) positions that either path generated
    equal = float(((a == b) & either).sum()) / max(int(either.sum()), 1)
    return {"greedy_tokens": tokens, "greedy_equal_frac": round(equal, 4),
            "greedy_gap_plain": round(gaps["plain"], 4), "greedy_gap_shared": round(gaps["shared"], 4),
            "greedy_consistent": max(gaps.values()) <= GREEDY_TIE_TOLERANCE}


def copy_bandwidth(device: str, mib: int = 1024) -> float:
    """Bytes per second of a large on-device copy, counting bytes read and written."""
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    reps = 10 if device.startswith("cuda") else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    synchronize(device)
    return 2 * src.numel() * 4 * reps / (time.perf_counter() - t0)


def decode_bytes_per_step(policy, rows: int, context: float) -> float:
    """Bytes one decode step must read: language-model weights (+ head) and the KV cache of every row."""
    hf = policy.hf_model
    text = hf.model.language_model
    cfg = text.config
    elem = next(hf.parameters()).element_size()
    weights = sum(p.numel() for n, p in text.named_parameters() if "embed_tokens" not in n) * elem
    weights += hf.lm_head.weight.numel() * elem  # the head reads the whole (V, H) matrix; embedding: 1 row
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem * context * rows
    return weights + kv


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"

def add_common_args(parser, out_name: str) -> None:
    """Options every benchmark takes: threads, seed, scratch folder, JSON output."""
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch folder (tiny checkpoint, images); default: temp")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / out_name))


def run_with_threads(run, args):
    """``run(args)`` with ``args.threads`` torch threads, giving the process-wide count back afterwards."""
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=sorted(SHAPES))
    parser.add_argument("--model", default=None, help="checkpoint folder instead of a random --size model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--image-size", type=int, default=672)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4], help="prompts per call")
    parser.add_argument("--g", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--modes", nargs="+", default=["plain", "shared"], choices=["plain", "shared", "fast", "fsdp2", "vllm"],
                        help="rollout engines; the first is the baseline of speedup and identical_samples")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank on the language model (0: none)")
    parser.add_argument("--warmup", type=int, default=1, help="discarded repetitions (every mode) per batch size")
    parser.add_argument("--reps", type=int, default=2, help="timed repetitions, modes alternating; median kept")
    parser.add_argument("--greedy-tokens", type=int, default=32,
                        help="greedy tokens of the bf16-proof same-samples check (0: skip it)")
    add_common_args(parser, "rollout.json")
    args = parser.parse_args(argv)
    return run_with_threads(run, args)


def summarize_mode(calls: list[dict], device: str) -> dict:
    """One row from the timed calls of a mode: medians over the repetitions, and each repetition's figures."""
    cpu_rate = [c["tokens"] / max(c["cpu_seconds"], 1e-9) for c in calls]
    row = {"seconds": round(median([c["seconds"] for c in calls]), 4),
           "cpu_seconds": round(median([c["cpu_seconds"] for c in calls]), 4),
           "tokens": int(round(median([c["tokens"] for c in calls]))),
           "tokens_per_s": round(median([c["tokens_per_s"] for c in calls]), 2),
           "cpu_tokens_per_s": round(median(cpu_rate), 2),
           "completion_len_mean": round(sum(c["completion_len_mean"] for c in calls) / len(calls), 1),
           "reps": len(calls), "rep_seconds": [c["seconds"] for c in calls],
           "rep_tokens_per_s": [c["tokens_per_s"] for c in calls]}
    if device.startswith("cuda"):
        row["peak_gib"] = max(c["peak_gib"] for c in calls)
    if all("logprob_diff_mean" in c for c in calls):
        row["logprob_diff_mean"] = round(median([c["logprob_diff_mean"] for c in calls]), 4)
        row["logprob_diff_max"] = max(c["logprob_diff_max"] for c in calls)
    return row


def run(args: argparse.Namespace) -> list[dict]:
    """One row per mode and batch size; the rows are printed and written to ``args.out``.

    Each row samples ``G`` completions for each of ``B`` report prompts with one image each (random noise
    images of ``--image-size``², about 441 visual tokens at 672² for Qwen3-VL's 16-pixel patches merged 2×2;
    prompts of about 20–30 text tokens) from a randomly initialised Qwen3-VL, every mode from the same seed.
    ``--lora R`` puts rank-R LoRA adapters (non-zero B) on every linear layer of the language model, as a LoRA
    GRPO run has them. The decode memory-bandwidth bound is printed beside tokens/s: per decode step the
    language model's weights and the KV cache of all rows are read once, so ``tokens/s ≤ rows · bandwidth /
    (weight bytes + KV bytes at the mean context)`` (``decode_bytes_per_step``), with the bandwidth measured by
    a large device copy (``copy_bandwidth``). It is the GPU bound that matters; on CPU it is printed for
    reference.

    Timing method (so that neither mode pays a warm-up): for each batch size, ``--warmup`` repetitions of every
    mode run first and are discarded (CUDA context, kernels and allocator for that shape, lazy imports), then
    ``--reps`` (≥ 2) repetitions alternate the modes (plain, shared, plain, shared, …), every call from the same
    seed; each row reports the median over the repetitions (seconds, CPU seconds, tokens/s) and ``speedup`` is
    each mode's median tokens/s over the first mode's. With a single repetition the first mode measured pays
    the warm-up: on an H200 that made shared prefill look ×2.5–2.8 faster where the honest figure is ×1.05–1.35.

    "Same samples", two checks. ``identical_samples``: each mode's sampled token ids equal the first mode's at
    every row and position in every repetition. An exact float32 property (checked on CPU); in bf16 the
    prefill of N rows instead of N·G rounds differently, a near-tie draw tips, and the rows part (observed on
    an H200: not token-identical); merged LoRA rounds differently too, so ``fast`` with ``--lora`` need not be
    identical. ``greedy_consistent`` holds in bf16: ``greedy_check``.
    """
    if args.reps < 1 or args.warmup < 0:
        raise ValueError("--reps must be >= 1 and --warmup >= 0")
    work = Path(args.work or tempfile.mkdtemp(prefix="radvlm-rollout-"))
    t0 = time.perf_counter()
    dtype = args.dtype
    lora = None
    if args.lora:
        from radvlm.lora import LoRASettings

        lora = LoRASettings(r=args.lora, alpha=2 * args.lora, dropout=0.0)
    policy = build_policy(args.size, args.device, dtype, args.image_size, args.model, work, lora=lora)
    if lora is not None:  # B is zero at init: give the adapters a real delta, as after some training
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for name, p in policy.model.named_parameters():
                if "lora_B" in name:
                    p.copy_((torch.randn(p.shape, generator=gen) * 0.01).to(p.dtype))
    engines = {m: make_engine(m) for m in args.modes}
    if "vllm" in engines:  # built before the timings, as GRPOModule builds it at the start of fit
        if args.model is None:  # vLLM builds its model from a folder: the random model of this shape, saved
            folder = work / "vllm_model"
            policy.save_pretrained(folder, merge_lora=policy.is_lora)
            policy.hf_model.config._name_or_path = str(folder)
        engines["vllm"].setup(policy, max_model_len=2048 + args.max_new_tokens, seed=args.seed)
    policies = {m: policy for m in args.modes}
    if "fsdp2" in args.modes:
        policies["fsdp2"] = sharded_copy(policy, args.device)
    try:
        return _run_modes(args, work, policy, policies, engines, dtype, time.perf_counter() - t0)
    finally:
        end_process_group()


def _run_modes(args, work: Path, policy, policies: dict, engines: dict, dtype, build_s: float) -> list[dict]:
    """The timed repetitions of ``run`` (``policies``: the policy each mode generates with)."""
    records = write_prompt_records(work / "data", max(args.batch_sizes), args.image_size)
    bandwidth = copy_bandwidth(args.device, 1024 if args.device.startswith("cuda") else 256)
    params = sum(p.numel() for p in policy.parameters())
    rows = []
    for b in args.batch_sizes:
        batch = prompt_batch(policy, records, b, args.device)
        prompt_len = int(batch["attention_mask"].sum(1).float().mean())
        image_tokens = int(batch["mm_token_type_ids"].sum()) // b
        calls: dict[str, list[dict]] = {m: [] for m in args.modes}
        ids: dict[str, list[torch.Tensor]] = {m: [] for m in args.modes}
        for rep in range(args.warmup + args.reps):  # modes alternate, so a busy machine slows both alike
            for mode in args.modes:
                call, completion = time_generate(policies[mode], batch, args.g, args.max_new_tokens, mode,
                                                 args.seed, args.device, engine=engines[mode])
                if rep >= args.warmup:  # the warm-up repetitions are discarded
                    calls[mode].append(call)
                    ids[mode].append(completion.cpu())
        best = {mode: summarize_mode(calls[mode], args.device) for mode in args.modes}
        for mode in args.modes:
            row = best[mode]
            n_rows = b * args.g
            context = prompt_len + row["completion_len_mean"] / 2  # mean context over the decode steps
            bound = n_rows * bandwidth / decode_bytes_per_step(policy, n_rows, context)
            rows.append({"mode": mode, "prompts": b, "g": args.g, "rows": n_rows, "prompt_tokens": prompt_len,
                         "image_tokens": image_tokens, "warmup": args.warmup, **row,
                         "bandwidth_bound_tokens_per_s": round(bound, 1),
                         "share_of_bound": round(row["tokens_per_s"] / bound, 4)})
        if len(args.modes) >= 2:  # same seed: the same token ids unless rounding (bf16, merged LoRA) tipped a draw
            base = args.modes[0]
            greedy = {"plain", "shared"} <= set(args.modes) and args.greedy_tokens > 0
            check = greedy_check(policy, batch, args.g, args.greedy_tokens) if greedy else {}
            for mode, r in zip(args.modes, rows[-len(args.modes):]):
                other = base if mode != base else args.modes[1]
                r["identical_samples"] = all(p.shape == s.shape and bool(torch.equal(p, s))
                                             for p, s in zip(ids[mode], ids[other]))
                r.update(check)
                if mode != base:
                    r["speedup"] = round(r["tokens_per_s"] / best[base]["tokens_per_s"], 3)
                    r["speedup_cpu_time"] = round(r["cpu_tokens_per_s"] / best[base]["cpu_tokens_per_s"], 3)

    meta = {"date": date.today().isoformat(), "device": describe_device(args.device), "size": args.model or args.size,
            "params_m": round(params / 1e6, 2), "dtype": dtype, "image_size": args.image_size,
            "max_new_tokens": args.max_new_tokens, "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
            "warmup": args.warmup, "reps": args.reps, "statistic": "median", "greedy_tokens": args.greedy_tokens,
            "greedy_tie_tolerance": GREEDY_TIE_TOLERANCE, "lora_rank": args.lora, "modes": args.modes,
            "build_s": round(build_s, 2), "torch": torch.__version__}
    print(f"rollout: {meta['device']}, model {meta['size']} ({meta['params_m']} M params, {dtype}), image "
          f"{args.image_size}², G={args.g}, max_new_tokens={args.max_new_tokens}, copy bandwidth "
          f"{meta['copy_bandwidth_gb_s']} GB/s; median of {args.reps} alternating repetitions after "
          f"{args.warmup} discarded")
    print(f"{'mode':<7}{'prompts':>8}{'rows':>6}{'prompt tok':>11}{'seconds':>9}{'tokens':>8}{'tok/s':>9}"
          f"{'bound tok/s':>12}{'of bound':>9}{'speedup':>8}{'same ids':>9}{'greedy ok':>10}{'peak GiB':>9}"
          f"{'lp diff':>8}")
    for r in rows:
        print(f"{r['mode']:<7}{r['prompts']:>8}{r['rows']:>6}{r['prompt_tokens']:>11}{r['seconds']:>9.3f}"
              f"{r['tokens']:>8}{r['tokens_per_s']:>9.1f}{r['bandwidth_bound_tokens_per_s']:>12.0f}"
              f"{r['share_of_bound']:>9.1%}{r.get('speedup', ''):>8}{r.get('identical_samples', '')!s:>9}"
              f"{r.get('greedy_consistent', '')!s:>10}{r.get('peak_gib', ''):>9}{r.get('logprob_diff_mean', ''):>8}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
