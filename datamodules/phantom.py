"""Synthetic chest phantom dataset in the RadVLM format: images, reports, boxes and thinking traces.

`python -m datamodules.phantom OUT_DIR --n 2000 --seed 0 --size 128` writes

    OUT_DIR/images/{image_id}.png            grayscale, size x size, radiograph-like
    OUT_DIR/{train,val,test}.json            the six tasks of PHANTOM_TASKS, split by image 80/10/10
    OUT_DIR/{train,val,test}_thinking.json   the same records with " /think" prompts and <think> answers
    OUT_DIR/meta.json                        seed, n, size, counts per task and split, finding frequencies

Deviation from the paper: it stands in for MIMIC-CXR / VinDr / MS-CXR / Chest ImaGenome, which cannot be
used here: a small model can learn it on CPU, and every answer is checkable. Findings: `sample_case`; image and
boxes: `render_case`; seeding: `write_phantom`; text (reports, prompts, answers, traces, the tokenizer corpus):
`datamodules/phantom_text.py`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.phantom_text import (
    FAINT,
    FINDINGS,
    LABELS,
    QUALITIES,
    REGIONS,
    SIDES,
    SIZES,
    ZONES,
    Finding,
    case_records,
    format_box,
    format_boxes,
    make_thinking_answer,
    make_thinking_prompt,
    phantom_text_corpus,
)
from datamodules.records import save_records

#: the tasks of every phantom image (phrase grounding only when it has a finding); canonical names
PHANTOM_TASKS = ("report_generation", "abnormality_grounding", "phrase_grounding", "region_grounding",
                 "abnormality_classification", "conversation")

__all__ = [
    "FINDINGS",
    "LABELS",
    "REGIONS",
    "Anatomy",
    "Finding",
    "case_records",
    "format_box",
    "format_boxes",
    "make_thinking_answer",
    "make_thinking_prompt",
    "phantom_text_corpus",
    "render_case",
    "sample_case",
    "write_corpus",
    "write_phantom",
]

PHANTOM_VERSION = 1
SPLITS = ("train", "val", "test")
FINDING_WEIGHTS = (0.22, 0.22, 0.14, 0.10, 0.18, 0.14)
N_FINDINGS_PROBS = (0.25, 0.35, 0.25, 0.15)  # P(0), P(1), P(2), P(3) distinct findings per image
MIN_SIZE = 64  # the smallest nodule (radius 0.018) still covers a pixel centre: 0.018 * 64 = 1.15 px


# ----------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Anatomy:
    lung_cx: tuple[float, float]  # image x of the (right, left) lung centre
    lung_cy: float
    lung_ax: float
    lung_ay: float
    dome: tuple[float, float]  # y of the (right, left) diaphragm dome top
    heart_cx: float
    heart_cy: float
    heart_ax: float
    heart_ay: float
    body_ax: float
    gain: float
    offset: float


def sample_case(rng: np.random.Generator) -> tuple[Anatomy, list[Finding]]:
    """Jittered anatomy and 0-3 findings of distinct kinds at distinct (side, zone) slots, in FINDINGS order.

    Findings per image: 0-3 distinct kinds, P = 0.25 / 0.35 / 0.25 / 0.15, each at its own (side, zone) slot:
    cardiomegaly (heart 1.3-1.6x wider; box = heart), pleural effusion (basal opacity with a meniscus; small /
    moderate / large), nodule (radius 0.018-0.03), mass (0.045-0.065), consolidation (patchy blob cluster in a
    lobe), pneumothorax (lateral-apical lucency without lung markings, with a pleural line). Opacity strength
    (`alpha`, 0.35-1) varies; below 0.5 the finding is faint and the text says so ("faint", "subtle").
    """
    j = lambda w: float(rng.uniform(-w, w))
    sep = 0.2 + j(0.015)
    anat = Anatomy((0.5 - sep, 0.5 + sep), 0.44 + j(0.02), 0.16 + j(0.01), 0.31 + j(0.015),
                   (0.64 + j(0.015), 0.67 + j(0.015)), 0.53 + j(0.01), 0.60 + j(0.012), 0.14 + j(0.008),
                   0.115 + j(0.006), 0.44 + j(0.02), 1.0 + j(0.08), j(0.03))
    k = int(rng.choice(4, p=N_FINDINGS_PROBS))
    kinds = sorted(rng.choice(len(FINDINGS), size=k, replace=False, p=FINDING_WEIGHTS).tolist())
    free = [(s, z) for s in SIDES for z in ZONES]
    findings = []
    placement_order = sorted(kinds, key=lambda i: FINDINGS[i] not in ("pleural effusion", "pneumothorax"))
    for kind in (FINDINGS[i] for i in placement_order):  # pleural findings first: they need a fixed zone
        alpha = float(rng.uniform(0.35, 1.0))
        if kind == "cardiomegaly":
            ext = float(rng.uniform(1.3, 1.6))
            findings.append(Finding(kind, size="mild" if ext < 1.45 else "moderate", extent=ext))
            continue
        if kind in ("pleural effusion", "pneumothorax"):
            zone = "lower" if kind == "pleural effusion" else "upper"
            options = [s for s in free if s[1] == zone]
            slot = options[int(rng.integers(len(options)))]
        else:
            slot = free[int(rng.integers(len(free)))]
        free.remove(slot)
        size, quality = None, None
        if kind == "pleural effusion":
            size = SIZES[int(rng.integers(3))]
            ext = float(rng.uniform(*{"small": (0.05, 0.08), "moderate": (0.10, 0.15), "large": (0.18, 0.24)}[size]))
            if size != "small" and (slot[0], "middle") in free:
                free.remove((slot[0], "middle"))  # a moderate or large effusion rises into the middle zone
        elif kind == "pneumothorax":
            size = SIZES[int(rng.integers(3))]
            ext = float(rng.uniform(*{"small": (0.025, 0.035), "moderate": (0.045, 0.06), "large": (0.07, 0.09)}[size]))
        else:
            ext = float(rng.uniform(*{"nodule": (0.018, 0.03), "mass": (0.045, 0.065), "consolidation": (0.05, 0.08)}[kind]))
            quality = FAINT[kind] if alpha < 0.5 else QUALITIES[kind][int(rng.integers(3))]
        findings.append(Finding(kind, slot[0], slot[1], size, quality, alpha, ext,
                                float(rng.uniform()), float(rng.uniform())))
    return anat, sorted(findings, key=lambda f: FINDINGS.index(f.kind))


# ---------------------------------------------------------------------------------------------- images


def _sig(d: np.ndarray, soft: float) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(d / (2.0 * soft)))


def _ellipse_dist(x, y, cx, cy, ax, ay):  # (S, S): ~ signed distance to the border, positive inside
    return (1.0 - np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)) * min(ax, ay)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:  # (S, S), ~unit variance
    g = rng.standard_normal((cells + 1, cells + 1))
    t = (np.arange(size) + 0.5) / size * cells
    i0 = np.minimum(t.astype(int), cells - 1)
    f = t - i0
    rows = g[i0] * (1 - f)[:, None] + g[i0 + 1] * f[:, None]  # (S, C+1)
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _bbox(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Box of the pixels where mask > 0.5, normalised by the image size and rounded to 2 decimals."""
    rows, cols = np.nonzero(mask > 0.5)
    s = mask.shape[0]
    x1, y1 = round(cols.min() / s, 2), round(rows.min() / s, 2)
    x2, y2 = round((cols.max() + 1) / s, 2), round((rows.max() + 1) / s, 2)
    return x1, y1, max(x2, round(x1 + 0.01, 2)), max(y2, round(y1 + 0.01, 2))  # never empty after rounding


