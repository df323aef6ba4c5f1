"""Bounded and hostile inputs: model-based metrics cap each text in tokens before the model, junk gets the
metric's real (low) value rather than NaN, box numbers are ASCII digits only, and mean IoU is 0 when no
prediction has a box. Tiny random models in the real formats (``metrics.tiny``); timings are in
``benchmarks/bounded_inputs.py``, not here."""

from __future__ import annotations

import json
import math
import random
import shutil
import string
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metrics.bertscore import BERTScore, encode_text, token_limit
from metrics.boxes import parse_boxes
from metrics.chexbert import CheXbertF1, CheXbertSimilarity
from metrics.grounding import NEGATIVE_ANSWER, BoxFormat, GroundingMAP, SoftF1
from metrics.radcliq import RadCliQ
from metrics.radgraph import RadGraphF1, load_annotator
from metrics.radgraph_annotate import annotate_text, cap_words, entities_of
from metrics.text import BLEU
from metrics.tiny import write_tiny_chexbert, write_tiny_radgraph

REFERENCE = "The heart size is normal. There is a small left pleural effusion. No pneumothorax."


def junk(n: int, seed: int = 0) -> str:
    """``n`` characters of printable junk with a few spaces (a model gone wrong)."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "    "
    return "".join(rng.choice(alphabet) for _ in range(n))


HOSTILE = ["", "   ", "\u200b", "\x00\x01\x02", "😀" * 50, "٣٣٣ ١٢", "ａｂｃ", "a" * 5000, "中文报告" * 300,
           "\u0301\u0301", "[0.1, 0.2, 0.3, 0.4]", "\n\t", "...", junk(8000), junk(20000, seed=1)]


@pytest.fixture(scope="module")
def radgraph_dir(tmp_path_factory, bert_dir) -> str:
    return write_tiny_radgraph(tmp_path_factory.mktemp("radgraph") / "radgraph-xl", bert_dir)


@pytest.fixture(scope="module")
def chexbert_ckpt(tmp_path_factory, bert_dir) -> str:
    return write_tiny_chexbert(tmp_path_factory.mktemp("chexbert") / "chexbert.pth", bert_dir)


# ------------------------------------------------------------------------------------------------ RadGraph
def get_entity_reference(n, r, s):
    """radgraph.utils.get_entity (0.1.18), the package's quadratic post-processing, for comparison."""
    from radgraph.utils import get_entity

    return get_entity(n, r, s)


def test_entities_of_equals_the_packages_get_entity():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(12)]
    for _ in range(200):
        spans = [(a, a + rng.randint(0, 2)) for a in rng.choices(range(10), k=rng.randint(0, 8))]  # duplicates too
        ner = [[s, e, rng.choice(["ANAT-DP", "OBS-DP", "OBS-U"]), 0.9, 0.8] for s, e in spans]
        pool = spans + [(11, 11)]  # (11, 11) is no entity: relations to it are dropped
        rels = [[*rng.choice(pool), *rng.choice(pool), rng.choice(["modify", "located_at"]), 0.7, 0.6]
                for _ in range(rng.randint(0, 10))]
        assert entities_of(ner, rels, words) == get_entity_reference(ner, rels, words)


def test_cap_words_keeps_the_longest_word_prefix_whose_pieces_fit(bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_dir)
    words = ["heart", "xyz", "heart", "heart"]  # pieces 1 ("heart"), 3 ("x ##y ##z"), 1, 1
    # budget max_tokens - 2 ([CLS], [SEP]): 5 -> 1 + 3 + 1 fits, the last word would make 6
    assert cap_words(words, tok, 7) == (["heart", "xyz", "heart"], 5)
    assert cap_words(words, tok, 8) == (words, 6)
    assert cap_words(words, tok, 3) == (["heart"], 1)
    assert cap_words(words, tok, None) == (words, None)
    assert cap_words(["xyz"], tok, 4) == ([], 0)  # a first word longer than the budget leaves nothing


