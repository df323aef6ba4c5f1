"""N-gram text metrics of one prediction against one reference: GLEU, sentence BLEU and ROUGE-L.

The n-gram and LCS arithmetic is ours (pure Python); tokenizers come from the packages that define them, and
the tests cross-check every value against the reference package. GLEU: the GLEU ablation reward
(docs/paper.md §3, ``gleu``); BLEU: RadCliQ's BLEU term is BLEU-2 (``bleu``); ROUGE-L: ``rouge_l``. Empty texts:
every score is 0 when either side has no token (a bad output is a real low score, not NaN).

Deviations: BLEU follows the original RadCliQ code, not RadEval's copy (``bleu``); the paper does not state its
ROUGE-L setting, we assume RadEval's (``rouge_l``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import torch
from nltk.stem.porter import PorterStemmer
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from metrics.base import PerSampleMetric, check_pairs

_TOKENIZER_13A = Tokenizer13a()
_PORTER = PorterStemmer()
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
BLEU_EPSILON = 0.1  # NLTK method1 / fast_bleu smoothing 1


# ----------------------------------------------------------------------------------------------- tokenizers
def tokens_13a(text: str) -> list[str]:
    """sacrebleu "13a" (mteval-v13a) tokens, case kept."""
    return _TOKENIZER_13A(text).split()


def tokens_radcliq(text: str) -> list[str]:
    """Tokens of the original RadCliQ BLEU: lower case, ``.`` split off, split on single spaces."""
    return [tok for tok in text.lower().replace(".", " .").split(" ") if tok != ""]


@lru_cache(maxsize=65536)
def _stem(token: str) -> str:
    return _PORTER.stem(token) if len(token) > 3 else token


def tokens_rouge(text: str, use_stemmer: bool = True) -> list[str]:
    """rouge_score's default tokens: lower case, alphanumeric runs, Porter stem of tokens longer than 3."""
    tokens = _NON_ALNUM.sub(" ", text.lower()).split()
    return [_stem(tok) for tok in tokens] if use_stemmer else tokens


# ------------------------------------------------------------------------------------------------ n-grams
def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the order-``n`` n-grams of ``tokens`` (tuples)."""
    return Counter(zip(*(tokens[i:] for i in range(n))))


def _matched(hyp_counts: Counter, ref_counts: Counter) -> int:
    """Clipped matches: sum over hypothesis n-grams of min(hypothesis count, reference count)."""
    return sum(min(c, ref_counts[g]) for g, c in hyp_counts.items() if g in ref_counts)


def _ngrams(tokens: Sequence[str], min_n: int, max_n: int) -> list[tuple[str, ...]]:
    """All n-grams of orders min_n..max_n (NLTK's everygrams), as one list; orders never collide."""
    grams: list[tuple[str, ...]] = []
    for n in range(min_n, max_n + 1):
        grams.extend(zip(*(tokens[i:] for i in range(n))))
    return grams


def gleu_tokens(hyp: Sequence[str], ref: Sequence[str], min_n: int = 1, max_n: int = 4) -> float:
    """GLEU of token lists: clipped n-gram matches / max(hyp n-grams, ref n-grams), orders min_n..max_n."""
    hyp_grams, ref_grams = _ngrams(hyp, min_n, max_n), _ngrams(ref, min_n, max_n)
    denom = max(len(hyp_grams), len(ref_grams))
    return _matched(Counter(hyp_grams), Counter(ref_grams)) / denom if denom > 0 else 0.0


def gleu(pred: str, ref: str) -> float:
    """Sentence GLEU (n = 1..4) over sacrebleu 13a tokens, case kept; 0 when both are empty.

    docs/paper.md §3, the GLEU ablation reward: n-grams of orders 1..4 pooled; ``matched / max(total
    hypothesis n-grams, total reference n-grams)`` with clipped matches. Equals
    ``nltk.translate.gleu_score.sentence_gleu([ref], hyp)`` (and NLTK corpus GLEU of one pair).
    """
    return gleu_tokens(tokens_13a(pred), tokens_13a(ref))


def bleu_tokens(hyp: Sequence[str], ref: Sequence[str], n: int = 4) -> float:
    """Sentence BLEU-n of token lists, uniform weights, NLTK method1 smoothing (epsilon 0.1)."""
    if n < 1:
        raise ValueError(f"BLEU order n must be >= 1, got {n}")
    if not hyp:
        return 0.0
    log_sum = 0.0
    for k in range(1, n + 1):
        matched = _matched(ngram_counts(hyp, k), ngram_counts(ref, k))
        total = max(1, len(hyp) - k + 1)
        if k == 1 and matched == 0:
            return 0.0  # no unigram in common: NLTK and fast_bleu return 0 before smoothing
        precision = matched / total if matched > 0 else BLEU_EPSILON / total
        log_sum += math.log(precision) / n
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1.0 - len(ref) / len(hyp))
    return brevity * math.exp(log_sum)


