"""Run every benchmark and print one summary: rollout throughput, GRPO phase breakdown, metric throughput.

``python -m benchmarks.run_all [--preset cpu|quick|gpu-8b|gpu-2b] [--skip metrics]``

Presets (each benchmark's own arguments; see their docstrings):

- ``quick``: tiny sizes, a few seconds each (the smoke test's settings);
- ``cpu``: ``rollout`` on the ``small`` model at 672² (G = 8, 100 new tokens, 1–4 prompts), ``grpo_step``
  on the tiny checkpoint at 672² with RadCliQ rewards, ``metrics`` with 64 pairs; one torch thread, so that
  a shared machine disturbs the numbers least;
- ``gpu-8b`` / ``gpu-2b``: the real Qwen3-VL shapes with random weights in bf16 (``benchmarks/gpu_check.sh``).

Every preset times the same way (see ``benchmarks/rollout.py`` and ``benchmarks/grpo_step.py``): one
discarded warm-up repetition of each mode, plain and shared alternating, the median of 2 timed repetitions.

Each benchmark writes its JSON to ``--results`` (default ``benchmarks/results/``); ``summary.json`` collects
them. ``benchmarks/metrics.py`` is included when it exists. ``--only NAME`` runs one benchmark
(``gpu_check.sh`` runs each in its own process under a time limit); ``--summary-only`` reprints the summary
from the JSON files already there (and writes ``summary.json``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: the repo root, not benchmarks/, must be importable
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(ROOT))

#: the GPU presets' rollout modes: vLLM's too where it is installed (its 315 MB wheel cannot be carried to an
#: offline device machine: docs/vllm.md)
GPU_ROLLOUT_MODES = ["plain", "shared", "fast", "fsdp2"] + (["vllm"] if importlib.util.find_spec("vllm") else [])

PRESETS: dict[str, dict[str, list[str]]] = {
    "quick": {
        "rollout": ["--size", "tiny", "--image-size", "128", "--batch-sizes", "1", "2", "--g", "2",
                    "--max-new-tokens", "4", "--warmup", "1", "--reps", "2", "--greedy-tokens", "4", "--threads", "1",
                    "--modes", "plain", "shared", "fsdp2"],
        "grpo_step": ["--size", "tiny", "--image-size", "128", "--batch-size", "2", "--g", "2",
                      "--max-new-tokens", "4", "--warmup", "1", "--reps", "2", "--threads", "1"],
        "metrics": ["--n", "8"],
    },
    "cpu": {
        "rollout": ["--size", "small", "--image-size", "672", "--batch-sizes", "1", "2", "4", "--g", "8",
                    "--max-new-tokens", "100", "--warmup", "1", "--reps", "2", "--greedy-tokens", "32",
                    "--threads", "1"],
        "grpo_step": ["--size", "tiny", "--image-size", "672", "--batch-size", "4", "--g", "8",
                      "--max-new-tokens", "100", "--warmup", "1", "--reps", "2", "--reward", "radcliq",
                      "--threads", "1"],
        "metrics": ["--n", "64"],
    },
    "gpu-8b": {
        "rollout": ["--size", "8b", "--device", "cuda", "--batch-sizes", "4", "16", "--g", "8",
                    "--max-new-tokens", "128", "--warmup", "1", "--reps", "2", "--greedy-tokens", "32",
                    "--modes", *GPU_ROLLOUT_MODES],
        "grpo_step": ["--size", "8b", "--device", "cuda", "--lora", "--gradient-checkpointing", "--batch-size", "4",
                      "--g", "8", "--max-new-tokens", "128", "--warmup", "1", "--reps", "2", "--reward", "radcliq"],
        "metrics": ["--n", "256", "--device", "cuda"],
    },
    "gpu-2b": {
        "rollout": ["--size", "2b", "--device", "cuda", "--batch-sizes", "4", "16", "--g", "8",
                    "--max-new-tokens", "128", "--warmup", "1", "--reps", "2", "--greedy-tokens", "32",
                    "--modes", *GPU_ROLLOUT_MODES],
        "grpo_step": ["--size", "2b", "--device", "cuda", "--gradient-checkpointing", "--batch-size", "8",
                      "--g", "8", "--max-new-tokens", "128", "--warmup", "1", "--reps", "2", "--reward", "radcliq"],
        "metrics": ["--n", "256", "--device", "cuda"],
    },
}
ORDER = ("rollout", "grpo_step", "metrics")


def summarize(results: dict[str, Any]) -> list[str]:
    """Summary lines from the benchmarks' JSON (``{"meta": ..., "rows": [...]}`` per benchmark)."""
    lines: list[str] = []
    roll = results.get("rollout")
    if roll:
        m = roll["meta"]
        lines.append(f"rollout — {m['device']}, {m['size']} ({m['params_m']} M, {m['dtype']}), image "
                     f"{m['image_size']}², {m['max_new_tokens']} new tokens, copy {m['copy_bandwidth_gb_s']} GB/s")
        by_prompts: dict[int, dict[str, dict]] = {}
        for r in roll["rows"]:
            by_prompts.setdefault(r["prompts"], {})[r["mode"]] = r
        for b, modes in sorted(by_prompts.items()):
            plain, shared = modes.get("plain"), modes.get("shared")
            parts = [f"  {b:>3} prompts × G={(plain or shared)['g']}:"]
            if plain:
                parts.append(f"plain {plain['tokens_per_s']:.1f} tok/s")
            if shared:
                parts.append(f"shared {shared['tokens_per_s']:.1f} tok/s")
            if plain and shared:
                parts.append(f"speed-up ×{shared.get('speedup', float('nan')):.2f}, "
                             f"same samples {shared.get('identical_samples')}")
                if "greedy_consistent" in shared:
                    parts.append(f"greedy consistent {shared['greedy_consistent']} "
                                 f"({100 * shared['greedy_equal_frac']:.0f}% equal)")
            parts.append(f"(bandwidth bound {(plain or shared)['bandwidth_bound_tokens_per_s']:.0f} tok/s)")
            lines.append(" ".join(parts))
    step = results.get("grpo_step")
    if step:
        m = step["meta"]
        lines.append(f"grpo_step — {m['device']}, {m['size']} ({m['dtype']}), {m['prompts']} prompts × G={m['g']}, "
                     f"{m['max_new_tokens']} new tokens, reward {m['reward']}")
        for r in step["rows"]:
            total = r["step_s"]
            share = ", ".join(f"{p} {100 * r[f'{p}_s'] / total:.0f}%" for p in ("generate", "reward", "logprobs",
                                                                                 "update"))
            phases = f"; phases {r['phase_sum_s']:.2f} s" if "phase_sum_s" in r else ""
            extra = f", step speed-up ×{r['speedup_step']:.2f}" if "speedup_step" in r else ""
            peak = f", peak {r['peak_gib']} GiB" if "peak_gib" in r else ""
            lines.append(f"  {r['mode']:<6} step {total:.2f} s ({share}{phases}), {r['tokens_per_s']:.1f} tok/s"
                         f"{extra}{peak}")
    met = results.get("metrics")
    if met:
        lines.append(f"metrics — device {met.get('meta', {}).get('device', '?')}")
        for r in met.get("rows", []):
            if "error" in r:
                lines.append(f"  {r.get('metric')} [{r.get('layout', '')}]: error {r['error']}")
            elif "samples_per_s" in r:
                lines.append(f"  {r.get('metric')} [{r.get('layout', '')}]: {r['samples_per_s']} samples/s")
    return lines