def test_radgraph_cuts_long_junk_to_the_bert_window_and_leaves_reports_alone(radgraph_dir):
    annotator = load_annotator("radgraph-xl", radgraph_dir, "cpu")
    tok = annotator.reader._token_indexers["bert"]._tokenizer
    assert annotate_text(annotator, REFERENCE) == annotate_text(annotator, REFERENCE, max_tokens=None)
    for text in (junk(8000), junk(20000, seed=1)):
        words = annotate_text(annotator, text)["text"].split()
        pieces = sum(len(tok.tokenize(w)) for w in words)
        assert 400 < pieces <= 510  # the window minus [CLS] and [SEP], nearly full
    short = annotate_text(annotator, junk(8000), max_tokens=40)["text"].split()
    assert sum(len(tok.tokenize(w)) for w in short) <= 38


def test_radgraph_of_text_without_word_pieces_is_an_empty_report_scoring_zero(radgraph_dir):
    metric = RadGraphF1(reward_level="partial", model_dir=radgraph_dir, device="cpu")
    assert metric.score(["\u200b \u200b", "   "], [REFERENCE, REFERENCE]).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="max_tokens must be >= 3"):
        RadGraphF1(model_dir=radgraph_dir, max_tokens=2)


# ------------------------------------------------------------------------------------------------ BERTScore
def test_bertscore_token_limit_is_the_smallest_of_argument_tokenizer_and_positions():
    roberta = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=514, pad_token_id=1, model_type="roberta"))
    bert = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512, pad_token_id=0, model_type="bert"))
    unlimited, limited = SimpleNamespace(model_max_length=int(1e30)), SimpleNamespace(model_max_length=256)
    assert token_limit(unlimited, roberta) == 512  # positions 2 … 513: 514 - (1 + 1)
    assert token_limit(unlimited, bert) == 512
    assert token_limit(limited, bert) == 256
    assert token_limit(limited, bert, max_tokens=64) == 64