def bleu(pred: str, ref: str, n: int = 4, tokenizer: Literal["radcliq", "13a"] = "radcliq") -> float:
    """Sentence BLEU-n of two texts, uniform weights 1/n.

    By default exactly the BLEU feature of the original RadCliQ code (rajpurkarlab/CXR-Report-Metric): text
    lower-cased, ``"."`` replaced by ``" ."``, split on single spaces, empty tokens dropped, then
    ``fast_bleu.BLEU`` with its default smoothing 1, which is NLTK's ``SmoothingFunction().method1``: a zero
    n-gram count becomes 0.1 / (number of hypothesis n-grams), and the score is 0 when no unigram matches.
    RadCliQ's BLEU term is BLEU-2 (``BLEU(n=2)``). ``tokenizer="13a"`` uses sacrebleu 13a tokens with case kept
    instead. Deviation: RadEval's RadCliQ copy takes BLEU-2 from the pycocoevalcap scorer (BLEU-4 before
    RadEval 0.1.8; other tokens and smoothing); we do not reproduce it (its RadCliQ weight is 4e-12).
    """
    tokenize = _bleu_tokenizer(tokenizer)
    return bleu_tokens(tokenize(pred), tokenize(ref), n)


def _bleu_tokenizer(name: str):
    if name == "radcliq":
        return tokens_radcliq
    if name == "13a":
        return tokens_13a
    raise ValueError(f"unknown BLEU tokenizer {name!r}; expected 'radcliq' or '13a'")


# -------------------------------------------------------------------------------------------------- LCS
def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel: O(len(b)) big-integer operations."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, tok in enumerate(a):  # bit i of masks[tok] set where a[i] == tok
        masks[tok] = masks.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full  # zero bits of v mark the LCS positions in a
    for tok in b:
        u = v & masks.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l_tokens(hyp: Sequence[str], ref: Sequence[str]) -> float:
    """ROUGE-L F-measure of token lists: 2PR / (P + R) with P = LCS / |hyp|, R = LCS / |ref|."""
    if not hyp or not ref:
        return 0.0
    lcs = lcs_length(ref, hyp)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str, ref: str, use_stemmer: bool = True) -> float:
    """ROUGE-L F-measure as rouge_score computes it (default: with the Porter stemmer, as RadEval).

    Equal to ``rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)`` (RadEval's setting; the
    paper does not state its own, we assume RadEval): lower case, runs of characters outside ``[a-z0-9]``
    become spaces, Porter stemming (NLTK, as rouge_score) of tokens longer than 3 characters. LCS by the
    bit-parallel algorithm of Allison–Dix / Hyyrö (one big-integer update per hypothesis token), equal to the
    DP table (``lcs_length``).
    """
    return rouge_l_tokens(tokens_rouge(pred, use_stemmer), tokens_rouge(ref, use_stemmer))


# ------------------------------------------------------------------------------------------------ metrics
class GLEU(PerSampleMetric):
    """Sentence GLEU of each prediction against its reference (the GLEU ablation reward)."""

    higher_is_better = True
    worst_value = 0.0
    think_split = "last"  # thinking completions: the text after the LAST </think> is scored (as for RadCliQ)

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,)
        check_pairs(preds, targets)
        return torch.tensor([gleu(p, t) for p, t in zip(preds, targets)], dtype=torch.float32)


class BLEU(PerSampleMetric):
    """Sentence BLEU-n; ``BLEU(n=2)`` with the default tokenizer is the original RadCliQ BLEU feature."""

    higher_is_better = True
    worst_value = 0.0
    think_split = "last"  # thinking completions: the text after the LAST </think> is scored (as for RadCliQ)

    def __init__(self, n: int = 4, tokenizer: Literal["radcliq", "13a"] = "radcliq", **kwargs) -> None:
        super().__init__(**kwargs)
        if n < 1:
            raise ValueError(f"BLEU order n must be >= 1, got {n}")
        _bleu_tokenizer(tokenizer)  # fail early on an unknown name
        self.n = n
        self.tokenizer = tokenizer

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,)
        check_pairs(preds, targets)
        values = [bleu(p, t, self.n, self.tokenizer) for p, t in zip(preds, targets)]
        return torch.tensor(values, dtype=torch.float32)


class ROUGEL(PerSampleMetric):
    """ROUGE-L F-measure of each prediction against its reference."""

    higher_is_better = True
    worst_value = 0.0
    think_split = "last"  # thinking completions: the text after the LAST </think> is scored (as for RadCliQ)

    def __init__(self, use_stemmer: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.use_stemmer = use_stemmer

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,)
        check_pairs(preds, targets)
        values = [rouge_l(p, t, self.use_stemmer) for p, t in zip(preds, targets)]
        return torch.tensor(values, dtype=torch.float32)
