"""RadGraph-F1 rewards and the RadGraph feature of RadCliQ, on the ``radgraph`` package (0.1.18).

The package annotates a report with entities ``{"tokens", "label", "relations": [[type, target_id], …]}``
(labels ANAT-DP, OBS-DP, OBS-U, OBS-DA; relations modify, located_at, suggestive_of). ``RadGraphF1`` scores
pairs of reports with the package's ``compute_reward`` or with RadCliQ's feature (docs/paper.md §3,
``radgraph_feature``).

Deviations from the package: each report is cut to ``max_tokens`` word pieces (default 512, the BERT window)
where the package folds longer inputs into windows at a cost that grows with the square of the length
(``annotate_text``); the entity dict is built in linear time (``entities_of``); reports are annotated
``batch_size`` at a time (default 16, reports of similar length together, ``length_batches``) as the sentences
of one document, one forward per batch, each report's annotation equal to its own one-report forward
(``annotate_words``); the forward's inputs are built as tensors (``model_inputs``, equal to the package's reader
and collation) instead of one allennlp field object per enumerated span.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Literal

import torch

from metrics import _compat
from metrics.base import PerSampleMetric, ReferenceCache, check_cancelled, check_pairs, load_once, resolve_device, warn_once

RADGRAPH_REPO = "StanfordAIMI/RRG_scorers"
MODEL_TYPES = ("radgraph", "radgraph-xl", "modern-radgraph-xl", "echograph")
REQUIRED_FILES = ("config.json", "weights.th", "vocabulary")
MAX_TOKENS = 512  # word pieces with [CLS] and [SEP]: the BERT window of the RadGraph models
BATCH_SIZE = 16  # reports per forward
MAX_BATCH_PAIRS = 256 ** 2  # relation pairs per forward: about those of one report at MAX_TOKENS (length_batches)

_ENGINES: dict[tuple[str, str, str], object] = {}
Annotation = dict  # {"text": str, "entities": {id: {"tokens", "label", "relations"}}}
EMPTY_ANNOTATION: Annotation = {"text": "", "entities": {}}


# -------------------------------------------------------------------------------------- pure feature math
def entity_relation_sets(annotation: Annotation) -> tuple[set, set]:
    """Entities {(tokens, label)} and relations {((tokens, label), (tokens, label), type)} of one report."""
    entities = annotation["entities"]
    ents, rels = set(), set()
    for entity in entities.values():
        source = (entity["tokens"], entity["label"])
        ents.add(source)
        for rel_type, target_id in entity["relations"]:
            target = entities.get(str(target_id))
            if target is not None:
                rels.add((source, (target["tokens"], target["label"]), rel_type))
    return ents, rels


def set_f1(pred: set, ref: set) -> float:
    """F1 = 2PR/(P+R) of two sets; 0 when either is empty or nothing matches."""
    hits = len(pred & ref)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(pred), hits / len(ref)
    return 2 * precision * recall / (precision + recall)


def radgraph_feature(pred_annotation: Annotation, ref_annotation: Annotation) -> float:
    """RadCliQ's RadGraph feature: (entity F1 + relation F1) / 2.

    docs/paper.md §3: entities are (tokens, label), relations ((tokens, label), (tokens, label), type);
    F1 = 2PR/(P+R), 0 when empty (``set_f1``).
    """
    pred_ents, pred_rels = entity_relation_sets(pred_annotation)
    ref_ents, ref_rels = entity_relation_sets(ref_annotation)
    return (set_f1(pred_ents, ref_ents) + set_f1(pred_rels, ref_rels)) / 2


# -------------------------------------------------------------------------------------------- annotating
def entities_of(ner: list, relations: list, words: list[str]) -> dict:
    """The entity dict of the package's ``radgraph.utils.get_entity(ner, relations, words)``, in linear time.

    ``ner`` items ``[start, end, label, ...]``; ``relations`` items ``[start, end, obj_start, obj_end, label,
    ...]``. As the package: entity ids count from 1 in ``ner`` order; a relation names the first entity with
    its object span and is dropped when there is none; relations keep their order.

    This is the annotation dict of the package's ``postprocess_reports``; the package's ``get_entity`` is
    quadratic in entities × relations, minutes on one 2 KB junk report."""
    first: dict[tuple, int] = {}
    for idx, item in enumerate(ner):
        first.setdefault((item[0], item[1]), idx + 1)
    by_source: dict[tuple, list] = {}
    for rel in relations:
        by_source.setdefault((rel[0], rel[1]), []).append(rel)
    out = {}
    for idx, item in enumerate(ner):
        start, end, label = item[0], item[1], item[2]
        rels = [[rel[4], str(first[(rel[2], rel[3])])] for rel in by_source.get((start, end), ())
                if (rel[2], rel[3]) in first]
        out[str(idx + 1)] = {"tokens": " ".join(words[start: end + 1]), "label": label, "start_ix": start,
                             "end_ix": end, "relations": rels}
    return out


class WordPieces:
    """Word-piece ids of single words (each alone, no special tokens: the package's mismatched indexer), kept
    per distinct word; the unseen words of a call are tokenized in one batched tokenizer call. At most
    ``max_words`` words are kept (the table starts over when full). ``__call__(words) -> [ids per word]``."""

    def __init__(self, tokenizer, max_words: int = 1 << 18) -> None:
        self.tokenizer, self.max_words = tokenizer, max_words
        self.table: dict[str, tuple[int, ...]] = {}

    def __call__(self, words: Sequence[str]) -> list[tuple[int, ...]]:
        new = [w for w in dict.fromkeys(words) if w not in self.table]
        if new and len(self.table) + len(new) > self.max_words:
            self.table.clear()
            new = list(dict.fromkeys(words))
        if new:
            ids = self.tokenizer(new, add_special_tokens=False, return_attention_mask=False,
                                 return_token_type_ids=False, verbose=False)["input_ids"]
            self.table.update(zip(new, map(tuple, ids)))
        return [self.table[w] for w in words]


def cap_words(words: list[str], tokenizer, max_tokens: int | None,
              pieces: WordPieces | None = None) -> tuple[list[str], int | None]:
    """``(longest prefix of words whose word pieces plus special tokens fit in max_tokens, its word pieces)``.

    Words are tokenized as the package's mismatched indexer does (each alone, no special tokens; through
    ``pieces`` when given), only as far as the budget reaches, so the cost is bounded too.
    ``max_tokens=None``: ``(words, None)``."""
    if max_tokens is None:
        return words, None
    pieces = pieces or WordPieces(tokenizer)
    budget = max_tokens - tokenizer.num_special_tokens_to_add(pair=False)
    used, step = 0, max(budget, 1)
    for start in range(0, len(words), step):
        for k, ids in enumerate(pieces(words[start: start + step])):
            if used + len(ids) > budget:
                return words[: start + k], used
            used += len(ids)
    return words, used


def install_word_pieces(annotator) -> WordPieces:
    """The annotator's ``WordPieces`` table, installed once as the ``intra_word_tokenize`` of the package's
    tokenizer (idempotent). Same word pieces, offsets and type ids as the package's, which tokenizes word by
    word (one tokenizer call and one ``dataclasses.replace`` per word piece): here each distinct word is
    tokenized once, in batches, and its ``Token`` s are kept."""
    indexer = annotator.reader._token_indexers["bert"]
    wrapper = indexer._allennlp_tokenizer
    if getattr(wrapper, "_radvlm_pieces", None) is not None:
        return wrapper._radvlm_pieces
    from radgraph.allennlp.data.tokenizers import Token

    pieces = WordPieces(indexer._tokenizer)
    tokens_of: dict[tuple[int, ...], tuple] = {}
    type_id = wrapper.single_sequence_token_type_id
    head, tail = wrapper.single_sequence_start_tokens, wrapper.single_sequence_end_tokens

    def intra_word_tokenize(string_tokens):
        tokens, offsets = list(head), []
        for ids in pieces(string_tokens):
            if not ids:
                offsets.append(None)
                continue
            made = tokens_of.get(ids)
            if made is None:
                if len(tokens_of) >= pieces.max_words:
                    tokens_of.clear()
                made = tokens_of[ids] = tuple(Token(text=t, text_id=i, type_id=type_id) for i, t in
                                              zip(ids, pieces.tokenizer.convert_ids_to_tokens(list(ids))))
            offsets.append((len(tokens), len(tokens) + len(ids) - 1))
            tokens.extend(made)
        return tokens + list(tail), offsets

    wrapper.intra_word_tokenize = intra_word_tokenize
    wrapper._radvlm_pieces = pieces
    return pieces


def report_words(annotator, text: str, max_tokens: int | None = MAX_TOKENS) -> tuple[list[str], int]:
    """``(words, length)`` of one report as the model reads it: the package's word split
    (``preprocess_reports``) cut to ``max_tokens`` word pieces (``cap_words``); ``length`` is its word pieces
    (its words when ``max_tokens`` is None). ``([], 0)``: nothing for the model (an empty report)."""
    from radgraph.utils import preprocess_reports

    words = preprocess_reports([text], annotator.model_type)[0]["sentences"][0]
    pieces = install_word_pieces(annotator)
    words, count = cap_words(words, annotator.reader._token_indexers["bert"]._tokenizer, max_tokens, pieces)
    if not words or count == 0:
        return [], 0
    return words, len(words) if count is None else count


def sentences_independent(model) -> bool:
    """Whether the sentences of one document are annotated independently: no coreference or event heads (the
    RadGraph configs), so reports can share a forward as the sentences of one document."""
    weights = model._loss_weights
    return weights["coref"] == 0 and weights["events"] == 0 and model._coref.coref_prop == 0


def install_decoders(model) -> None:
    """Replace the ``predict`` of the loaded model's NER and relation heads by tensor decoders (idempotent).

    They give per sentence the package's predictions as plain lists in sentence offsets, ``[start, end,
    label]`` and ``[start, end, obj_start, obj_end, label]``, in the package's order: the same arg-max
    (``max`` over labels, label 0 / the dummy class is none), the NER span mask, relations between the first
    ``num_spans_to_keep`` pruned spans, row-major. Two differences from the package's loops: the relation rows
    are cut to ``num_spans_to_keep`` too (the package masks only the columns; in a document of several
    sentences the pruner pads a shorter sentence's rows with a repeated span, which would add relations that
    its one-sentence forward has not), and no per-item Python objects (``.item()`` per span and relation).
    The model's ``make_output_human_readable`` is not used on these outputs."""
    if getattr(model, "_radvlm_decoders", False):
        return
    ner, relation, vocab = model._ner, model._relation, model.vocab
    names: dict[str, list[str]] = {}

    def labels_of(namespace: str) -> list[str]:
        if namespace not in names:
            names[namespace] = [vocab.get_token_from_index(i, namespace) for i in range(vocab.get_vocab_size(namespace))]
        return names[namespace]

    def ner_predict(ner_scores, spans, span_mask, metadata):
        label_names = labels_of(ner._active_namespace)
        _, labels = ner_scores.max(dim=2)
        hit = (labels != 0) & span_mask.bool()
        out = []
        for b in range(labels.size(0)):
            idx = hit[b].nonzero().squeeze(1)
            out.append([[start, end, label_names[label]]
                        for (start, end), label in zip(spans[b, idx].tolist(), labels[b, idx].tolist())])
        return out

    def relation_predict(top_spans, relation_scores, num_spans_to_keep, metadata):
        label_names = labels_of(relation._active_namespace)
        _, labels = relation_scores.max(dim=-1)
        labels -= 1  # the dummy (no relation) class becomes -1
        out = []
        for b, keep in enumerate(num_spans_to_keep.tolist()):
            kept, lab = top_spans[b, :keep].tolist(), labels[b, :keep, :keep]
            pairs = (lab >= 0).nonzero()
            out.append([[*kept[i], *kept[j], label_names[label]]
                        for (i, j), label in zip(pairs.tolist(), lab[pairs[:, 0], pairs[:, 1]].tolist())])
        return None, out

    ner.predict, relation.predict = ner_predict, relation_predict
    model._radvlm_decoders = True


