"""GLEU, sentence BLEU and ROUGE-L (metrics/text.py), by hand and against nltk / rouge_score."""

import math
import random

import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from nltk.translate.gleu_score import sentence_gleu
from rouge_score import rouge_scorer

from metrics.text import (
    BLEU,
    GLEU,
    ROUGEL,
    bleu,
    bleu_tokens,
    gleu,
    lcs_length,
    rouge_l,
    tokens_13a,
    tokens_radcliq,
    tokens_rouge,
)

REPORTS = [
    "Heart size is normal. The lungs are clear. No pleural effusion or pneumothorax.",
    "The cardiomediastinal silhouette is within normal limits. Lungs are clear without focal consolidation.",
    "Mild cardiomegaly. Small bilateral pleural effusions with bibasilar atelectasis. No pneumothorax.",
    ("PA and lateral views of the chest. Right-sided PICC line terminates in the mid SVC. "
     "No acute cardiopulmonary process."),
    "Low lung volumes. Patchy opacity at the left base may reflect atelectasis or infection.",
    "Heart size normal; lungs clear (no effusion), 3.5 cm nodule in the RUL - recommend CT.",
    "no acute cardiopulmonary process",
    "Effusions.",
    "",
    "...",
]
PAIRS = [(p, r) for p in REPORTS for r in REPORTS]


def _shuffled_pairs(seed=0, n=40):
    rng = random.Random(seed)
    words = " ".join(REPORTS).split()
    return [(" ".join(rng.sample(words, rng.randint(0, 30))), " ".join(rng.sample(words, rng.randint(0, 30))))
            for _ in range(n)]


# --------------------------------------------------------------------------------------------------- GLEU
def test_gleu_by_hand():
    # hyp "the cat sat" (3 tokens): n-grams 3 + 2 + 1 = 6, all in ref "the cat sat on the mat"
    # (6 tokens: 6 + 5 + 4 + 3 = 18 n-grams) -> 6 / max(6, 18) = 1/3
    assert gleu("the cat sat", "the cat sat on the mat") == pytest.approx(1 / 3, abs=1e-12)
    # clipping: hyp "the the the" has 3 + 2 + 1 = 6 n-grams; only one "the" matches ref "the cat"
    # (2 + 1 = 3 n-grams) -> 1 / max(6, 3) = 1/6
    assert gleu("the the the", "the cat") == pytest.approx(1 / 6, abs=1e-12)


def test_gleu_keeps_case_and_splits_punctuation_13a():
    # "The cat" vs "the cat": only "cat" matches (case kept) -> 1 / max(3, 3) = 1/3
    assert gleu("The cat", "the cat") == pytest.approx(1 / 3, abs=1e-12)
    # 13a splits the final period, so "No effusion." and "No effusion ." are the same token list
    assert tokens_13a("No effusion.") == ["No", "effusion", "."]
    assert gleu("No effusion.", "No effusion .") == 1.0


def test_gleu_empty_texts_give_zero():
    assert gleu("", "") == 0.0
    assert gleu("", "No effusion.") == 0.0
    assert gleu("No effusion.", "") == 0.0


def test_gleu_matches_nltk_sentence_gleu():
    for pred, ref in PAIRS + _shuffled_pairs():
        expected = sentence_gleu([tokens_13a(ref)], tokens_13a(pred), min_len=1, max_len=4)
        assert gleu(pred, ref) == pytest.approx(expected, abs=1e-12), (pred, ref)


# --------------------------------------------------------------------------------------------------- BLEU
def test_bleu2_by_hand():
    # hyp "heart size normal" vs ref "heart size is normal": unigram precision 3/3, bigram precision 1/2
    # ("heart size" matches, "size normal" does not); brevity exp(1 - 4/3) -> exp(-1/3) * sqrt(1 * 1/2)
    assert bleu("heart size normal", "heart size is normal", n=2) == pytest.approx(
        math.exp(-1 / 3) * math.sqrt(0.5), abs=1e-12)


