"""RadGraph-F1 rewards and the RadGraph feature of RadCliQ, on the ``radgraph`` package (0.1.18).

The package annotates a report with entities ``{"tokens", "label", "relations": [[type, target_id], …]}``
(labels ANAT-DP, OBS-DP, OBS-U, OBS-DA; relations modify, located_at, suggestive_of). On top of it:

- ``RadGraphF1(reward_level="simple"|"partial"|"complete")``: the package's ``compute_reward`` per pair
  (the RadGraph-F1 of the paper's table and of the "complete" ablation reward). As ``F1RadGraph`` does, a pair
  with an empty prediction or reference scores 0, and so does a pair where either side has no entity.
- ``reward_level="radcliq"``: ``radgraph_feature`` = (entity F1 + relation F1) / 2, RadCliQ's RadGraph
  feature (REFERENCE.md §3): entities are (tokens, label), relations ((tokens, label), (tokens, label),
  type); F1 = 2PR/(P+R), 0 when empty.

Batching and caching: one ``score`` call annotates every distinct text once (radgraph itself runs its model
one report at a time); reference annotations are kept in an LRU cache (``stats["reference_annotations"]``
counts references actually annotated). The annotator is loaded lazily once per (model, folder, device) in a
module-level cache, never as a submodule, so it is not in ``state_dict()``.

Weights: ``model_dir`` is a folder holding the extracted ``<model_type>.tar.gz`` of the hub repo
``StanfordAIMI/RRG_scorers`` (``config.json``, ``vocabulary/``, ``weights.th``); without it the package's
cache folder is used and downloaded into when the network allows. The model config also names a BERT
(hub id or folder) whose config and tokenizer must be reachable. When loading fails, scores are NaN with one
warning saying where to put the weights (``strict=True`` raises). transformers 5 removed two tokenizer
methods the package calls; ``metrics._compat`` restores them.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Sequence
from typing import Literal

import torch

from metrics import _compat
from metrics.base import PerSampleMetric, ReferenceCache, check_pairs, load_once
from metrics.bertscore import default_device, warn_once

RADGRAPH_REPO = "StanfordAIMI/RRG_scorers"
MODEL_TYPES = ("radgraph", "radgraph-xl", "modern-radgraph-xl", "echograph")
REQUIRED_FILES = ("config.json", "weights.th", "vocabulary")

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
    """RadCliQ's RadGraph feature: (entity F1 + relation F1) / 2."""
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
    """A ``radgraph.RadGraph`` annotator, cached per process; raises what loading raised."""
    key = (model_type, os.path.abspath(model_dir) if model_dir else "", device)
    return load_once(_ENGINES, key, lambda: _build_annotator(model_type, model_dir, device))


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
    dev = torch.device(device)
    cuda = -1 if dev.type == "cpu" else (dev.index or 0)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints its device
        return RadGraph(model_type=model_type, model_cache_dir=cache_dir, cuda=cuda)


# -------------------------------------------------------------------------------------------- metric
class RadGraphF1(PerSampleMetric):
    """Per-sample RadGraph reward (see the module docstring); ``compute`` is the mean over scored samples."""

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
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"RadGraphF1: model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        if reward_level not in ("simple", "partial", "complete", "radcliq"):
            raise ValueError(f"RadGraphF1: unknown reward_level {reward_level!r}")
        self.model_type = model_type
        self.reward_level = reward_level
        self.model_dir = model_dir
        self.model_device = device or default_device()
        self.strict = strict
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

    def _run(self, annotator, texts: list[str]) -> dict[str, Annotation | None]:
        """Annotations of distinct non-empty ``texts`` in one package call; a failing report gets None."""
        if not texts:
            return {}
        try:
            with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
                out = annotator(texts)
            return {text: out.get(str(i)) for i, text in enumerate(texts)}
        except Exception as exc:
            if self.strict or len(texts) == 1:
                if self.strict:
                    raise
                warn_once(f"radgraph-fail:{exc}", f"RadGraph failed on a report ({exc!r}); its scores are NaN")
                return {texts[0]: None}
            merged: dict[str, Annotation | None] = {}
            for text in texts:  # isolate the failing report(s)
                merged.update(self._run(annotator, [text]))
            return merged

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