def _lesion_centre(a: Anatomy, f: Finding, r: float) -> tuple[float, float]:
    """Centre of a focal lesion of radius r inside its lung zone, kept lateral to the heart."""
    s = SIDES.index(f.side)
    lat = -1.0 if f.side == "right" else 1.0  # lateral direction in image x
    lo, hi = {"upper": (-0.7, -0.3), "middle": (-0.2, 0.12), "lower": (0.22, 0.45)}[f.zone]
    cy = a.lung_cy + a.lung_ay * (lo + (hi - lo) * f.v)
    half = a.lung_ax * np.sqrt(max(1.0 - ((cy - a.lung_cy) / a.lung_ay) ** 2, 0.05))
    cx = a.lung_cx[s] + lat * max(half - r - 0.015 - f.u * 0.35 * half, 0.0)
    return float(cx), float(cy)


def render_case(a: Anatomy, findings: list[Finding], size: int, rng: np.random.Generator):
    """→ (uint8 image (S, S), one box per finding, {region: box}). Boxes are (x1, y1, x2, y2) in [0, 1].

    Image (radiological convention: the patient's right is the image's left): body, two dark lungs with
    low-frequency markings, diaphragm domes (the right one higher), mediastinum, trachea, heart, posterior ribs,
    pixel noise, small jitter of every anatomical parameter and of brightness. Boxes are ground truth from the
    rendered masks (pixel extent / size), rounded to 2 decimals. Anatomical regions follow Chest ImaGenome
    names; lung zones are thirds of the lung's box height, hemidiaphragm and costophrenic-angle boxes are fixed
    fractions around the lung base (`_region_boxes`).
    """
    c = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(c, c)  # (S, S) each: x to the image right, y down
    soft = 0.7 / size
    img = np.full((size, size), 0.03)
    blend = lambda im, val, w: im + (val - im) * w
    body = _sig(_ellipse_dist(x, y, 0.5, 0.62, a.body_ax, 0.66), soft)
    img = blend(img, 0.40, body)
    by_kind = {f.kind: f for f in findings}
    lungs = []
    for s in range(2):
        dome = a.dome[s] + 0.12 * ((x - a.lung_cx[s]) / a.lung_ax) ** 2  # lower laterally: costophrenic angles
        lungs.append(_sig(_ellipse_dist(x, y, a.lung_cx[s], a.lung_cy, a.lung_ax, a.lung_ay), soft)
                     * _sig(dome - y, soft))
    markings = 0.03 * _smooth_noise(rng, size, 10) + 0.015 * _smooth_noise(rng, size, 24)
    img = blend(img, 0.14 + markings, lungs[0] + lungs[1])
    boxes: dict[str, tuple] = {}
    f = by_kind.get("pneumothorax")
    if f is not None:  # lucent rim without markings, outside an inner "collapsed lung" ellipse, upper half
        s, lat, d = SIDES.index(f.side), (-1.0 if f.side == "right" else 1.0), f.extent
        inner = _ellipse_dist(x, y, a.lung_cx[s] - lat * d * 0.6, a.lung_cy + d * 0.8, a.lung_ax - d, a.lung_ay - d)
        upper = _sig(a.lung_cy + 0.05 - y, 3 * soft)
        ptx = lungs[s] * (1.0 - _sig(inner, soft)) * upper
        img = blend(img, 0.02, ptx * (0.6 + 0.4 * f.alpha))
        img = img + 0.10 * f.alpha * np.exp(-(inner / 0.006) ** 2) * lungs[s] * upper  # pleural line
        boxes[f.kind] = _bbox(ptx)
    medi = _sig(0.045 - np.abs(x - 0.5), soft) * _sig(a.heart_cy - y, soft)
    img = blend(img, 0.46, medi)
    trachea = _sig(0.016 - np.abs(x - 0.5), soft) * _sig(0.30 - y, soft)
    img = blend(img, 0.24, trachea)
    hax = a.heart_ax * (by_kind["cardiomegaly"].extent if "cardiomegaly" in by_kind else 1.0)
    heart = _sig(_ellipse_dist(x, y, a.heart_cx, a.heart_cy, hax, a.heart_ay), soft) * _sig(
        a.heart_cy + 0.6 * a.heart_ay - y, soft)  # cut where it meets the diaphragm
    img = blend(img, 0.48, heart)
    thorax = body * _sig(0.8 - y, 4 * soft)
    for lat in (-1.0, 1.0):  # posterior ribs: arcs falling laterally
        t = (x - 0.5) * lat
        arc, side = 1.2 * t ** 2 - 0.15 * t, 0.06 * _sig(t - 0.05, soft) * thorax
        for k in range(6):
            img = img + side * np.exp(-((y - 0.12 - 0.09 * k - arc) / 0.011) ** 2)
    for f in findings:
        if f.kind in ("nodule", "mass"):
            cx, cy = _lesion_centre(a, f, f.extent)
            disk = _sig(_ellipse_dist(x, y, cx, cy, f.extent, f.extent), soft)
            img = blend(img, 0.50, disk * f.alpha)
            boxes[f.kind] = _bbox(disk)
        elif f.kind == "consolidation":
            cx, cy = _lesion_centre(a, f, f.extent * 0.8)
            centres = rng.normal(0.0, 0.5 * f.extent, (6, 2)) + (cx, cy)
            field = sum(np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * (0.35 * f.extent) ** 2)) for bx, by in centres)
            support = _sig(field - 0.5, 0.05) * lungs[SIDES.index(f.side)]
            patchy = np.clip(0.7 + 0.35 * _smooth_noise(rng, size, 24), 0.3, 1.0)
            img = blend(img, 0.46, support * patchy * f.alpha)
            boxes[f.kind] = _bbox(support)
        elif f.kind == "pleural effusion":
            s, lat = SIDES.index(f.side), (-1.0 if f.side == "right" else 1.0)
            lateral = np.clip((x - a.lung_cx[s]) * lat / a.lung_ax, 0.0, 1.0)
            level = a.dome[s] - f.extent - 0.06 * lateral  # meniscus: higher laterally
            eff = lungs[s] * _sig(y - level, soft)
            img = blend(img, 0.42, eff * f.alpha)
            boxes[f.kind] = _bbox(eff)
    if "cardiomegaly" in by_kind:
        boxes["cardiomegaly"] = _bbox(heart)
    img = img * a.gain + a.offset + rng.normal(0.0, 0.012, img.shape)
    pixels = np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)
    upper_medi = medi * _sig(a.heart_cy - a.heart_ay - y, soft)  # the mediastinum above the heart
    return pixels, [boxes[f.kind] for f in findings], _region_boxes(a, lungs, heart, upper_medi, trachea)


