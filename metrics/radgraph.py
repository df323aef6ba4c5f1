"""RadGraph-F1 rewards and the RadGraph feature of RadCliQ, on the ``radgraph`` package (0.1.18).

The package annotates a report with entities ``{"tokens", "label", "relations": [[type, target_id], …]}``
(labels ANAT-DP, OBS-DP, OBS-U, OBS-DA; relations modify, located_at, suggestive_of). ``RadGraphF1`` scores
pairs of reports with the package's ``compute_reward`` or with RadCliQ's feature (docs/paper.md §3,
``radgraph_feature``).

Annotations come from ``metrics.radgraph_annotate``, with the package's model and the package's annotations,
and these deviations from its path: each report is cut to ``max_tokens`` word pieces (default 512, the BERT
window), and reports are annotated ``batch_size`` at a time (default 16, reports of similar length together)
with inputs built as tensors; see that module.
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
from metrics.radgraph_annotate import (
    EMPTY_ANNOTATION,
    MAX_TOKENS,
    Annotation,
    annotate_words,
    length_batches,
    report_words,
    sentences_independent,
)

RADGRAPH_REPO = "StanfordAIMI/RRG_scorers"
MODEL_TYPES = ("radgraph", "radgraph-xl", "modern-radgraph-xl", "echograph")
REQUIRED_FILES = ("config.json", "weights.th", "vocabulary")
BATCH_SIZE = 16  # reports per forward

_ENGINES: dict[tuple[str, str, str], object] = {}


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
