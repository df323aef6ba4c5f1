"""Shuffle control: how much of a grounding score comes from the image, and how much from a prior.

A model that ignores the image can still score: it names the findings that are common at the places where
they usually are. The control scores the same records twice, once with their own images and once with the
images permuted among them (``datamodules.shuffle``), and reports per model

    own        soft-F1 / mAP@0.5 with each record's own image
    shuffled   the same records (prompts, references) answered on another record's image
    image-dependent = own − shuffled, paired by record id, with a 95 % percentile bootstrap CI

A score that survives the shuffle is prior; only the difference is grounding learned from the image
(``image_dependence``; ``paired_gain`` compares two models, e.g. GRPO − SFT). Not in the paper, which has no
such control.

    python -m radvlm_tools.shuffle_control permute SRC.json DST.json [--seed 0] [--tasks abnormality_grounding]
    python -m radvlm_tools.shuffle_control score OWN.jsonl SHUFFLED.jsonl [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.shuffle import shuffle_images
from radvlm_tools.bootstrap import bootstrap_ci

N_BOOT = 2000
SEED = 0


def write_shuffled_records(src: str | Path, dst: str | Path, seed: int, tasks: Sequence[str] | None = None,
                           image_root: str | Path | None = None) -> Path:
    """Read a RadVLM JSON/JSONL file, keep ``tasks`` (all when ``None``), derange the images (``shuffle_images``)
    and write the records to ``dst`` (.json or .jsonl) with absolute image paths; return ``dst``.

    Then: ``python main.py predict ... --data.init_args.predict_files [DST]``."""
    from datamodules.records import load_records, save_records
    from radvlm.tasks import canonical_tasks

    records = load_records(src, image_root=image_root, check_images=False)
    if tasks is not None:
        keep = set(canonical_tasks(list(tasks)))
        records = [r for r in records if r.task in keep]
    return save_records([r.to_dict() for r in shuffle_images(records, seed)], dst)


def paired_difference(a: Any, b: Any, n_boot: int = N_BOOT, seed: int = SEED) -> dict[str, float]:
    """Mean of the paired differences ``a − b`` (same length, row i of both is the same record) and its 95 %
    percentile bootstrap CI: ``{"delta", "ci95_low", "ci95_high", "n"}``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need two 1-d arrays of one length, got {a.shape} and {b.shape}")
    diff = a - b  # (n,)
    if diff.size == 0:
        return {"delta": float("nan"), "ci95_low": float("nan"), "ci95_high": float("nan"), "n": 0}
    lo, hi = bootstrap_ci(diff, np.mean, n=n_boot, seed=seed)
    return {"delta": float(diff.mean()), "ci95_low": lo, "ci95_high": hi, "n": int(diff.size)}