def report_spans(n_words: int, max_width: int) -> torch.Tensor:  # (n_spans, 2)
    """Every span ``[start, end]`` (inclusive) of at most ``max_width`` words of an ``n_words`` report, by start
    then end: the package reader's ``enumerate_spans`` order, ``n·w − w(w−1)/2`` spans for ``w = min(max_width,
    n)``."""
    starts = torch.arange(n_words).repeat_interleave(max_width)  # (n·w,)
    ends = starts + torch.arange(max_width).repeat(n_words)
    keep = ends < n_words
    return torch.stack((starts[keep], ends[keep]), dim=1)


def pad_rows(rows: list[list], fill, dtype: torch.dtype) -> torch.Tensor:  # (len(rows), longest, *item)
    """``rows`` of equal-shaped items as one tensor, each row right-padded with ``fill`` to the longest."""
    longest = max(len(row) for row in rows)
    return torch.tensor([list(row) + [fill] * (longest - len(row)) for row in rows], dtype=dtype)


def model_inputs(annotator, reports: list[list[str]]) -> dict:
    """The package model's forward inputs for non-empty word lists as the sentences of one document, built
    directly: the tensors the package's reader (``text_to_instance``) and collation give, without one
    allennlp field object per span (about 8 per word).

    ``{"text": {"bert": {token_ids, type_ids, wordpiece_mask, segment_concat_mask (1, R, P), mask (1, R, W),
    offsets (1, R, W, 2)}}, "spans": (1, R, S, 2), "metadata": [Document]}`` for R reports, P word pieces,
    W words and S spans at most; pads as the package's: token ids with the tokenizer's pad id, masks False,
    type ids and offsets 0, spans −1. Word pieces come from the mismatched indexer itself
    (``tokens_to_indices``: special tokens, offsets and the 512-piece folding as the package's)."""
    from radgraph.allennlp.data.tokenizers import Token
    from radgraph.dygie.data.dataset_readers.document import Document

    reader = annotator.reader
    indexer = reader._token_indexers["bert"]
    vocab = annotator.model.vocab
    normalized = [[reader._normalize_word(w) for w in words] for words in reports]
    indexed = [indexer.tokens_to_indices([Token(w) for w in words], vocab) for words in normalized]
    pad_id = indexer._tokenizer.pad_token_id
    text = {}
    for key in indexed[0]:
        rows = [item[key] for item in indexed]
        if key == "offsets":
            text[key] = pad_rows(rows, (0, 0), torch.long)
        elif key == "type_ids":
            text[key] = pad_rows(rows, 0, torch.long)
        elif key == "token_ids":
            text[key] = pad_rows(rows, 0 if pad_id is None else pad_id, torch.long)
        else:  # mask, wordpiece_mask, segment_concat_mask
            text[key] = pad_rows(rows, False, torch.bool)
    width = reader._max_span_width
    spans = [report_spans(len(words), width) for words in normalized]
    longest = max(len(s) for s in spans)
    span_tensor = torch.full((len(spans), longest, 2), -1, dtype=torch.long)
    for row, s in enumerate(spans):
        span_tensor[row, : len(s)] = s
    document = Document.from_json({"doc_key": "0", "sentences": reports, "dataset": annotator.model_type})
    return {"text": {"bert": {key: value[None] for key, value in text.items()}}, "spans": span_tensor[None],
            "metadata": [document]}


