"""The offline CPU demo behind ``make demo``: phantom data → SFT → GRPO → held-out comparison.

``python -m radvlm_tools.demo [--variant plain|thinking] [--out runs/demo]`` runs, as separate processes of the
real command line (``python main.py fit|predict --config configs/demo/…``):

1. the phantom dataset (``datamodules.phantom``) and the tiny Qwen3-VL checkpoint (``radvlm.tiny``), once;
2. plain: SFT (``configs/demo/sft.yaml``) — thinking: cold start on ``<think>`` data
   (``configs/demo/coldstart.yaml``; the demo starts it from the tiny checkpoint, i.e. stages 1 and 2 in one);
3. GRPO on abnormality grounding with the soft-F1 reward (``configs/demo/grpo.yaml`` / ``grpo_thinking.yaml``);
4. greedy predictions of both checkpoints on the same held-out test images (``configs/demo/predict.yaml``), and
   of the grounding records on deranged images (the shuffle control), scored with the metric classes used for
   training, printed as a table and written to ``OUT/summary.json`` (``{"sft": {...}, "grpo": {...},
   "paired": {...}}``). The first model's predictions run beside GRPO (two cores, one thread each).

Everything runs offline; each run writes its checkpoints, TensorBoard versions and export under its own folder
(``OUT/sft``, ``OUT/grpo`` …: the configs' ``default_root_dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the repository: main.py, configs/demo


def start(args: list[str], what: str, log: Path | None = None) -> subprocess.Popen:
    """Start a command from the repository root, its output streamed (or written to ``log``)."""
    print(f"\n==> {what}\n    $ {' '.join(args)}" + (f"\n    (output: {log})" if log else ""), flush=True)
    env = dict(os.environ)
    # tiny models: one intra-op thread per process is fastest (the data worker or a second job takes the other core)
    env.setdefault("OMP_NUM_THREADS", "1")
    if log is None:
        return subprocess.Popen(args, cwd=ROOT, env=env)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


def wait(job: subprocess.Popen, what: str, log: Path | None = None) -> None:
    if job.wait() != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:]) if log and log.is_file() else ""
        raise SystemExit(f"{tail}demo step failed ({what}): exit code {job.returncode}")


def run(args: list[str], what: str) -> float:
    """Run a command from the repository root, streaming its output; return seconds taken."""
    t0 = time.perf_counter()
    wait(start(args, what), what)
    return time.perf_counter() - t0


def main_py(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *args]


def prepare(out: Path) -> None:
    """The phantom dataset and the tiny checkpoint, normalising pixels with the phantom's own statistics (see
    ``radvlm.tiny``: what lets the vision tower learn); a checkpoint written with other statistics is redone."""
    from radvlm.tiny import image_stats

    phantom, tiny = out / "phantom", out / "tiny"
    if not (phantom / "meta.json").is_file():
        run([sys.executable, "-m", "datamodules.phantom", str(phantom), "--n", "2000", "--workers", "2",
             "--corpus-out", str(out / "corpus.txt")], "phantom chest X-ray dataset")
    config = tiny / "preprocessor_config.json"
    # the statistics are read once: by radvlm.tiny when it writes the checkpoint, here only to check an old one
    if (not (tiny / "model.safetensors").is_file()
            or json.loads(config.read_text())["image_mean"][0] != image_stats(phantom / "images")[0]):
        run([sys.executable, "-m", "radvlm.tiny", str(tiny), "--corpus", str(out / "corpus.txt"),
             "--image-stats-from", str(phantom / "images")], "tiny Qwen3-VL checkpoint")


def _rows(path: Path) -> list[dict]:
    """The rows of a prediction file by id (its header line skipped)."""
    from radvlm_tools.prediction_files import is_header

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted((r for r in rows if not is_header(r)), key=lambda r: r["id"])


def summarise(pred_files: dict[str, Path], shuffled_files: dict[str, Path] | None = None) -> dict[str, Any]:
    """Per-model held-out metrics from prediction files (same samples for every model); with ``shuffled_files``
    (the same grounding records answered on deranged images, ``radvlm_tools.shuffle_control``) each model also gets
    ``shuffle``: own / shuffled / image-dependent soft-F1 and mAP@0.5 with paired 95 % bootstrap CIs. ``paired``
    holds GRPO − SFT on the same records (soft-F1, mAP@0.5 and, with the control, their image-dependent parts),
    each with a 95 % bootstrap CI (2000 resamples of the records, seed 0)."""
    from metrics.grounding import GroundingMAP
    from metrics.text import GLEU
    from radvlm.tasks import is_box_task
    from radvlm_tools.shuffle_control import image_dependence, paired_gain, per_record

    summary: dict[str, Any] = {}
    entries: dict[str, dict] = {}
    for name, path in pred_files.items():
        rows = _rows(path)
        grounding = [r for r in rows if is_box_task(r["task"])]
        reports = [r for r in rows if r["task"] == "report_generation"]
        out: dict[str, Any] = {}
        if grounding:
            if shuffled_files and name in shuffled_files:
                entry = image_dependence(grounding, _rows(shuffled_files[name]))
                out["shuffle"] = {k: entry[k] for k in ("soft_f1", "map")}
            else:
                entry = {"per_record": per_record(grounding, grounding)}
            entries[name] = entry
            values = entry["per_record"].values()
            out["soft_f1"] = float(np.mean([v["soft_f1"] for v in values]))
            out["map"] = float(np.mean([v["map"] for v in values]))
            m = GroundingMAP()
            m.update([r["answer"] for r in grounding], [r["reference"] for r in grounding])
            out["mean_iou"] = float(m.compute()["mean_iou"])
            out["grounding_chars"] = sum(len(r["answer"]) for r in grounding) / len(grounding)
            out["n_grounding"] = len(grounding)
        if reports:
            preds, refs = [r["answer"] for r in reports], [r["reference"] for r in reports]
            out["gleu"] = float(GLEU().score(preds, refs).mean())
            out["report_chars"] = sum(len(p) for p in preds) / len(preds)
            out["n_reports"] = len(reports)
        if any(r.get("thinking") for r in rows):
            out["think_closed"] = sum(bool(r.get("think_closed")) for r in rows) / len(rows)
        summary[name] = out
    if {"sft", "grpo"} <= entries.keys():
        keys = ["soft_f1", "map"]
        if all("shuffle" in summary[n] for n in ("sft", "grpo")):
            keys += ["soft_f1_image", "map_image"]
        summary["paired"] = {k: paired_gain(entries["sft"], entries["grpo"], k) for k in keys}
    return summary


def _ci(d: dict[str, float], key: str = "delta") -> str:
    return f"{d[key]:+.3f} ({d['ci95_low']:+.3f} … {d['ci95_high']:+.3f})"


def format_summary(summary: dict[str, Any], seconds: dict[str, float]) -> str:
    """The demo table: per model own / shuffled / image-dependent soft-F1 and mAP@0.5 (paired 95 % CIs) when the
    shuffle control ran, the other columns, then the paired GRPO − SFT differences and the times."""
    models = {k: v for k, v in summary.items() if k != "paired"}
    control = any("shuffle" in v for v in models.values())
    lines = []
    if control:
        lines += ["| model | soft-F1 own | shuffled | image-dependent (95 % CI) | mAP@0.5 own | shuffled | "
                  "image-dependent (95 % CI) |", "|---|---|---|---|---|---|---|"]
        for name, v in models.items():
            if "shuffle" not in v:
                continue
            cells = []
            for key in ("soft_f1", "map"):
                m = v["shuffle"][key]
                cells += [f"{m['own']:.3f}", f"{m['shuffled']:.3f}", _ci(m, "image")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    keys = [k for k in ("soft_f1", "map", "mean_iou", "grounding_chars", "gleu", "report_chars", "think_closed")
            if any(k in v for v in models.values()) and not (control and k in ("soft_f1", "map"))]
    lines += ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, values in models.items():
        cells = [f"{values[k]:.3f}" if k in values else "—" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    if "paired" in summary:
        p = summary["paired"]
        n = next(iter(p.values()))["n"]
        names = {"soft_f1_image": "image-dependent soft-F1", "map_image": "image-dependent mAP@0.5",
                 "soft_f1": "soft-F1", "map": "mAP@0.5"}
        lines.append(f"GRPO − SFT on the same {n} grounding records (95 % bootstrap CI): " + "; ".join(
            f"{names[k]} {_ci(p[k])}" for k in ("soft_f1_image", "map_image", "soft_f1", "map") if k in p))
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
    t_prepare = time.perf_counter()
    prepare(out)
    seconds["data+checkpoint"] = time.perf_counter() - t_prepare

    thinking = args.variant == "thinking"
    first_cfg = "configs/demo/coldstart.yaml" if thinking else "configs/demo/sft.yaml"
    first_model = out / ("coldstart" if thinking else "sft") / "hf_export"  # each run's {default_root_dir}/hf_export
    grpo_cfg = "configs/demo/grpo_thinking.yaml" if thinking else "configs/demo/grpo.yaml"
    grpo_model = out / ("grpo_thinking" if thinking else "grpo") / "hf_export"
    rerun = ("--model.init_args.overwrite_export", "true")  # the demo owns runs/demo: a rerun replaces it
    seconds["sft"] = run(main_py("fit", "--config", first_cfg, *rerun), "cold start SFT" if thinking else "SFT")
    # held-out greedy predictions on the records' own images and, for the shuffle control, of the grounding records
    # on deranged images (``--data.init_args.shuffle_images 0``). Two cores: the first model's predictions run
    # beside GRPO, the second model's two sets beside each other (outputs in OUT/predictions/*.log).
    preds: dict[str, Path] = {}
    shuffled: dict[str, Path] = {}

    def predict(name: str, model: Path, images: str) -> tuple[subprocess.Popen, str, Path]:
        suffix = "" if images == "own" else "_shuffled"
        path = out / "predictions" / f"{args.variant}_{name}{suffix}.jsonl"
        if path.exists():
            path.unlink()
        extra = () if images == "own" else ("--data.init_args.shuffle_images", "0",
                                            "--data.init_args.tasks", "[abnormality_grounding]")
        (preds if images == "own" else shuffled)[name] = path
        what, log = f"held-out predictions ({name}, {images} images)", path.with_suffix(".log")
        return start(main_py("predict", "--config", "configs/demo/predict.yaml",
                             "--model.init_args.policy.name_or_path", str(model),
                             "--data.init_args.thinking", str(thinking).lower(),
                             "--trainer.callbacks.init_args.output", str(path), *extra), what, log), what, log

    t0 = time.perf_counter()
    grpo = start(main_py("fit", "--config", grpo_cfg, *rerun), "GRPO")
    try:
        for images in ("own", "shuffled"):  # beside GRPO, one after the other
            wait(*predict("sft", first_model, images))
    except BaseException:  # a failed prediction (or Ctrl-C) does not leave GRPO running on its own
        grpo.terminate()
        grpo.wait()
        raise
    wait(grpo, "GRPO")
    seconds["grpo (+ SFT predictions beside it)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for job in [predict("grpo", grpo_model, images) for images in ("own", "shuffled")]:
        wait(*job)
    seconds["grpo predictions"] = time.perf_counter() - t0
    summary = summarise(preds, shuffled)
    result = {**summary, "variant": args.variant, "seconds": seconds}
    name = "summary.json" if not thinking else "summary_thinking.json"
    (out / name).write_text(json.dumps(result, indent=2))
    print("\n" + format_summary(summary, seconds))
    print(f"\nsummary: {out / name}\nTensorBoard: tensorboard --logdir {out}")


if __name__ == "__main__":
    main()
