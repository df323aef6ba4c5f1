"""Paper-style evaluation of prediction files: per task the columns of the paper's tables (docs/paper.md §5, §6,
§8b) with 95 % bootstrap confidence intervals, several runs side by side, per-sample scores and box pictures.

    python -m radvlm_tools.evaluate PRED.jsonl [more.jsonl | RADVLM_output.json ...] [--shuffled SHUF.jsonl ...]
        [--task TASK]
        [--format auto|jsonl|radvlm|radvlm-jsonl] [--keys answer=output,...] [--json OUT.json] [--draw N DIR]
        [--bootstrap 2000] [--seed 0] [--metrics-config FILE ...] [--device cpu] [--offline | --online]

Input: the JSONL of ``main.py predict`` or RadVLM's ``{model}_{task}_output.json``
(``radvlm_tools.prediction_files``). Output: a Markdown table (``radvlm_tools.eval_tables``), a JSON file and
next to each input ``<input>.scored.jsonl`` (its rows with per-sample ``scores``; ``null``: unavailable or
undefined).
Values come from the metric classes used for training (``score`` per sample) with the same NaN-ignoring
aggregates; the model-based ones (BERTScore, CheXbert, RadGraph, RadCliQ-v1, GREEN) from the ``class_path``
entries of ``configs/eval_metrics/default.yaml`` and ``--metrics-config`` layers (``radvlm_tools.eval_metrics``).

Not in the paper: mAP and mean IoU parse answers with RadVLM's evaluation regex, soft-F1 with the reward's
parser; duplicate ids (a multi-GPU predict pads its last batch) keep their first line and are counted; GLEU,
average characters and the answer-length change (a reward-hacking signal) are ours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radvlm import tasks
from radvlm_tools.bootstrap import bootstrap_ci
from radvlm_tools.draw import write_pictures
from radvlm_tools.eval_metrics import Layer, Scorers, Unavailable
from radvlm_tools.eval_tables import COLUMNS, UNDEFINED, Column, format_table, length_changes
from radvlm_tools.prediction_files import read_prediction_file, scored_answer
from radvlm_tools.shuffle_control import format_rows, image_dependence

NAN = float("nan")


def nan_mean(v: np.ndarray) -> float:  # (N,) -> mean of the finite values (PerSampleMetric.compute)
    finite = v[np.isfinite(v)]
    return float(finite.mean()) if finite.size else NAN


def inverse_mean(v: np.ndarray) -> float:  # (N,) -> 1 / mean of the finite values: RadEval's RadCliQ aggregate
    mean = nan_mean(v)
    return 1.0 / mean if mean != 0 else math.nan


def ratio_of_sums(v: np.ndarray) -> float:  # (N, 2) -> sum(col 0) / sum(col 1): GroundingMAP's mean IoU
    """GroundingMAP's mean IoU: 0 when no sample has a predicted x ground-truth pair, NaN without samples."""
    den = float(v[:, 1].sum())
    return float(v[:, 0].sum()) / den if den > 0 else (0.0 if len(v) else NAN)


def chexbert_stat(subset: Sequence[int] | None, which: int) -> Callable[[np.ndarray], float]:
    """(N, 2, 14) bool positives (prediction, reference) -> micro (which=0) or macro (1) F1 on ``subset``."""
    from metrics.chexbert import micro_macro_f1

    cols = list(subset) if subset is not None else slice(None)
    return lambda v: float(micro_macro_f1(torch.from_numpy(v[:, 0][:, cols]),
                                          torch.from_numpy(v[:, 1][:, cols]))[which])


def task_kind(task: str) -> str:
    """``"grounding"`` (box tasks of ``radvlm.tasks``: grounding and detection), ``"report"``,
    ``"classification"`` or ``"text"`` (everything else)."""
    kind = tasks.task_kind(task)
    return kind if kind in ("grounding", "report", "classification") else "text"