def annotate_words(annotator, reports: list[list[str]]) -> list[Annotation]:
    """The annotations of non-empty word lists (``report_words``) in one forward of the package's model.

    The reports are the sentences of one document (the package's reader, ``text_to_instance``, and collation;
    the model pads the sentences and masks word pieces, words and spans), so the forward and the decoding
    (``install_decoders``) see each report as its own one-sentence document does: its annotation is the one of
    ``annotate_words(annotator, [words])``, which is the package's ``RadGraph.forward`` of that report with the
    annotation dict of its ``postprocess_reports`` (``entities_of``). Needs ``sentences_independent``."""
    from radgraph.utils import batch_to_device

    install_decoders(annotator.model)
    install_word_pieces(annotator)
    batch = model_inputs(annotator, reports)
    with torch.no_grad():
        output = annotator.model(**batch_to_device(batch, annotator.device))
    return [{"text": " ".join(words), "data_source": None, "data_split": "inference",
             "entities": entities_of(ner, relations, words)}
            for words, ner, relations in zip(reports, output["ner"]["predictions"], output["relation"]["predictions"])]


def annotate_text(annotator, text: str, max_tokens: int | None = MAX_TOKENS) -> Annotation:
    """The package's annotation of one report (``RadGraph.forward`` of one text), cut to ``max_tokens``.

    As the package's ``RadGraph.forward`` does: its word split ``preprocess_reports``, reader and model; then
    the annotation dict of its ``postprocess_reports`` (``entities_of``); ``annotate_words`` of one report.

    Bounded input (``max_tokens``, default 512: the BERT window of the RadGraph models): a report whose word
    pieces, with [CLS] and [SEP], exceed it is cut to its longest prefix of words (the package's words) that
    fits (``cap_words``); shorter reports are unchanged. Deviation: the package folds longer inputs into
    512-piece windows and scores every span and span pair of the whole text, so its cost and memory grow with
    the square of the length (relation pruning keeps 0.5 spans per word and scores every pair). A text without
    word pieces (nothing after the cut, only characters the tokenizer drops) is an empty report: entities {},
    value 0 (the real low score, not NaN). ``max_tokens=None`` cuts nothing.
    """
    words, _ = report_words(annotator, text, max_tokens)
    if not words:
        return {"text": "", "entities": {}}
    return annotate_words(annotator, [words])[0]


