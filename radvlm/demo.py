"""The offline CPU demo behind ``make demo``: phantom data → SFT → GRPO → held-out comparison.

``python -m radvlm.demo [--variant plain|thinking] [--out runs/demo]`` runs, as separate processes of the
real command line (``python main.py fit|predict --config configs/demo/…``):

1. the phantom dataset (``datamodules.phantom``) and the tiny Qwen3-VL checkpoint (``radvlm.tiny``), once;
2. plain: SFT (``configs/demo/sft.yaml``) — thinking: cold start on ``<think>`` data
   (``configs/demo/coldstart.yaml``; the demo starts it from the tiny checkpoint, i.e. stages 1 and 2 in one);
3. GRPO on abnormality grounding with the soft-F1 reward (``configs/demo/grpo.yaml`` / ``grpo_thinking.yaml``);
4. greedy predictions of both checkpoints on the same held-out test images (``configs/demo/predict.yaml``),
   scored with the metric classes used for training, printed as a table and written to
   ``OUT/summary.json`` as ``{"sft": {...}, "grpo": {...}}`` (``soft_f1``, ``map``, ``gleu``, ...).

Everything runs offline; TensorBoard logs go to ``OUT/tensorboard``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], what: str) -> float:
    """Run a command from the repository root, streaming its output; return seconds taken."""
    print(f"\n==> {what}\n    $ {' '.join(args)}", flush=True)
    start = time.perf_counter()
    env = dict(os.environ)
    # tiny models: one intra-op thread per process is fastest (the data worker takes the other core)
    env.setdefault("OMP_NUM_THREADS", "1")
    done = subprocess.run(args, cwd=ROOT, env=env)
    if done.returncode != 0:
        raise SystemExit(f"demo step failed ({what}): exit code {done.returncode}")
    return time.perf_counter() - start


def main_py(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *args]


def prepare(out: Path) -> None:
    phantom, tiny = out / "phantom", out / "tiny"
    if not (phantom / "meta.json").is_file():
        run([sys.executable, "-m", "datamodules.phantom", str(phantom), "--n", "2000", "--corpus-out",
             str(out / "corpus.txt")], "phantom chest X-ray dataset")
    if not (tiny / "model.safetensors").is_file():
        run([sys.executable, "-m", "radvlm.tiny", str(tiny), "--corpus", str(out / "corpus.txt")],
            "tiny Qwen3-VL checkpoint")


def summarise(pred_files: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Per-model held-out metrics from prediction files (same samples for every model), and the paired
    GRPO − SFT soft-F1 difference with a 95 % bootstrap interval (2000 resamples of the images, seed 0)."""
    import numpy as np

    from metrics.grounding import GroundingMAP, SoftF1
    from metrics.text import GLEU
    from radvlm.evaluate import bootstrap_ci
    from radvlm.tasks import is_box_task

    summary: dict[str, dict[str, float]] = {}
    per_sample: dict[str, dict[str, float]] = {}
    for name, path in pred_files.items():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rows.sort(key=lambda r: r["id"])
        grounding = [r for r in rows if is_box_task(r["task"])]
        reports = [r for r in rows if r["task"] == "report_generation"]
        out: dict[str, float] = {}
        if grounding:
            preds, refs = [r["answer"] for r in grounding], [r["reference"] for r in grounding]
            values = SoftF1().score(preds, refs)
            per_sample[name] = {r["id"]: float(v) for r, v in zip(grounding, values)}
            out["soft_f1"] = float(values.mean())
            m = GroundingMAP()
            m.update(preds, refs)
            agg = m.compute()
            out["map"] = float(agg["map"])
            out["mean_iou"] = float(agg["mean_iou"])
            out["grounding_chars"] = sum(len(p) for p in preds) / len(preds)
            out["n_grounding"] = len(grounding)
        if reports:
            preds, refs = [r["answer"] for r in reports], [r["reference"] for r in reports]
            out["gleu"] = float(GLEU().score(preds, refs).mean())
            out["report_chars"] = sum(len(p) for p in preds) / len(preds)
            out["n_reports"] = len(reports)
        if any(r.get("thinking") for r in rows):
            out["think_closed"] = sum(bool(r.get("think_closed")) for r in rows) / len(rows)
        summary[name] = out
    if {"sft", "grpo"} <= per_sample.keys():
        ids = sorted(per_sample["sft"].keys() & per_sample["grpo"].keys())
        diff = np.array([per_sample["grpo"][i] - per_sample["sft"][i] for i in ids])  # (n,) paired
        lo, hi = bootstrap_ci(diff, np.mean, n=2000, seed=0)
        summary["paired"] = {"soft_f1_delta": float(diff.mean()), "ci95_low": lo, "ci95_high": hi, "n": len(ids)}
    return summary


def format_summary(summary: dict[str, dict[str, float]], seconds: dict[str, float]) -> str:
    keys = [k for k in ("soft_f1", "map", "mean_iou", "grounding_chars", "gleu", "report_chars", "think_closed")
            if any(k in v for v in summary.values())]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, values in summary.items():
        if name == "paired":
            continue
        cells = [f"{values[k]:.3f}" if k in values else "—" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    if "paired" in summary:
        p = summary["paired"]
        lines.append(f"soft-F1 GRPO − SFT on the same {p['n']} images: {p['soft_f1_delta']:+.3f} "
                     f"(95 % bootstrap CI {p['ci95_low']:+.3f} … {p['ci95_high']:+.3f})")
    lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the offline tiny radvlm pipeline (SFT → GRPO → eval).")
    parser.add_argument("--variant", choices=["plain", "thinking"], default="plain")
    parser.add_argument("--out", default="runs/demo", help="output folder (configs/demo assume runs/demo)")
    args = parser.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    prepare(out)
    seconds["data+checkpoint"] = time.perf_counter() - start

    thinking = args.variant == "thinking"
    first_cfg = "configs/demo/coldstart.yaml" if thinking else "configs/demo/sft.yaml"
    first_model = out / ("coldstart_model" if thinking else "sft_model")
    grpo_cfg = "configs/demo/grpo_thinking.yaml" if thinking else "configs/demo/grpo.yaml"
    grpo_model = out / ("grpo_thinking_model" if thinking else "grpo_model")
    rerun = ("--model.init_args.overwrite_export", "true")  # the demo owns runs/demo: a rerun replaces it
    seconds["sft"] = run(main_py("fit", "--config", first_cfg, *rerun), "cold start SFT" if thinking else "SFT")
    seconds["grpo"] = run(main_py("fit", "--config", grpo_cfg, *rerun), "GRPO")

    preds: dict[str, Path] = {}
    t0 = time.perf_counter()
    for name, model in (("sft", first_model), ("grpo", grpo_model)):
        path = out / "predictions" / f"{args.variant}_{name}.jsonl"
        if path.exists():
            path.unlink()
        run(main_py("predict", "--config", "configs/demo/predict.yaml",
                    "--model.init_args.policy.name_or_path", str(model),
                    "--data.init_args.thinking", str(thinking).lower(),
                    "--trainer.callbacks.init_args.output", str(path)), f"held-out predictions ({name})")
        preds[name] = path
    seconds["predict"] = time.perf_counter() - t0
    summary = summarise(preds)
    result = {**summary, "variant": args.variant, "seconds": seconds}
    name = "summary.json" if not thinking else "summary_thinking.json"
    (out / name).write_text(json.dumps(result, indent=2))
    print("\n" + format_summary(summary, seconds))
    print(f"\nsummary: {out / name}\nTensorBoard: tensorboard --logdir {out / 'tensorboard'}")


if __name__ == "__main__":
    main()
