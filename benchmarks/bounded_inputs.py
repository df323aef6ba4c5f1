"""Cost per sample of the model-based rewards on normal reports and on long junk: bounded, or not.

``python -m benchmarks.bounded_inputs [--device cpu] [--threads 1] [--compare-uncapped]`` scores, against a
normal reference, three kinds of prediction: normal reports (≈200 characters, ``benchmarks.metrics.make_report``),
8 000 characters and 20 KB of printable junk (letters, digits, punctuation, a space every ~20 characters),
with RadGraph-F1 (partial), RadCliQ (RadGraph + BERTScore + CheXbert similarity + BLEU-2), BERTScore and
CheXbert similarity. Every model is a tiny random one in the real format (``metrics.tiny``; BERTScore on the
tiny BERT, 2 layers), so the figures measure the pipeline's bounds, not the real models' speed: a random
RadGraph finds entities and relations everywhere, the worst case for its span-pair stage. Prints seconds per
sample (model loading excluded: one warm-up call first) and writes ``benchmarks/results/bounded_inputs.json``.

``--compare-uncapped`` adds RadGraph-F1 with ``max_tokens=None`` (no cut: the package's own behaviour, but with
our linear post-processing) on 1 000 and 2 000 characters of junk, to show the growth the cap removes.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import string
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: the repo root, not benchmarks/, must resolve `metrics`
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks.metrics import make_report

REFERENCE = "The heart size is normal. There is a small left pleural effusion. No pneumothorax is seen."


def junk(n_chars: int, seed: int) -> str:
    """``n_chars`` of printable junk: letters, digits and punctuation, a space about every 20 characters."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation
    return "".join(" " if rng.random() < 0.05 else rng.choice(alphabet) for _ in range(n_chars))


def inputs(n_normal: int, n_junk: int) -> dict[str, list[str]]:
    rng = random.Random(0)
    return {
        "normal": [make_report(rng) for _ in range(n_normal)],
        "junk 8000 chars": [junk(8000, seed=i) for i in range(n_junk)],
        "junk 20 KB": [junk(20_000, seed=100 + i) for i in range(n_junk)],
    }


def seconds_per_sample(metric, preds: list[str]) -> tuple[float, int]:
    """(wall seconds / sample of one ``score`` call on distinct predictions, NaN count)."""
    start = time.perf_counter()
    values = metric.score(preds, [REFERENCE] * len(preds))
    return (time.perf_counter() - start) / len(preds), int(torch.isnan(values).sum())


def main(argv: list[str] | None = None) -> list[dict]:
    from metrics.bertscore import BERTScore
    from metrics.chexbert import CheXbertSimilarity
    from metrics.radcliq import RadCliQ
    from metrics.radgraph import RadGraphF1
    from metrics.text import BLEU
    from metrics.tiny import write_tiny_bert, write_tiny_chexbert, write_tiny_radgraph

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--n-normal", type=int, default=16, help="normal reports per timed call")
    parser.add_argument("--n-junk", type=int, default=3, help="junk texts per timed call")
    parser.add_argument("--compare-uncapped", action="store_true", help="also RadGraph-F1 without the token cap")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bounded_inputs.json"))
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        work = Path(tempfile.mkdtemp(prefix="bounded-bench-"))
        bert = write_tiny_bert(work / "bert")
        radgraph_dir = write_tiny_radgraph(work / "radgraph-xl", bert)
        chexbert = write_tiny_chexbert(work / "chexbert.pth", bert)
        dev = args.device
        # no reference cache: every call pays for its reference too, as a fresh prompt of a GRPO step would
        rg = dict(model_dir=radgraph_dir, device=dev, reference_cache_size=0)
        bertscore = dict(model_type=bert, num_layers=2, device=dev, reference_cache_size=0)
        chex = dict(checkpoint=chexbert, bert_name_or_path=bert, device=dev, reference_cache_size=0)
        factories = {
            "RadGraphF1 partial (max_tokens 512)": lambda: RadGraphF1(reward_level="partial", **rg),
            "RadCliQ (2048 chars, then each model's cap)": lambda: RadCliQ(
                radgraph=RadGraphF1(reward_level="radcliq", **rg), bertscore=BERTScore(**bertscore),
                semb=CheXbertSimilarity(**chex), bleu=BLEU(n=2)),
            "BERTScore (512 tokens)": lambda: BERTScore(**bertscore),
            "CheXbertSimilarity (512 tokens)": lambda: CheXbertSimilarity(**chex),
        }
        data = inputs(args.n_normal, args.n_junk)
        rows = []
        for name, factory in factories.items():
            metric = factory()
            metric.score(data["normal"][:2], [REFERENCE] * 2)  # loads the models
            for kind, preds in data.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # allennlp's "sentence with a single token" and the like
                    per, nan = seconds_per_sample(metric, preds)
                rows.append({"metric": name, "input": kind, "chars": round(sum(map(len, preds)) / len(preds)),
                             "samples": len(preds), "s_per_sample": round(per, 4), "nan": nan})
        if args.compare_uncapped:
            metric = RadGraphF1(reward_level="partial", max_tokens=None, **rg)
            for n in (1000, 2000):
                per, nan = seconds_per_sample(metric, [junk(n, seed=7)])
                rows.append({"metric": "RadGraphF1 partial (no cap)", "input": f"junk {n} chars", "chars": n,
                             "samples": 1, "s_per_sample": round(per, 4), "nan": nan})
        print(f"device {dev}, torch threads {torch.get_num_threads()}; tiny random models (metrics.tiny)")
        print(f"{'metric':<46} {'input':<16} {'chars':>6} {'s/sample':>9} {'NaN':>4}")
        for r in rows:
            print(f"{r['metric']:<46} {r['input']:<16} {r['chars']:>6} {r['s_per_sample']:>9.4f} {r['nan']:>4}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": dev, "threads": torch.get_num_threads(), "platform": platform.platform(),
                "reference": REFERENCE}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return rows
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
