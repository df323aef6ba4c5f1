"""The Markdown tables of ``radvlm_tools.evaluate``: per task the paper's columns (``COLUMNS``, in the paper's
order, then ours) with value and 95 % CI per run, several runs side by side with the change against the first
run, and the change of the average answer length (a reward-hacking signal, ``length_changes``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

LENGTH_CHANGE_WARN = 0.20  # relative change of the average answer length flagged as a reward-hacking signal


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    percent: bool = True  # shown x 100 with one decimal, as in the paper's tables
    decimals: int = 1
    lower_is_better: bool = False
    meaning: str = ""  # what the number means where a rule of RadVLM's makes it less than it reads


    def show(self, value: float | None) -> str:
        if value is None or not math.isfinite(value):
            return "—"
        return f"{100 * value if self.percent else value:.{self.decimals}f}"


CHARS = Column("chars", "avg. characters", percent=False)
#: per kind of task, the rows of its table in the paper's column order (docs/paper.md §5, §6), then ours (GLEU,
#: length); a column a scoring function does not produce (GREEN without its judge) is left out of the table
COLUMNS = {
    "report": (Column("rouge_l", "ROUGE-L"), Column("bertscore", "BERTScore"),
               *(Column(f"chexbert_{w}_{k}", f"CheXbert F1 {w}-{k}") for k in (14, 5)
                 for w in ("micro", "macro")),
               Column("radgraph_f1", "RadGraph-F1"), Column("green", "GREEN"),
               Column("radcliq", "RadCliQ-v1 ↓", percent=False, decimals=2, lower_is_better=True),
               Column("radcliq_radeval", "RadCliQ-v1, RadEval variant (idf BERTScore; 1 / mean)", percent=False,
                      decimals=2),
               Column("gleu", "GLEU"), CHARS),
    "grounding": (Column("map", "mAP@0.5", meaning="RadVLM's per-record AP at IoU 0.5, averaged over records; a "
                         "record without a finding scores 0 even when answered correctly, so a perfect answer set "
                         "scores the ceiling, not 100"),
                  Column("mean_iou", "mean IoU", meaning="RadVLM's average IoU over ALL predicted × ground-truth "
                         "box pairs (Σ IoU / Σ n_pred·n_gt), not over matched pairs: a record with several boxes "
                         "pairs each box with the others too, so perfect answers score the ceiling, not 100"),
                  Column("soft_f1", "soft-F1", meaning="the authors' Hungarian soft-F1 (the GRPO reward), averaged "
                         "over records; a record without a finding scores 0 even when answered correctly"),
                  CHARS),
    "classification": (*(Column(f"{avg}_{name}", f"{avg} {label}") for avg in ("micro", "macro")
                         for name, label in (("precision", "precision"), ("recall", "recall"), ("f1", "F1"))),
                       CHARS),
    "text": (Column("rouge_l", "ROUGE-L"), Column("gleu", "GLEU"), CHARS),
}
#: why a column's value is undefined, where that is not "no sample has a value" (mean IoU without any
#: predicted × ground-truth pair is 0, as GroundingMAP defines it, so it has no entry)
UNDEFINED: dict[str, str] = {}


def length_changes(runs: Sequence[dict]) -> dict[str, dict[str, float | None]]:
    """Per task, each later run's relative change of average answer length vs the first run."""
    out: dict[str, dict[str, float | None]] = {}
    for task in runs[0]["tasks"]:
        chars = [r["tasks"].get(task, {}).get("metrics", {}).get("chars", {}).get("value") for r in runs]
        if chars[0] is not None and len(runs) > 1:
            base = chars[0]
            out[task] = {r["name"]: None if c is None else (c - base) / base if base > 0
                         else (0.0 if c == base else math.inf) for r, c in zip(runs[1:], chars[1:])}
    return out


def _length_line(task: str, runs: Sequence[dict], changes: dict[str, float | None]) -> str:
    chars = lambda r: r["tasks"][task]["metrics"]["chars"]["value"]  # noqa: E731
    parts = [f"{runs[0]['name']} {chars(runs[0]):.1f}"]
    parts += [f"{r['name']} {chars(r):.1f} ({changes[r['name']]:+.1%})" for r in runs[1:]
              if changes.get(r["name"]) is not None]
    flag = any(abs(c) > LENGTH_CHANGE_WARN for c in changes.values() if c is not None)
    warn = (f" — ⚠ length changed by more than {LENGTH_CHANGE_WARN:.0%}: a reward-hacking signal (a "
            "RadGraph-F1 reward alone shrank the paper's reports from 207 to 93 characters)") if flag else ""
    return f"Average answer length (characters): {' → '.join(parts)}{warn}"