# ------------------------------------------------------------------------------------------- scoring a task
@dataclass
class Scored:
    """Per column: per-sample data and its statistic, or why it is unavailable; per-sample file values."""

    data: dict[str, np.ndarray]
    stats: dict[str, Callable[[np.ndarray], float]]
    unavailable: dict[str, Unavailable]
    per_sample: dict[str, np.ndarray]  # (N,) each, NaN written as null
    ceilings: dict[str, float] = field(default_factory=dict)  # what a perfect answer set scores per column
    info: dict[str, Any] = field(default_factory=dict)  # facts of the task's records shown with the table


def _vector(values: Any) -> np.ndarray:  # (N,) float64
    return torch.as_tensor(values, dtype=torch.float64).reshape(-1).cpu().numpy()


def _mean_column(s: Scored, key: str, values: np.ndarray, sample_key: str | None = None) -> None:
    s.data[key], s.per_sample[sample_key or key], s.stats[key] = values, values, nan_mean


def _model_column(s: Scored, keys: Sequence[str], scorers: Scorers, name: str,
                  run: Callable[[Any], Any]) -> Any:
    """``run(metric)`` for model-based columns; None (columns marked unavailable) when it cannot be scored."""
    try:
        out = run(scorers.model_metric(name))
        if out is None or (isinstance(out, np.ndarray) and out.size and np.isnan(out).all()):
            raise Unavailable("no sample could be scored (see the warnings above)")
        return out
    except Unavailable as exc:
        s.unavailable.update(dict.fromkeys(keys, exc))
        return None


def score_text(preds: list[str], refs: list[str], scorers: Scorers) -> Scored:
    s = Scored({}, {}, {}, {})
    _mean_column(s, "rouge_l", _vector(scorers.rouge_l.score(preds, refs)))
    _mean_column(s, "gleu", _vector(scorers.gleu.score(preds, refs)))
    _mean_column(s, "chars", np.array([len(p) for p in preds], dtype=np.float64))
    return s


def score_reports(preds: list[str], refs: list[str], scorers: Scorers) -> Scored:
    """ROUGE-L, GLEU, characters, BERTScore, RadGraph-F1, RadCliQ-v1, CheXbert F1 micro / macro over 14 and 5
    observations (``metrics.chexbert.micro_macro_f1`` recomputed per resample from the (N, 2, 14) labels), GREEN
    and, when configured, RadEval's RadCliQ-v1; a model-based column that cannot be scored is unavailable."""
    from metrics.chexbert import SUBSET_5_INDEX, positive, sample_f1

    s = score_text(preds, refs, scorers)
    for key, name in (("bertscore", "bertscore"), ("radgraph_f1", "radgraph"), ("radcliq", "radcliq")):
        values = _model_column(s, [key], scorers, name, lambda m: _vector(m.score(preds, refs)))
        if values is not None:
            _mean_column(s, key, values)
    keys = [f"chexbert_{w}_{k}" for k in (14, 5) for w in ("micro", "macro")]
    out = _model_column(s, keys, scorers, "chexbert", lambda m: m.outputs(preds, refs))
    if out is not None:
        pred_pos, ref_pos = positive(out[0].cpu()), positive(out[1].cpu())  # (N, 14) bool each
        labels = torch.stack([pred_pos, ref_pos], dim=1).numpy()  # (N, 2, 14)
        for key in keys:
            s.data[key] = labels
            s.stats[key] = chexbert_stat(SUBSET_5_INDEX if key.endswith("_5") else None, int("macro" in key))
        s.per_sample["chexbert_f1"] = _vector(sample_f1(pred_pos, ref_pos))
    _judged_columns(s, preds, refs, scorers)
    return s