def _region_boxes(a: Anatomy, lungs, heart, medi, trachea) -> dict[str, tuple]:
    out = {"cardiac silhouette": _bbox(heart), "heart": _bbox(heart), "trachea": _bbox(trachea),
           "upper mediastinum": _bbox(medi)}
    for s, side in enumerate(SIDES):
        x1, y1, x2, y2 = out[f"{side} lung"] = _bbox(lungs[s])
        h = (y2 - y1) / 3
        for k, zone in enumerate(("upper", "mid", "lower")):
            out[f"{side} {zone} lung zone"] = (x1, round(y1 + k * h, 2), x2, round(y1 + (k + 1) * h, 2))
        out[f"{side} hemidiaphragm"] = (x1, round(a.dome[s] - 0.02, 2), x2, round(min(y2 + 0.01, 1.0), 2))
        w = round(0.3 * (x2 - x1), 2)
        out[f"{side} costophrenic angle"] = ((x1, round(y2 - 0.1, 2), round(x1 + w, 2), y2) if side == "right"
                                             else (round(x2 - w, 2), round(y2 - 0.1, 2), x2, y2))
    return out


# ----------------------------------------------------------------------------------------------- writer


def split_assignment(n: int, seed: int, splits: tuple[float, float, float]) -> list[str]:
    """Split name per image: a seeded permutation cut at round(0.8 n) and round(0.9 n) (for 80/10/10)."""
    n_train, n_val = round(splits[0] * n), round((splits[0] + splits[1]) * n) - round(splits[0] * n)
    order = np.random.default_rng([seed, 2]).permutation(n)
    names = np.empty(n, dtype=object)
    names[order[:n_train]], names[order[n_train:n_train + n_val]], names[order[n_train + n_val:]] = SPLITS
    return names.tolist()