def load_results(folder: Path) -> dict[str, Any]:
    out = {}
    for name in ORDER:
        path = folder / f"{name}.json"
        if path.is_file():
            out[name] = json.loads(path.read_text())
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--skip", nargs="*", default=[], choices=list(ORDER))
    parser.add_argument("--only", default=None, choices=list(ORDER), help="run this benchmark alone")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work", default=None, help="scratch folder shared by the benchmarks")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args(argv)
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    failed: list[str] = []
    if not args.summary_only:
        for name in ORDER:
            if name in args.skip or (args.only and name != args.only):
                continue
            if name == "metrics" and not (ROOT / "benchmarks" / "metrics.py").is_file():
                continue
            module = importlib.import_module(f"benchmarks.{name}")
            extra = ["--out", str(folder / f"{name}.json")]
            if args.work and name != "metrics":
                extra += ["--work", args.work]
            t0 = time.perf_counter()
            try:
                module.main(PRESETS[args.preset][name] + extra)
            except Exception as exc:  # noqa: BLE001  (one failing benchmark must not hide the others)
                print(f"{name} failed: {type(exc).__name__}: {exc}")
                failed.append(name)
                (folder / f"{name}.json").unlink(missing_ok=True)
            seconds[name] = round(time.perf_counter() - t0, 1)
            gc.collect()
            if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
                sys.modules["torch"].cuda.empty_cache()
    results = load_results(folder)
    print("\n== summary ==")
    for line in summarize(results):
        print(line)
    previous = folder / "summary.json"
    if args.summary_only and previous.is_file():  # keep the timings of the run that made the files
        seconds = json.loads(previous.read_text()).get("seconds", {})
    summary = {"preset": args.preset, "seconds": seconds, "failed": failed, "results": results}
    if not args.only:
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