def _box_scores(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """{id: {"soft_f1", "map"}} of the box-task rows (answer as ``radvlm_tools.evaluate`` scores it)."""
    from metrics.grounding import GroundingMAP, SoftF1
    from radvlm.tasks import is_box_task
    from radvlm_tools.prediction_files import scored_answer

    rows = [r for r in rows if is_box_task(r["task"])]
    preds, refs = [scored_answer(r) for r in rows], [r["reference"] for r in rows]
    f1 = SoftF1().score(preds, refs).tolist() if rows else []
    ap = GroundingMAP().score(preds, refs).tolist() if rows else []
    return {str(r["id"]): {"soft_f1": f, "map": a} for r, f, a in zip(rows, f1, ap)}


def per_record(own_rows: Sequence[dict], shuffled_rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """{id: {"soft_f1", "soft_f1_shuffled", "soft_f1_image", "map", "map_shuffled", "map_image"}} for the
    box-task records present in both sets (``*_image`` = own − shuffled). A record of one set only is an error:
    the control compares the very same records."""
    own, shuf = _box_scores(own_rows), _box_scores(shuffled_rows)
    if own.keys() != shuf.keys():
        missing = sorted(own.keys() ^ shuf.keys())
        raise ValueError(f"own and shuffled predictions hold other box-task records ({len(missing)} differ, "
                         f"e.g. {missing[:3]}): predict both on the same records")
    out = {}
    for i in sorted(own):
        row = {}
        for key in ("soft_f1", "map"):
            row[key], row[f"{key}_shuffled"] = own[i][key], shuf[i][key]
            row[f"{key}_image"] = own[i][key] - shuf[i][key]
        out[i] = row
    return out


def image_dependence(own_rows: Sequence[dict], shuffled_rows: Sequence[dict], n_boot: int = N_BOOT,
                     seed: int = SEED) -> dict[str, Any]:
    """One model's shuffle-control entry: for soft-F1 and mAP@0.5 the own-image and shuffled-image means and the
    image-dependent part (own − shuffled, paired) with its 95 % bootstrap CI; ``per_record`` keeps the series
    for paired comparisons between models (``paired_gain``)."""
    rows = per_record(own_rows, shuffled_rows)
    out: dict[str, Any] = {"n": len(rows)}
    for key in ("soft_f1", "map"):
        own = np.array([r[key] for r in rows.values()])  # (n,)
        shuf = np.array([r[f"{key}_shuffled"] for r in rows.values()])  # (n,)
        d = paired_difference(own, shuf, n_boot, seed)
        out[key] = {"own": float(own.mean()) if own.size else float("nan"),
                    "shuffled": float(shuf.mean()) if shuf.size else float("nan"),
                    "image": d["delta"], "ci95_low": d["ci95_low"], "ci95_high": d["ci95_high"]}
    out["per_record"] = rows
    return out


def paired_gain(before: dict[str, Any], after: dict[str, Any], key: str, n_boot: int = N_BOOT,
                seed: int = SEED) -> dict[str, float]:
    """``after − before`` of the per-record series ``key`` (e.g. ``soft_f1_image``, ``map``) of two
    ``image_dependence`` entries, paired on their common record ids, with its bootstrap CI."""
    ids = sorted(before["per_record"].keys() & after["per_record"].keys())
    a = [after["per_record"][i][key] for i in ids]
    b = [before["per_record"][i][key] for i in ids]
    return paired_difference(a, b, n_boot, seed)


def format_rows(entries: dict[str, dict[str, Any]]) -> str:
    """Markdown table: per model own / shuffled / image-dependent soft-F1 and mAP@0.5 with the paired CIs."""
    head = ("| model | soft-F1 own | soft-F1 shuffled | soft-F1 image-dependent (95 % CI) | mAP@0.5 own | "
            "mAP@0.5 shuffled | mAP@0.5 image-dependent (95 % CI) |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, e in entries.items():
        cells = []
        for key in ("soft_f1", "map"):
            m = e[key]
            cells += [f"{m['own']:.3f}", f"{m['shuffled']:.3f}",
                      f"**{m['image']:+.3f}** ({m['ci95_low']:+.3f} … {m['ci95_high']:+.3f})"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read(path: str | Path) -> list[dict]:
    from radvlm_tools.prediction_files import read_prediction_file

    return read_prediction_file(path).rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(prog="python -m radvlm_tools.shuffle_control",
                                     description="Shuffle control: image-dependent grounding scores.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("permute", help="write a copy of a record file with the images deranged among records")
    p.add_argument("src", help="RadVLM .json/.jsonl records")
    p.add_argument("dst", help="output .json/.jsonl (absolute image paths)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--tasks", nargs="+", help="keep only these tasks (e.g. abnormality_grounding)")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the file's folder)")
    s = sub.add_parser("score", help="own vs shuffled predictions of one model: image-dependent soft-F1 / mAP")
    s.add_argument("own", help="predictions JSONL on the records' own images")
    s.add_argument("shuffled", help="predictions JSONL on the permuted-images record file")
    s.add_argument("--name", default="model")
    s.add_argument("--bootstrap", type=int, default=N_BOOT)
    s.add_argument("--seed", type=int, default=SEED)
    s.add_argument("--json", help="write the entry (without per-record values) here")
    args = parser.parse_args(argv)
    if args.command == "permute":
        path = write_shuffled_records(args.src, args.dst, args.seed, args.tasks, args.image_root)
        print(f"wrote {path} (images deranged with seed {args.seed})")
        return None
    entry = image_dependence(_read(args.own), _read(args.shuffled), args.bootstrap, args.seed)
    print(format_rows({args.name: entry}))
    brief = {k: v for k, v in entry.items() if k != "per_record"}
    if args.json:
        Path(args.json).write_text(json.dumps(brief, indent=2) + "\n")
    return brief


if __name__ == "__main__":
    main()
