"""Throughput of the model-free metrics (grounding and n-gram text metrics) on realistic synthetic inputs.

One GRPO step of the paper scores 512 prompts x 8 rollouts = 4096 completions, so every metric is timed on a
batch of 4096 pairs: reports of about 200 characters (the paper's RadVLM average is 207) built from a phrase
bank, and grounding answers in RadVLM style with 0-10 boxes (10 % negative answers); each target is shared by
the 8 rollouts of its prompt. Each figure is the best of ``repeats`` timings of ``Metric.score`` (stateless,
what the reward uses) on fresh texts. Single process, CPU.

Run: ``python -m benchmarks.metrics_fast``; ``results()`` returns the figures for ``benchmarks/metrics.py``.
"""

from __future__ import annotations

import random
import time

from metrics.boxes import format_boxes
from metrics.grounding import NEGATIVE_ANSWER, BoxFormat, GroundingMAP, SoftF1
from metrics.text import BLEU, GLEU, ROUGEL

PHRASES = [
    "Heart size is normal.", "The lungs are clear.", "No pleural effusion or pneumothorax.",
    "Mild cardiomegaly.", "Small left pleural effusion.", "Bibasilar atelectasis.",
    "No focal consolidation.", "The mediastinal contours are within normal limits.",
    "Right PICC line terminates in the mid SVC.", "Patchy opacity at the right base may reflect pneumonia.",
    "Degenerative changes of the thoracic spine.", "No acute cardiopulmonary process.",
    "Pulmonary vascular congestion without frank edema.", "Endotracheal tube 4 cm above the carina.",
]
LABELS = ["nodule", "pleural effusion", "cardiomegaly", "right lung", "left costophrenic angle", "opacity"]


def make_reports(n: int, seed: int, target_chars: int = 200) -> list[str]:
    """``n`` synthetic reports of about ``target_chars`` characters."""
    rng = random.Random(seed)
    reports = []
    for _ in range(n):
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < target_chars:
            parts.append(rng.choice(PHRASES))
        reports.append(" ".join(parts))
    return reports


def make_grounding_answers(n: int, seed: int, max_boxes: int = 10) -> list[str]:
    """``n`` RadVLM-style grounding answers with 0..``max_boxes`` boxes (a tenth: the negative sentence)."""
    rng = random.Random(seed)
    answers = []
    for _ in range(n):
        k = 0 if rng.random() < 0.1 else rng.randint(1, max_boxes)
        if k == 0:
            answers.append(NEGATIVE_ANSWER)
            continue
        boxes = []
        for _ in range(k):
            x, y = rng.uniform(0, 0.7), rng.uniform(0, 0.7)
            boxes.append([x, y, x + rng.uniform(0.02, 0.3), y + rng.uniform(0.02, 0.3)])
        label = rng.choice(LABELS)
        answers.append(f"The {label} is located at the coordinates {format_boxes(boxes)} on the image.")
    return answers


def _inputs(kind: str, n: int, group: int, seed: int) -> tuple[list[str], list[str]]:
    """Predictions (all distinct) and targets (each repeated ``group`` times, as in a GRPO batch)."""
    make = make_grounding_answers if kind == "boxes" else make_reports
    targets = [t for t in make(n // group, 2 * seed + 1) for _ in range(group)]
    return make(n, 2 * seed), targets


def results(n: int = 4096, group: int = 8, repeats: int = 3) -> dict[str, dict[str, float]]:
    """``{metric: {"samples_per_s", "seconds" (for n samples), "n"}}``, best of ``repeats`` timings.

    Every repeat draws fresh texts, so the tokenizer caches (sacrebleu keeps an LRU cache) only help with the
    targets shared by the ``group`` rollouts of one prompt, as in training.
    """
    cases = [
        ("SoftF1", SoftF1(), "boxes"),
        ("GroundingMAP", GroundingMAP(), "boxes"),
        ("BoxFormat", BoxFormat(), "boxes"),
        ("GLEU", GLEU(), "reports"),
        ("BLEU-2 (RadCliQ)", BLEU(n=2), "reports"),
        ("BLEU-4 (13a)", BLEU(n=4, tokenizer="13a"), "reports"),
        ("ROUGE-L", ROUGEL(), "reports"),
    ]
    out = {}
    for c, (name, metric, kind) in enumerate(cases):
        best = float("inf")
        for r in range(repeats):
            preds, targets = _inputs(kind, n, group, seed=100 * c + r)
            start = time.perf_counter()
            metric.score(preds, targets)
            best = min(best, time.perf_counter() - start)
        out[name] = {"samples_per_s": n / best, "seconds": best, "n": float(n)}
    return out


def main() -> None:
    figures = results()
    print(f"{'metric':<18} {'samples/s':>12} {'s per 4096':>11}")
    for name, row in figures.items():
        print(f"{name:<18} {row['samples_per_s']:>12,.0f} {row['seconds']:>11.3f}")


if __name__ == "__main__":
    main()
