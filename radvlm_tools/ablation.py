"""Policy-optimisation ablation with the shuffle control: which GRPO variant makes the model read the image?

``python -m radvlm_tools.ablation --config configs/demo/grpo.yaml --variants grpo dr_grpo dapo gspo cispo sapo``
(``make ablation``) trains every variant from the same SFT export, with the same seed, data and step budget, as
separate processes of the real command line::

    python main.py fit --config BASE --config configs/demo/ablation/<variant>.yaml \\
        --trainer.default_root_dir OUT/<variant> ...

(each variant file only overrides the loss / advantage / sampling options of BASE, so any one of them also runs
alone with that command). Each trained model then answers the held-out grounding records twice, on their own
images and on images deranged among the records (``radvlm_tools.shuffle_control``), and one table prints per
variant: soft-F1 and mAP@0.5 on own and shuffled images, the image-dependent part (own − shuffled) with its
95 % bootstrap CI, the paired difference of that part against the reference variant (the first one, normally
``grpo``) with its CI, the mean answer length and the wall time. ``OUT/curves.png`` draws the validation curves
of all variants on one axis (from their TensorBoard logs) and ``OUT/ablation.json`` keeps the numbers.

A variant that raises the own-image score but not the image-dependent part learned a prior, not grounding.
The SFT export is the demo's (``runs/demo/sft/hf_export``); when it is missing, the demo's data, tiny checkpoint and
SFT stage run first (``radvlm_tools.demo``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from radvlm_tools.demo import ROOT, main_py, prepare, run, start, wait

VARIANT_DIR = ROOT / "configs" / "demo" / "ablation"
CURVE_TAGS = ("val/soft_f1", "val/map/map", "val/map")  # the first present in a run is drawn


def available_variants() -> list[str]:
    """The variant names with a config in ``configs/demo/ablation`` (sorted)."""
    return sorted(p.stem for p in VARIANT_DIR.glob("*.yaml"))


def variant_config(name: str) -> Path:
    """``configs/demo/ablation/<name>.yaml``; an unknown name is refused with the list of known ones."""
    path = VARIANT_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"ablation: no variant {name!r} (no {path.relative_to(ROOT)}); known variants: "
                         f"{', '.join(available_variants())}")
    return path


def fit_args(base: str, variant: str, out: Path, sft_model: Path, max_steps: int | None) -> list[str]:
    """The ``main.py fit`` arguments of one variant: its overlay on ``base``, its own folder, the SFT start."""
    # the run's checkpoints, TensorBoard versions and export all follow default_root_dir (OUT/<variant>/…)
    args = ["fit", "--config", base, "--config", str(variant_config(variant).relative_to(ROOT)),
            "--trainer.default_root_dir", str(out / variant),
            "--model.init_args.policy.name_or_path", str(sft_model),
            "--model.init_args.overwrite_export", "true"]
    if max_steps is not None:
        args += ["--trainer.max_steps", str(max_steps)]
    return args


def predict_args(model: Path, output: Path, shuffled: bool) -> list[str]:
    """Greedy held-out grounding answers of ``model`` on own or deranged images (``configs/demo/predict.yaml``)."""
    args = ["predict", "--config", "configs/demo/predict.yaml", "--model.init_args.policy.name_or_path", str(model),
            "--trainer.callbacks.init_args.output", str(output), "--trainer.callbacks.init_args.resume", "false",
            "--data.init_args.tasks", "[abnormality_grounding]"]
    if shuffled:
        args += ["--data.init_args.shuffle_images", "0"]
    return args


def read_rows(path: Path) -> list[dict]:
    """Prediction rows of a JSONL file, sorted by id (lines that are not records — e.g. a header — skipped)."""
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if isinstance(row, dict) and "id" in row and "answer" in row:
                rows.append(row)
    return sorted(rows, key=lambda r: r["id"])


def summarise(own: dict[str, list[dict]], shuffled: dict[str, list[dict]], seconds: dict[str, float],
              reference: str, n_boot: int = 2000, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per variant: own / shuffled / image-dependent soft-F1 and mAP@0.5 (``image_dependence``), the paired
    difference of the image-dependent soft-F1 and mAP against ``reference`` (``paired_gain``; absent for the
    reference itself), the mean answer length in characters and the wall time."""
    from radvlm_tools.shuffle_control import image_dependence, paired_gain

    entries = {name: image_dependence(own[name], shuffled[name], n_boot, seed) for name in own}
    out: dict[str, dict[str, Any]] = {}
    for name, entry in entries.items():
        row: dict[str, Any] = {"n": entry["n"], "soft_f1": entry["soft_f1"], "map": entry["map"],
                               "answer_chars": float(np.mean([len(r["answer"]) for r in own[name]])),
                               "seconds": seconds.get(name, math.nan)}
        if name != reference and reference in entries:
            row["vs_reference"] = {k: paired_gain(entries[reference], entry, k, n_boot, seed)
                                   for k in ("soft_f1_image", "map_image")}
        out[name] = row
    return out


def _ci(value: float, low: float, high: float) -> str:
    return f"{value:+.3f} ({low:+.3f} … {high:+.3f})"