def _judged_columns(s: Scored, preds: list[str], refs: list[str], scorers: Scorers) -> None:
    """GREEN (NaN = unparsable or failed judge output, counted in a note) and, on request, RadEval's RadCliQ."""
    def green(m: Any) -> np.ndarray:
        before = dict(m.stats)
        values = _vector(m.score(preds, refs))
        bad = {k: m.stats[k] - before.get(k, 0) for k in ("unparsable", "failed")}
        if any(bad.values()):
            scorers.notes.append(f"GREEN ({m.judge_name()}): of {len(preds)} report pairs, {bad['unparsable']} judge "
                                 f"outputs could not be parsed and {bad['failed']} judge calls failed (NaN, left out)")
        return values

    if (values := _model_column(s, ["green"], scorers, "green", green)) is not None:
        _mean_column(s, "green", values)
    if scorers.configured("radcliq_radeval"):
        values = _model_column(s, ["radcliq_radeval"], scorers, "radcliq_radeval",
                               lambda m: _vector(m.score(preds, refs)))
        if values is not None:
            s.data["radcliq_radeval"], s.per_sample["radcliq_radeval"] = values, values
            s.stats["radcliq_radeval"] = inverse_mean


def row_gt_boxes(row: dict) -> list | None:
    """A row's ground-truth boxes for scoring: the record's unrounded ``gt_boxes``; None (each metric parses the
    reference text with its own box style) when the row has none or they were parsed from the reference
    (``gt_boxes_from: reference``, written by ``main.py predict``)."""
    return None if row.get("gt_boxes_from") == "reference" else (row.get("gt_boxes") or None)


def score_grounding(preds: list[str], refs: list[str], scorers: Scorers,
                    rows: Sequence[dict] | None = None) -> Scored:
    """mAP@0.5 and mean IoU (``GroundingMAP``: RadVLM's evaluation box parsing) and soft-F1 (``SoftF1``: the
    reward's parsing) against each row's unrounded ``gt_boxes`` (the record's ``boxes``, written by
    ``main.py predict``) when non-empty, else against the boxes of the reference text. Each column's ceiling
    (``metrics.grounding.perfect_scores``: the score of answers equal to the ground truth, with RadVLM's rules
    for records without finding and for mean IoU) goes to ``ceilings``, the number of such records to ``info``."""
    from metrics.grounding import ground_truth, perfect_scores

    gt = [row_gt_boxes(r) for r in rows] if rows is not None else None  # per sample, None: the text's
    s = Scored({}, {}, {}, {})
    gmap, sf1 = scorers.grounding_map, scorers.soft_f1
    by_map = perfect_scores(ground_truth(refs, gt, gmap.box_style), gmap.iou_threshold)
    by_f1 = perfect_scores(ground_truth(refs, gt, sf1.box_style), min_iou=sf1.min_iou)
    s.ceilings.update(map=by_map["map"], mean_iou=by_map["mean_iou"], soft_f1=by_f1["soft_f1"])
    s.info["no_finding_records"] = by_map["no_finding"]
    _mean_column(s, "map", _vector(scorers.grounding_map.score(preds, refs, gt)), sample_key="ap")
    _mean_column(s, "soft_f1", _vector(scorers.soft_f1.score(preds, refs, gt)))
    _mean_column(s, "chars", np.array([len(p) for p in preds], dtype=np.float64))
    # (N, 2): IoU sum and number of predicted x ground-truth pairs of each sample
    pairs = np.array(scorers.grounding_map.iou_pairs(preds, refs, gt), dtype=np.float64).reshape(-1, 2)
    s.data["mean_iou"], s.stats["mean_iou"] = pairs, ratio_of_sums
    with np.errstate(invalid="ignore", divide="ignore"):
        s.per_sample["iou"] = pairs[:, 0] / pairs[:, 1]  # NaN without pairs
    return s


def classification_stat(key: str) -> Callable[[np.ndarray], float]:
    """(N, 2, L) bool labels (prediction, truth) -> ``key`` of ``metrics.classification.precision_recall_f1``
    (``micro_f1``, ``macro_precision`` ...)."""
    from metrics.classification import counts, precision_recall_f1

    return lambda v: float(precision_recall_f1(*counts(torch.from_numpy(v[:, 0]), torch.from_numpy(v[:, 1])))[key])