def test_bleu_smooths_zero_counts_with_epsilon():
    # hyp "heart normal" vs ref "heart size normal": unigrams 2/2, bigram "heart normal" 0/1 -> (0 + .1) / 1;
    # brevity exp(1 - 3/2) -> exp(-.5) * sqrt(1 * .1)
    assert bleu("heart normal", "heart size normal", n=2) == pytest.approx(
        math.exp(-0.5) * math.sqrt(0.1), abs=1e-12)


def test_bleu_is_zero_without_unigram_match_or_tokens():
    assert bleu("pneumothorax", "heart size normal", n=2) == 0.0
    assert bleu("", "heart size normal", n=2) == 0.0
    assert bleu("heart", "", n=2) == 0.0


def test_radcliq_tokens_follow_original_code():
    # lower case, every "." becomes " .", split on single spaces, empty tokens dropped
    expected = ["heart", "is", "normal", ".no", "effusion", ".", "done"]
    assert tokens_radcliq("Heart is normal.No effusion.  Done") == expected


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("tokenizer, tokenize", [("radcliq", tokens_radcliq), ("13a", tokens_13a)])
def test_bleu_matches_nltk_method1(n, tokenizer, tokenize):
    checked = 0
    for pred, ref in PAIRS + _shuffled_pairs(1):
        hyp_tokens, ref_tokens = tokenize(pred), tokenize(ref)
        if hyp_tokens:  # NLTK divides by zero on an empty hypothesis; ours returns 0
            expected = sentence_bleu([ref_tokens], hyp_tokens, weights=(1 / n,) * n,
                                     smoothing_function=SmoothingFunction().method1)
            assert bleu(pred, ref, n, tokenizer) == pytest.approx(expected, abs=1e-12), (pred, ref)
            checked += 1
    assert checked > 100


def test_bleu_rejects_bad_arguments():
    with pytest.raises(ValueError, match="tokenizer"):
        BLEU(tokenizer="spacy")
    with pytest.raises(ValueError, match="order"):
        bleu_tokens(["a"], ["a"], n=0)


# ------------------------------------------------------------------------------------------------ ROUGE-L
def test_rouge_l_by_hand():
    # hyp "heart size is normal" (4), ref "the heart is normal in size" (6): LCS "heart is normal" = 3
    # P = 3/4, R = 3/6 -> F = 2 * .75 * .5 / 1.25 = .6
    assert rouge_l("heart size is normal", "the heart is normal in size") == pytest.approx(0.6, abs=1e-12)


def test_rouge_l_stemming_is_configurable():
    assert tokens_rouge("Effusions, bilateral!") == ["effus", "bilater"]
    assert rouge_l("Effusions", "effusion") == 1.0
    assert rouge_l("Effusions", "effusion", use_stemmer=False) == 0.0


def test_rouge_l_empty_texts_give_zero():
    assert rouge_l("", "") == 0.0
    assert rouge_l("...", "heart") == 0.0


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_l_matches_rouge_score(use_stemmer):
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    for pred, ref in PAIRS + _shuffled_pairs(2):
        expected = scorer.score(ref, pred)["rougeL"].fmeasure
        assert rouge_l(pred, ref, use_stemmer) == pytest.approx(expected, abs=1e-12), (pred, ref)


def _lcs_table(a, b):
    """Slow reference: the textbook dynamic programme."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def test_bit_parallel_lcs_matches_dynamic_programme():
    rng = random.Random(3)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 80))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 80))]
        assert lcs_length(a, b) == _lcs_table(a, b)


# ------------------------------------------------------------------------------------------------ classes
@pytest.mark.parametrize("metric", [GLEU(), BLEU(n=2), BLEU(n=4, tokenizer="13a"), ROUGEL()])
def test_text_metrics_score_update_and_compute(metric):
    preds, targets = [p for p, _ in PAIRS[:30]], [r for _, r in PAIRS[:30]]
    values = metric.score(preds, targets)
    assert values.dtype == torch.float32 and values.shape == (30,)
    assert torch.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
    assert values[0] == pytest.approx(1.0)  # a report against itself
    metric.update(preds[:11], targets[:11])
    metric.update(preds[11:], targets[11:])
    torch.testing.assert_close(metric.compute(), values.mean())
    assert metric.higher_is_better and metric.worst_value == 0.0


def test_text_metrics_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        GLEU().update(["a", "b"], ["a"])