def _write_case(job: tuple[Path, int, int, int]) -> tuple[list, list, list]:
    """Render and save image i; return its plain and thinking records and its findings (one worker's job)."""
    out, i, seed, size = job
    image_id = f"phantom-{i:05d}"
    case_rng, render_rng = np.random.default_rng([seed, 0, i]), np.random.default_rng([seed, 1, i])
    anat, findings = sample_case(case_rng)
    pixels, boxes, regions = render_case(anat, findings, size, render_rng)
    Image.fromarray(pixels).save(out / "images" / f"{image_id}.png")
    p, t = case_records(image_id, f"images/{image_id}.png", findings, boxes, regions, case_rng)
    return p, t, findings


def write_phantom(out_dir: str | Path, n: int = 2000, seed: int = 0, size: int = 128,
                  splits: tuple[float, float, float] = (0.8, 0.1, 0.1), workers: int = 1) -> dict:
    """Write images, the split JSON files (plain and thinking) and meta.json; return the meta dict.

    Everything derives from numpy RNGs seeded with `[seed, stream, image index]`, so the same seed gives the
    same bytes and image i does not depend on `n` nor on ``workers`` (processes rendering images in parallel;
    results are collected in image order).
    """
    if n < 1 or size < MIN_SIZE:
        raise ValueError(f"need n >= 1 and size >= {MIN_SIZE}, got n={n}, size={size}")
    if len(splits) != 3 or min(splits) < 0 or abs(sum(splits) - 1.0) > 1e-9:
        raise ValueError(f"splits must be three non-negative fractions summing to 1, got {splits}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    split_of = split_assignment(n, seed, tuple(splits))
    plain: dict[str, list] = {s: [] for s in SPLITS}
    think: dict[str, list] = {s: [] for s in SPLITS}
    kind_counts = {k: 0 for k in FINDINGS}
    n_findings = [0, 0, 0, 0]
    faint = 0
    jobs = [(out, i, seed, size) for i in range(n)]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            cases = list(pool.map(_write_case, jobs, chunksize=max(1, n // (8 * workers))))
    else:
        cases = [_write_case(job) for job in jobs]
    for i, (p, t, findings) in enumerate(cases):
        plain[split_of[i]] += p
        think[split_of[i]] += t
        n_findings[len(findings)] += 1
        faint += sum(f.alpha < 0.5 for f in findings if f.kind != "cardiomegaly")
        for f in findings:
            kind_counts[f.kind] += 1
    count = lambda recs: {task: sum(r["task"] == task for r in recs) for task in PHANTOM_TASKS}
    meta = {
        "version": PHANTOM_VERSION, "seed": seed, "n": n, "size": size, "splits": dict(zip(SPLITS, splits)),
        "images": {s: split_of.count(s) for s in SPLITS},
        "records": {s: count(plain[s]) for s in SPLITS}, "thinking_records": {s: count(think[s]) for s in SPLITS},
        "findings": kind_counts, "findings_per_image": dict(enumerate(n_findings)), "faint_findings": faint,
        "box_format": "[x1, y1, x2, y2] normalised to [0, 1], repr(round(x, 2)); ', ' and ' and ' between boxes",
    }
    for s in SPLITS:
        save_records(plain[s], out / f"{s}.json")
        save_records(think[s], out / f"{s}_thinking.json")
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def write_corpus(path: str | Path) -> Path:
    """`phantom_text_corpus()` as a text file, one non-empty line per line of its strings (for a tokenizer)."""
    lines = [line for text in phantom_text_corpus() for line in text.splitlines() if line.strip()]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic chest phantom dataset (RadVLM format).")
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=2000, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--corpus-out", help="also write phantom_text_corpus() here, one line per sentence")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering images (same output)")
    args = parser.parse_args(argv)
    meta = write_phantom(args.out_dir, n=args.n, seed=args.seed, size=args.size, workers=args.workers)
    if args.corpus_out:
        write_corpus(args.corpus_out)
    print(json.dumps({k: meta[k] for k in ("n", "size", "images", "findings", "findings_per_image")}))


if __name__ == "__main__":
    main()