def score_classification(preds: list[str], refs: list[str], scorers: Scorers,
                         rows: Sequence[dict] | None = None) -> Scored:
    """Micro and macro precision, recall and F1 of RadVLM's abnormality classification: truth = each row's
    ``labels``, label set = the rows' ``pathologies`` (``metrics.classification.record_indicators``; the values
    ``AbnormalityClassification`` computes)."""
    from metrics.classification import record_indicators, sample_f1

    rows = list(rows) if rows is not None else [{} for _ in preds]
    _, pred, true = record_indicators(preds, refs, [r.get("labels") for r in rows],
                                      [r.get("pathologies") for r in rows])
    labels = torch.stack([pred, true], dim=1).numpy()  # (N, 2, L)
    s = Scored({}, {}, {}, {})
    for avg in ("micro", "macro"):
        for name in ("precision", "recall", "f1"):
            s.data[f"{avg}_{name}"], s.stats[f"{avg}_{name}"] = labels, classification_stat(f"{avg}_{name}")
    s.per_sample["label_f1"] = _vector(sample_f1(torch.from_numpy(labels[:, 0]), torch.from_numpy(labels[:, 1])))
    _mean_column(s, "chars", np.array([len(p) for p in preds], dtype=np.float64))
    return s


#: kind of task -> scoring function ``(preds, refs, scorers, rows)``; ``rows`` are the task's prediction rows
SCORE_FNS: dict[str, Callable[[list[str], list[str], Scorers, Sequence[dict]], Scored]] = {
    "report": lambda preds, refs, scorers, rows: score_reports(preds, refs, scorers),
    "grounding": score_grounding,
    "classification": score_classification,
    "text": lambda preds, refs, scorers, rows: score_text(preds, refs, scorers),
}


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def summarise(scored: Scored, columns: Sequence[Column], n_boot: int, seed: int,
              alpha: float) -> dict[str, dict]:
    """Per column: value, CI and number of scored samples, or the reason it is unavailable / undefined."""
    out: dict[str, dict] = {}
    for col in columns:
        entry: dict[str, Any] = {"label": col.label, "lower_is_better": col.lower_is_better}
        if col.key in scored.unavailable:
            exc = scored.unavailable[col.key]
            out[col.key] = {**entry, "value": None, "unavailable": exc.reason, "detail": exc.detail}
            continue
        if col.key not in scored.data:  # a column this scoring function does not produce: no row
            continue
        data, stat = scored.data[col.key], scored.stats[col.key]
        value, (lo, hi) = stat(data), bootstrap_ci(data, stat, n=n_boot, seed=seed, alpha=alpha)
        n = int(np.isfinite(data).sum()) if data.ndim == 1 else int(data.shape[0])
        out[col.key] = {**entry, "value": _num(value), "ci": [_num(lo), _num(hi)], "n": n}
        if col.key in scored.ceilings:
            out[col.key]["ceiling"] = _num(scored.ceilings[col.key])
        if col.meaning:
            out[col.key]["meaning"] = col.meaning
        if not math.isfinite(value):
            out[col.key]["undefined"] = UNDEFINED.get(col.key, "no sample has a value")
    return out


# ------------------------------------------------------------------------------------------ prediction files
def read_predictions(path: str | Path, default_task: str | None = None, fmt: str = "auto",
                     keys: str | dict[str, str] | None = None) -> tuple[list[dict], int]:
    """Rows of a prediction file (ours or RadVLM's, ``radvlm_tools.prediction_files``) sorted by id, and the number of
    duplicate-id rows dropped."""
    read = read_prediction_file(path, default_task, fmt, keys)
    return read.rows, read.duplicates


