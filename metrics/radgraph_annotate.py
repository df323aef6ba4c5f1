"""Annotating reports with the ``radgraph`` package's model (0.1.18), in batches and with bounded inputs.

The package's own path (``RadGraph.forward``) reads each report with its allennlp reader (one field object per
enumerated span), collates it alone, runs one forward per report and builds the entity dict in time quadratic
in entities × relations. Here, with the same model and the same annotations:

- each report is cut to ``max_tokens`` word pieces (``cap_words``, ``report_words``; the package folds longer
  inputs into windows at a cost that grows with the square of the length);
- word pieces are tokenized once per distinct word (``WordPieces``, ``install_word_pieces``);
- reports of similar length (``length_batches``) share one forward as the sentences of one document, each
  report's annotation equal to its own one-report forward (``annotate_words``; ``sentences_independent``);
- the forward's inputs are built as tensors (``model_inputs``, equal to the package's reader and collation);
- the heads decode from the label tensors (``install_decoders``) and the entity dict is built in linear time
  (``entities_of``).

``metrics.radgraph`` loads the annotator and scores pairs with these annotations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_TOKENS = 512  # word pieces with [CLS] and [SEP]: the BERT window of the RadGraph models
MAX_BATCH_PAIRS = 256 ** 2  # relation pairs per forward: about those of one report at MAX_TOKENS (length_batches)

Annotation = dict  # {"text": str, "entities": {id: {"tokens", "label", "relations"}}}
EMPTY_ANNOTATION: Annotation = {"text": "", "entities": {}}


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