def format_table(summary: dict[str, dict[str, Any]], reference: str) -> str:
    """The ablation table (Markdown): one row per variant."""
    head = ("| variant | soft-F1 own | shuffled | image-dependent (95 % CI) | mAP@0.5 own | shuffled | "
            f"image-dependent (95 % CI) | image-dep. soft-F1 − {reference} (95 % CI) | answer chars | time s |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in summary.items():
        cells = []
        for key in ("soft_f1", "map"):
            m = row[key]
            cells += [f"{m['own']:.3f}", f"{m['shuffled']:.3f}", _ci(m["image"], m["ci95_low"], m["ci95_high"])]
        d = row.get("vs_reference", {}).get("soft_f1_image")
        cells.append(_ci(d["delta"], d["ci95_low"], d["ci95_high"]) if d else "(reference)")
        cells += [f"{row['answer_chars']:.0f}", f"{row['seconds']:.0f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_curves(tensorboard_dir: Path, names: Sequence[str],
                tags: Sequence[str] = CURVE_TAGS) -> tuple[str | None, dict[str, list[tuple[int, float]]]]:
    """The validation curve of each variant from the TensorBoard versions of its run ``tensorboard_dir/<name>/version_*``: the
    first of ``tags`` logged by any run, and per variant its ``(step, value)`` points (versions merged, sorted)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name in names:
        points: dict[str, dict[int, float]] = {}
        for version in sorted((tensorboard_dir / name).glob("version_*")):
            acc = EventAccumulator(str(version), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                for event in acc.Scalars(tag):
                    points.setdefault(tag, {})[event.step] = event.value
        scalars[name] = {tag: sorted(p.items()) for tag, p in points.items()}
    for tag in tags:
        if any(tag in s for s in scalars.values()):
            return tag, {name: s.get(tag, []) for name, s in scalars.items()}
    return None, {name: [] for name in names}


def plot_curves(tag: str, curves: dict[str, list[tuple[int, float]]], path: Path) -> Path:
    """One PNG with every variant's validation curve on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in curves.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o", markersize=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(tag)
    ax.set_title("validation (held-out grounding), every variant from the same SFT model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m radvlm_tools.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo/grpo.yaml", help="the base GRPO config")
    parser.add_argument("--variants", nargs="+",
                        help="names in configs/demo/ablation (the first is the reference of the paired column); "
                             "default: all of them, grpo first")
    parser.add_argument("--out", default="runs/ablation", help="output folder")
    parser.add_argument("--sft-model", default="runs/demo/sft/hf_export",
                        help="the SFT export every variant starts from (made by the demo's SFT stage if missing)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per variant (default: the base config's)")
    args = parser.parse_args(argv)
    args.variants = args.variants or sorted(available_variants(), key=lambda n: (n != "grpo", n))
    for name in args.variants:
        variant_config(name)  # refuse an unknown name before anything runs
    out, sft_model = ROOT / args.out, ROOT / args.sft_model
    out.mkdir(parents=True, exist_ok=True)
    if not (sft_model / "config.json").is_file():
        prepare(ROOT / "runs" / "demo")
        run(main_py("fit", "--config", "configs/demo/sft.yaml", "--model.init_args.overwrite_export", "true"),
            "SFT (the start of every variant)")
    seconds: dict[str, float] = {}
    own_files: dict[str, Path] = {}
    shuffled_files: dict[str, Path] = {}

    def predictions(name: str) -> None:
        """The variant's two prediction sets, one after the other (beside the next variant's fit)."""
        for shuffled in (False, True):
            path = out / "predictions" / f"{name}{'_shuffled' if shuffled else ''}.jsonl"
            path.unlink(missing_ok=True)
            (shuffled_files if shuffled else own_files)[name] = path
            what = f"held-out predictions ({name}, {'shuffled' if shuffled else 'own'} images)"
            log = path.with_suffix(".log")
            wait(start(main_py(*predict_args(out / name / "hf_export", path, shuffled)), what, log), what, log)

    previous = None
    for name in args.variants:  # two cores: variant k's fit runs beside variant k-1's predictions
        t0 = time.perf_counter()
        log = out / name / "fit.log"
        fit = start(main_py(*fit_args(args.config, name, out, sft_model, args.max_steps)), f"GRPO variant {name}",
                    log)
        try:
            if previous is not None:
                predictions(previous)
        except BaseException:  # a failed prediction (or Ctrl-C) does not leave the fit running on its own
            fit.terminate()
            fit.wait()
            raise
        wait(fit, f"GRPO variant {name}", log)
        seconds[name] = time.perf_counter() - t0
        previous = name
    predictions(previous)
    summary = summarise({n: read_rows(p) for n, p in own_files.items()},
                        {n: read_rows(p) for n, p in shuffled_files.items()}, seconds, args.variants[0])
    tag, curves = read_curves(out, args.variants)
    result: dict[str, Any] = {"variants": summary, "reference": args.variants[0], "base_config": args.config}
    if tag is not None:
        result["curves_png"] = str(plot_curves(tag, curves, out / "curves.png"))
        result["curve_tag"] = tag
    (out / "ablation.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    print("\n" + format_table(summary, args.variants[0]))
    print(f"\nnumbers: {out / 'ablation.json'}" + (f"\ncurves ({tag}): {out / 'curves.png'}" if tag else
                                                     "\nno validation curve was logged: no PNG"))
    return result


if __name__ == "__main__":
    main()