def file_stem(path: str | Path) -> str:
    """The file name without ``.jsonl`` / ``.json``."""
    return Path(path).name.removesuffix(".jsonl").removesuffix(".json")


def scored_path_for(path: str | Path) -> Path:
    return Path(path).with_name(file_stem(path) + ".scored.jsonl")


def _info(rows: list[dict]) -> dict[str, float]:
    info = {"truncated_frac": float(np.mean([bool(r.get("truncated")) for r in rows]))}
    if any(r.get("thinking") for r in rows):
        info["think_closed_frac"] = float(np.mean([bool(r.get("think_closed", True)) for r in rows]))
    tokens = [r["completion_tokens"] for r in rows if isinstance(r.get("completion_tokens"), int)]
    if tokens:
        info["completion_tokens_mean"] = float(np.mean(tokens))
    return info


def evaluate_file(path: str | Path, metrics: Scorers | Layer | Sequence[Layer] | None = None, n_boot: int = 2000,
                  seed: int = 0, alpha: float = 0.05, default_task: str | None = None,
                  write_scored: bool = True, fmt: str = "auto", keys: str | dict[str, str] | None = None
                  ) -> dict[str, Any]:
    """Evaluate one predictions file: ``{"file", "name", "n", "tasks": {task: {"kind", "n", "info",
    "metrics": {key: {"label", "value", "ci", "n"} or {..., "unavailable", "detail"}}}}, "notes", ...}``;
    writes ``<path>.scored.jsonl`` unless ``write_scored`` is False. ``metrics``: a ``Scorers`` (pass one for
    several files so that each model is loaded once) or metrics-config layers (``eval_metrics.load_config``).
    ``fmt``, ``keys``, ``default_task``: ``radvlm_tools.prediction_files``. Rows are sorted by id first, so a
    resumed prediction file (other line order) gives the same intervals."""
    scorers = metrics if isinstance(metrics, Scorers) else Scorers(metrics)
    read = read_prediction_file(path, default_task, fmt, keys)
    rows, duplicates = read.rows, read.duplicates
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    result: dict[str, Any] = {"file": str(path), "name": file_stem(path), "format": read.format,
                              "n": len(rows), "duplicates_dropped": duplicates, "tasks": {}}
    scores: dict[str, dict[str, float | None]] = {}
    for task, task_rows in sorted(by_task.items()):
        kind = task_kind(task)
        preds, refs = [scored_answer(r) for r in task_rows], [r["reference"] for r in task_rows]
        scored = SCORE_FNS[kind](preds, refs, scorers, task_rows)
        result["tasks"][task] = {"kind": kind, "n": len(task_rows), "info": {**_info(task_rows), **scored.info},
                                 "metrics": summarise(scored, COLUMNS[kind], n_boot, seed, alpha)}
        for i, row in enumerate(task_rows):
            scores[str(row["id"])] = {k: _num(float(v[i])) for k, v in scored.per_sample.items()}
    notes = list(scorers.notes) + ([read.describe()] if read.format != "jsonl" or read.header else [])
    if duplicates:
        notes.append(f"{result['name']}: {duplicates} lines with an id seen before were ignored")
    result.update(notes=notes, metrics_config=scorers.config_dict(),
                  bootstrap={"n": n_boot, "seed": seed, "alpha": alpha, "method": "percentile"})
    if write_scored:
        out = scored_path_for(path)
        out.write_text("".join(json.dumps({**r, "scores": scores[str(r["id"])]}) + "\n" for r in rows),
                       encoding="utf-8")
        result["scored_file"] = str(out)
    return result