def length_batches(lengths: Sequence[int], batch_size: int, widths: Sequence[int] | None = None,
                   max_pairs: int = MAX_BATCH_PAIRS) -> list[list[int]]:
    """Indices of ``lengths`` in batches of at most ``batch_size`` of similar length: sorted by length (ties in
    input order), then cut in order; every index exactly once.

    ``widths`` (pruned spans per report, optional): a batch also stops before ``len(batch) * max(width)²``
    (the relation pairs the model scores, padded) passes ``max_pairs``, so a batch of long reports holds about
    the memory of one longest report; a report alone is always a batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches: list[list[int]] = []
    widest = 0
    for i in sorted(range(len(lengths)), key=lambda k: lengths[k]):
        width = widths[i] if widths is not None else 0
        grown = max(widest, width)
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * grown ** 2 <= max_pairs:
            batches[-1].append(i)
            widest = grown
        else:
            batches.append([i])
            widest = width
    return batches


# -------------------------------------------------------------------------------------------- loading
def missing_weights_message(model_type: str, model_dir: str | None, exc: BaseException) -> str:
    from radgraph.radgraph import CACHE_DIR

    where = model_dir or os.path.join(CACHE_DIR, model_type)
    return (
        f"RadGraph model {model_type!r} could not be loaded ({type(exc).__name__}: {exc}). Scores are NaN. "
        f"Put the extracted {model_type}.tar.gz from the hub repo {RADGRAPH_REPO} (config.json, vocabulary/, "
        f"weights.th) in {where} (or pass model_dir=<folder>); the BERT named in its config.json must also be "
        "reachable (hub or local HF cache)."
    )


def load_annotator(model_type: str, model_dir: str | None, device: str):
    """A ``radgraph.RadGraph`` annotator, cached per process; raises what loading raised.

    Weights: ``model_dir`` is a folder holding the extracted ``<model_type>.tar.gz`` of the hub repo
    ``StanfordAIMI/RRG_scorers`` (``config.json``, ``vocabulary/``, ``weights.th``); without it the package's
    cache folder is used and downloaded into when the network allows. The model config also names a BERT (hub
    id or folder) whose config and tokenizer must be reachable. transformers 5 removed two tokenizer methods the
    package calls; ``metrics._compat`` restores them.
    """
    key = (model_type, os.path.abspath(model_dir) if model_dir else "", device)
    return load_once(_ENGINES, key, lambda: _build_annotator(model_type, model_dir, device))


def radgraph_cuda_index(device: str) -> int:
    """The package's ``cuda`` argument for ``device``: -1 on cpu, else the CUDA index of :func:`resolve_device`
    (``"cuda"`` -> this rank's GPU, never a silent 0 for another rank)."""
    dev = torch.device(resolve_device(device))
    if dev.type == "cpu":
        return -1
    if dev.type != "cuda":
        raise ValueError(f"RadGraphF1: the radgraph package runs on cpu or cuda, not {device!r}")
    return 0 if dev.index is None else dev.index  # index None only without CUDA: the package then fails itself


def _build_annotator(model_type: str, model_dir: str | None, device: str):
    _compat.apply()
    from radgraph import RadGraph

    cache_dir = None
    if model_dir is not None:
        missing = [name for name in REQUIRED_FILES if not os.path.exists(os.path.join(model_dir, name))]
        if missing:
            raise FileNotFoundError(f"RadGraph model folder {model_dir} lacks {', '.join(missing)}")
        model_dir = os.path.abspath(model_dir)
        if os.path.basename(model_dir) == model_type:
            cache_dir = os.path.dirname(model_dir)
        else:  # the package reads <cache_dir>/<model_type>: point a symlink of that name at the folder
            cache_dir = tempfile.mkdtemp(prefix="radgraph-")
            os.symlink(model_dir, os.path.join(cache_dir, model_type))
    cuda = radgraph_cuda_index(device)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its device
        return RadGraph(model_type=model_type, model_cache_dir=cache_dir, cuda=cuda)


# -------------------------------------------------------------------------------------------- metric
class RadGraphF1(PerSampleMetric):
    """Per-sample RadGraph reward; ``compute`` is the mean over scored samples.

    - ``reward_level="simple"|"partial"|"complete"``: the package's ``compute_reward`` per pair (the
      RadGraph-F1 of the paper's table and of the "complete" ablation reward). As ``F1RadGraph`` does, a pair
      with an empty prediction or reference scores 0, and so does a pair where either side has no entity.
    - ``reward_level="radcliq"``: ``radgraph_feature``, RadCliQ's RadGraph feature (docs/paper.md §3).

    Batching and caching: one ``score`` call annotates every distinct text once, ``batch_size`` reports per
    forward (default 16; reports of similar length together, ``length_batches``; ``batch_size=1`` is one
    report per forward, with the same annotations: ``annotate_words``); reference annotations are kept in an
    LRU cache (``stats["reference_annotations"]`` counts references actually annotated). Cancellation
    (``metrics.base.check_cancelled``) is checked before each batch. The annotator is loaded lazily once per
    (model, folder, device) in a module-level cache (``load_annotator``), never as a submodule, so it is not in
    ``state_dict()``. When loading fails, scores are NaN with one warning saying where to put the weights
    (``strict=True`` raises); a report the model fails on is NaN (a failing batch is redone report by report).
    Device: None or ``"cuda"`` is this process's own GPU (``LOCAL_RANK``, ``metrics.base.resolve_device``;
    ``radgraph_cuda_index``).
    """

    higher_is_better = True
    worst_value = 0.0

    def __init__(
        self,
        model_type: str = "radgraph-xl",
        reward_level: Literal["simple", "partial", "complete", "radcliq"] = "partial",
        model_dir: str | None = None,
        device: str | None = None,
        strict: bool = False,
        reference_cache_size: int = 16384,
        max_tokens: int | None = MAX_TOKENS,
        batch_size: int = BATCH_SIZE,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if max_tokens is not None and max_tokens < 3:
            raise ValueError(f"RadGraphF1: max_tokens must be >= 3 (room for [CLS], [SEP] and a piece), got {max_tokens}")
        if batch_size < 1:
            raise ValueError(f"RadGraphF1: batch_size must be >= 1, got {batch_size}")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"RadGraphF1: model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        if reward_level not in ("simple", "partial", "complete", "radcliq"):
            raise ValueError(f"RadGraphF1: unknown reward_level {reward_level!r}")
        self.model_type = model_type
        self.reward_level = reward_level
        self.model_dir = model_dir
        self.model_device = resolve_device(device)  # this rank's GPU for None or "cuda"
        self.strict = strict
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.reference_cache_size = reference_cache_size
        self.reference_cache = ReferenceCache(reference_cache_size)
        self.stats = {"reference_annotations": 0, "prediction_annotations": 0}

    def _annotator(self):
        try:
            return load_annotator(self.model_type, self.model_dir, self.model_device)
        except Exception as exc:
            message = missing_weights_message(self.model_type, self.model_dir, exc)
            if self.strict:
                raise RuntimeError(message) from exc
            warn_once(f"radgraph:{self.model_type}:{self.model_dir}", message)
            return None

    def available(self) -> bool:
        return self._annotator() is not None

    def _failed(self, exc: Exception) -> None:
        """A report the model failed on: raise when strict, else warn once; its annotation is None (NaN)."""
        if self.strict:
            raise exc
        warn_once(f"radgraph-fail:{exc}", f"RadGraph failed on a report ({exc!r}); its scores are NaN")

    def _annotate_alone(self, annotator, words: list[str]) -> Annotation | None:
        try:
            return annotate_words(annotator, [words])[0]
        except Exception as exc:
            self._failed(exc)
            return None

    def _run(self, annotator, texts: list[str]) -> dict[str, Annotation | None]:
        """Annotations of distinct non-empty ``texts``, ``batch_size`` reports per forward (``length_batches``);
        a failing report gets None. A batch whose forward fails is redone one report at a time, so only the
        reports that fail alone are None. Cancellation is checked before each batch (and each redone report)."""
        out: dict[str, Annotation | None] = {}
        todo: list[tuple[str, list[str], int]] = []
        for text in texts:
            try:
                words, length = report_words(annotator, text, self.max_tokens)
            except Exception as exc:
                self._failed(exc)
                out[text] = None
                continue
            if words:
                todo.append((text, words, length))
            else:
                out[text] = {"text": "", "entities": {}}
        size = self.batch_size if sentences_independent(annotator.model) else 1
        per_word = annotator.model._relation._spans_per_word
        widths = [math.ceil(len(words) * per_word) for _, words, _ in todo]
        for batch in length_batches([length for *_, length in todo], size, widths):
            check_cancelled()
            items = [todo[i] for i in batch]
            if len(items) == 1:
                out[items[0][0]] = self._annotate_alone(annotator, items[0][1])
                continue
            try:
                out.update(zip((text for text, *_ in items), annotate_words(annotator, [w for _, w, _ in items])))
            except Exception:
                for text, words, _ in items:  # redo alone: only the reports that fail by themselves are NaN
                    check_cancelled()
                    out[text] = self._annotate_alone(annotator, words)
        return out

    def annotate(self, preds: Sequence[str], targets: Sequence[str]) -> dict[str, Annotation | None] | None:
        """Annotation of every distinct text (references through the cache); None if the model is missing."""
        annotator = self._annotator()
        if annotator is None:
            return None
        table, new_refs, new_preds = self.reference_cache.split(
            (t for t in targets if t.strip()), (p for p in preds if p.strip()), known={"": EMPTY_ANNOTATION})
        found = self._run(annotator, new_refs + new_preds)
        table.update(found)
        self.stats["reference_annotations"] += len(new_refs)
        self.stats["prediction_annotations"] += len(new_preds)
        self.reference_cache.store(found, new_refs)
        return table

    def pair_value(self, pred: Annotation, ref: Annotation) -> float:
        if self.reward_level == "radcliq":
            return radgraph_feature(pred, ref)
        if not pred["entities"] or not ref["entities"]:
            return 0.0
        from radgraph.rewards import compute_reward

        return float(compute_reward(pred, ref, self.reward_level))

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,)
        check_pairs(preds, targets)
        table = self.annotate(preds, targets) if preds else {}
        if table is None:
            return torch.full((len(preds),), float("nan"), dtype=torch.float32)
        out = []
        for pred, ref in zip(preds, targets):
            pa, ra = table.get(pred if pred.strip() else ""), table.get(ref if ref.strip() else "")
            out.append(float("nan") if pa is None or ra is None else self.pair_value(pa, ra))
        return torch.tensor(out, dtype=torch.float32)