def test_bertscore_scores_long_text_when_the_tokenizer_names_no_limit(tmp_path, bert_dir):
    # a local folder whose tokenizer has no model_max_length (transformers then says 1e30): without the cap at the
    # model's 512 positions an 8000-piece text is an index error, which made every value of the call NaN
    folder = tmp_path / "bert"
    shutil.copytree(bert_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("model_max_length", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    metric = BERTScore(str(folder), num_layers=2, device="cpu", strict=True)
    values = metric.score([junk(8000), "The heart is normal."], [REFERENCE, REFERENCE])
    assert torch.isfinite(values).all()
    tokenizer, model = metric._engine()
    assert tokenizer.model_max_length > 10**6 and token_limit(tokenizer, model) == 512


def test_bertscore_max_tokens_truncates_each_text(bert_dir):
    metric = BERTScore(bert_dir, num_layers=2, device="cpu", max_tokens=16, strict=True)
    tokenizer, _ = metric._engine()
    assert len(encode_text(tokenizer, junk(2000), 16)) == 16
    # a pair that differs only after the first 14 pieces scores as identical
    a, b = "the heart is normal " * 10 + "effusion", "the heart is normal " * 10 + "pneumothorax"
    assert metric.score([a], [b]).item() == pytest.approx(1.0, abs=1e-6)
    assert BERTScore(bert_dir, num_layers=2, device="cpu").score([a], [b]).item() < 1.0 - 1e-4


# ------------------------------------------------------------------------------------- junk: real low values
def test_junk_gets_real_values_from_every_model_metric_never_nan(bert_dir, radgraph_dir, chexbert_ckpt):
    refs = [REFERENCE] * len(HOSTILE)
    metrics = {
        "radgraph partial": RadGraphF1(reward_level="partial", model_dir=radgraph_dir, device="cpu", strict=True),
        "bertscore": BERTScore(bert_dir, num_layers=2, device="cpu", strict=True),
        "chexbert f1": CheXbertF1(chexbert_ckpt, bert_dir, device="cpu", strict=True),
        "chexbert similarity": CheXbertSimilarity(chexbert_ckpt, bert_dir, device="cpu", strict=True),
    }
    radgraph_feature = RadGraphF1(reward_level="radcliq", model_dir=radgraph_dir, device="cpu", strict=True)
    metrics["radcliq"] = RadCliQ(radgraph=radgraph_feature, bertscore=metrics["bertscore"],
                                 semb=metrics["chexbert similarity"], bleu=BLEU(n=2))
    for name, metric in metrics.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # allennlp: "a sentence with a single token"
            values = metric.score(HOSTILE, refs)
        assert torch.isfinite(values).all(), (name, values)
    radgraph = metrics["radgraph partial"].score(["", "\u200b"], [REFERENCE, REFERENCE])
    assert radgraph.tolist() == [0.0, 0.0]  # an empty annotation has RadGraph-F1 0
    assert metrics["radcliq"].score([""], [REFERENCE]).item() == 3.0  # the authors' short-answer floor


# ------------------------------------------------------------------------------------------ boxes and mean IoU
@pytest.mark.parametrize("style", ["reward", "radvlm_eval"])
@pytest.mark.parametrize("digits", ["٠.١", "０.１", "०.१", "𝟎.𝟏", "۰.۱"])  # Arabic-Indic, full-width, Devanagari …
def test_box_numbers_are_ascii_digits_only(style, digits):
    assert float(digits) == 0.1  # what Python's float (and \d) would accept
    ascii_box = "[0.1, 0.2, 0.3, 0.4]"
    assert parse_boxes(f"[{digits}, 0.2, 0.3, 0.4] and {ascii_box}", style) == [(0.1, 0.2, 0.3, 0.4)]
    assert parse_boxes(f"[0.1, 0.2, 0.3, 0.{digits[-1]}]", style) == []
    if style == "reward":
        assert parse_boxes("[0.1, 0.2, 0.3, 4e-١]", style) == []  # exponent digits too


def test_box_metrics_see_no_box_in_unicode_digits():
    pred, gt = "[٠.١, ٠.٢, ٠.٣, ٠.٤]", "[0.1, 0.2, 0.3, 0.4]"
    assert SoftF1().score([pred], [gt]).item() == 0.0
    assert GroundingMAP().score([pred], [gt]).item() == 0.0
    assert BoxFormat().score([pred], [gt]).item() == 0.0


def test_mean_iou_is_zero_when_no_prediction_has_a_box_in_the_metric_and_the_evaluation():
    from radvlm_tools.evaluate import ratio_of_sums

    preds, targets = [NEGATIVE_ANSWER, "no box here", "[٠.١, ٠.٢, ٠.٣, ٠.٤]"], ["[0.1, 0.2, 0.3, 0.4]"] * 3
    metric = GroundingMAP()
    metric.update(preds, targets)
    assert metric.compute()["mean_iou"].item() == 0.0  # Σ IoU / Σ n_pred·n_gt = 0 / 0 -> 0 by definition
    pairs = np.array(metric.iou_pairs(preds, targets), dtype=np.float64)  # what radvlm_tools.evaluate aggregates
    assert ratio_of_sums(pairs) == 0.0 and math.isnan(ratio_of_sums(np.zeros((0, 2))))


# ------------------------------------------------------------------------------------------------------ GREEN
def test_green_cuts_each_report_to_max_chars_after_the_published_word_cut():
    from metrics.green import GREEN_PROMPT, MAX_CHARS, cut_words, green_prompt

    report = " ".join(["pleural effusion"] * 200)  # 400 words of ordinary length
    assert cut_words(report, 300, MAX_CHARS) == cut_words(report, 300) == " ".join(report.split()[:300])
    blob = "x" * 20_000  # one "word": the published cut keeps all of it
    assert len(cut_words(blob)) == 20_000 and cut_words(blob, 300, MAX_CHARS) == "x" * MAX_CHARS
    prompt = green_prompt(blob, junk(20_000), max_chars=MAX_CHARS)
    assert len(prompt) <= len(GREEN_PROMPT) + 2 * MAX_CHARS