# ------------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m radvlm_tools.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("predictions", nargs="+", help="prediction files: JSONL of main.py predict or RadVLM's "
                   "*_output.json (several: comparison)")
    p.add_argument("--json", help="output JSON (default: <first input>.eval.json)")
    p.add_argument("--draw", nargs=2, metavar=("N", "OUT_DIR"), help="write N grounding pictures per file")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level (default 0.05)")
    p.add_argument("--task", "--default-task", dest="default_task",
                   help="task of rows that name none (every row of a RadVLM output whose file name names none)")
    p.add_argument("--format", dest="fmt", default="auto", choices=("auto", "jsonl", "radvlm", "radvlm-jsonl"),
                   help="input format of every file (default auto: detected per file)")
    p.add_argument("--keys", help="RadVLM key mapping OURS=THEIRS,... (default answer=output, reference=txt for "
                   "reports / answer otherwise, gt_boxes=boxes, labels=labels, image=img_path, prompt=instr)")
    p.add_argument("--no-scored", action="store_true", help="do not write <input>.scored.jsonl")
    p.add_argument("--shuffled", nargs="+", metavar="SHUF", help="shuffle control: one prediction file per input, "
                   "the same records answered on other images (main.py predict --data.init_args.shuffle_images "
                   "SEED); adds own / shuffled / image-dependent soft-F1 and mAP@0.5 with paired 95 %% CIs")
    p.add_argument("--metrics-config", action="append", default=[], metavar="FILE",
                   help="YAML/JSON of class_path entries layered over configs/eval_metrics/default.yaml (repeatable; "
                   "e.g. configs/eval_metrics/radeval.yaml adds RadEval's RadCliQ-v1)")
    p.add_argument("--device", help="device of the model-based metrics (default: the config's; cuda when available)")
    hub = p.add_mutually_exclusive_group()
    hub.add_argument("--offline", dest="offline", action="store_const", const=True, default=None,
                     help="Hugging Face hub offline (the default unless RADVLM_ALLOW_DOWNLOADS=1)")
    hub.add_argument("--online", dest="offline", action="store_const", const=False,
                     help="allow the metrics to download weights")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.shuffled and len(args.shuffled) != len(args.predictions):
        parser.error(f"--shuffled needs one file per prediction file: {len(args.predictions)} predictions, "
                     f"{len(args.shuffled)} shuffled")
    scorers = Scorers(args.metrics_config, device=args.device, offline=args.offline)
    runs = [evaluate_file(p, scorers, n_boot=args.bootstrap, seed=args.seed, alpha=args.alpha,
                          default_task=args.default_task, write_scored=not args.no_scored, fmt=args.fmt,
                          keys=args.keys)
            for p in args.predictions]
    if len({r["name"] for r in runs}) < len(runs):  # the same file name in several folders: use the paths
        for r in runs:
            r["name"] = r["file"]
    print(format_table(runs))
    if args.shuffled:
        control = {r["name"]: image_dependence(read_predictions(own, args.default_task, args.fmt, args.keys)[0],
                                               read_predictions(shuf, args.default_task, args.fmt, args.keys)[0],
                                               n_boot=args.bootstrap, seed=args.seed)
                   for r, own, shuf in zip(runs, args.predictions, args.shuffled)}
        print("\nShuffle control (box tasks; own − shuffled images, paired by record):\n" + format_rows(control))
        for r in runs:
            r["shuffle_control"] = {k: v for k, v in control[r["name"]].items() if k != "per_record"}
    output = runs[0] if len(runs) == 1 else {"runs": runs, "length_change": length_changes(runs)}
    first = Path(args.predictions[0])
    target = Path(args.json or first.with_name(file_stem(first) + ".eval.json"))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(output, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"JSON: {target}")
    if args.draw:
        n, out_dir = int(args.draw[0]), Path(args.draw[1])
        for p, r in zip(args.predictions, runs):
            rows = [row for row in read_predictions(p, args.default_task, args.fmt, args.keys)[0]
                    if task_kind(row["task"]) == "grounding" and row.get("image")]
            folder = out_dir / r["name"].replace(os.sep, "_") if len(runs) > 1 else out_dir
            written = write_pictures(rows[:n], folder)
            print(f"pictures: {len(written)} in {folder}")
    return output


if __name__ == "__main__":
    main()