def _cells(entry: dict | None, col: Column, footnotes: list[str]) -> list[str]:
    """[value, CI] of one metric entry; unavailable / undefined become a numbered footnote."""
    if entry is None:
        return ["", ""]
    for kind in ("unavailable", "undefined"):
        if kind in entry:
            note = f"{kind}: {entry[kind]}"
            if note not in footnotes:
                footnotes.append(note)
            return [f"{kind} [{footnotes.index(note) + 1}]", ""]
    lo, hi = entry["ci"]
    value = col.show(entry["value"])
    if "ceiling" in entry:  # beside the value: what a perfect answer set scores on these records
        value += f" (ceiling {col.show(entry['ceiling'])})"
    return [value, f"[{col.show(lo)}, {col.show(hi)}]" if None not in (lo, hi) else "—"]


def format_table(results: dict | Sequence[dict]) -> str:
    """Markdown: per task one table (rows = metrics, per run value and 95 % CI); several runs side by side
    with the change vs the first run and the average answer length change (reward-hacking signal)."""
    runs = [results] if isinstance(results, dict) else list(results)
    if not runs:
        raise ValueError("format_table needs at least one result")
    changes = length_changes(runs)
    out: list[str] = []
    for task in sorted({t for r in runs for t in r["tasks"]}):
        kind = next(r["tasks"][task]["kind"] for r in runs if task in r["tasks"])
        sizes = ", ".join(f"{r['name']}: n = {r['tasks'][task]['n']}" for r in runs if task in r["tasks"])
        head = ["metric"]
        for i, r in enumerate(runs):
            head += [r["name"], "95 % CI"] + [f"Δ {r['name']}"] * (i > 0)
        out += [f"### {task} ({sizes})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        footnotes: list[str] = []
        for col in COLUMNS[kind]:
            entries = [r["tasks"].get(task, {}).get("metrics", {}).get(col.key) for r in runs]
            if all(e is None for e in entries):  # no run has this column (e.g. GREEN not computed)
                continue
            values = [(e or {}).get("value") for e in entries]
            cells = [col.label]
            for i, entry in enumerate(entries):
                cells += _cells(entry, col, footnotes) + [_delta(values[0], values[i], col)] * (i > 0)
            out.append("| " + " | ".join(cells) + " |")
        out += [""] + [f"[{i}] {note}" for i, note in enumerate(footnotes, start=1)]
        out += _meaning_lines(task, kind, runs)
        if task in changes:
            out.append(_length_line(task, runs, changes[task]))
        out += [f"{r['name']}: thinking block closed in {r['tasks'][task]['info']['think_closed_frac']:.1%}"
                for r in runs if "think_closed_frac" in r["tasks"].get(task, {}).get("info", {})] + [""]
    out += [f"Note: {n}" for n in sorted({n for r in runs for n in r.get("notes", [])})]
    boot = runs[0].get("bootstrap", {})
    out.append(f"95 % CI: percentile bootstrap, {boot.get('n')} resamples, seed {boot.get('seed')}; "
               "scores ×100 except RadCliQ-v1 and characters.")
    return "\n".join(out).rstrip() + "\n"


def _meaning_lines(task: str, kind: str, runs: Sequence[dict]) -> list[str]:
    """What the numbers of a task's table mean (``Column.meaning``), with the records without finding."""
    lines = [f"{col.label}: {col.meaning}." for col in COLUMNS[kind] if col.meaning
             and any(col.key in r["tasks"].get(task, {}).get("metrics", {}) for r in runs)]
    if lines:
        counts = ", ".join(f"{r['name']}: {r['tasks'][task]['info']['no_finding_records']} of {r['tasks'][task]['n']}"
                           for r in runs if "no_finding_records" in r["tasks"].get(task, {}).get("info", {}))
        lines.append("ceiling: the score of answers equal to the ground truth on these records"
                     + (f" (records without a finding: {counts})" if counts else "") + ".")
    return lines


def _delta(base: float | None, value: float | None, col: Column) -> str:
    if base is None or value is None:
        return "—"
    return f"{(value - base) * (100.0 if col.percent else 1.0):+.{col.decimals}f}"
