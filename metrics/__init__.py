"""Metrics of radvlm: each is a torchmetrics ``Metric`` usable both as a GRPO reward and a validation metric.

``import metrics`` is cheap: the names below are imported from their submodules on first use (torchmetrics,
transformers and the scorer packages take seconds to import), so a script that needs one box metric does not
pay for BERTScore. ``from metrics.grounding import SoftF1`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name → submodule that defines it
_EXPORTS = {
    "PerSampleMetric": "base", "float32_math": "base",
    "ScoringCancelled": "base", "cancel_scope": "base", "check_cancelled": "base",
    "BERTScore": "bertscore", "minilm_path": "bertscore",
    "format_boxes": "boxes", "pairwise_iou": "boxes", "parse_boxes": "boxes",
    "AbnormalityClassification": "classification", "precision_recall_f1": "classification",
    "predicted_labels": "classification", "record_indicators": "classification",
    "CheXbert": "chexbert", "CheXbertF1": "chexbert", "CheXbertModel": "chexbert", "CheXbertSimilarity": "chexbert",
    "BoxFormat": "grounding", "GroundingMAP": "grounding", "SoftF1": "grounding", "average_precision": "grounding",
    "soft_f1": "grounding",
    "GREEN": "green", "green_prompt": "green", "parse_green": "green",
    "ChatClient": "judge",
    "RadCliQ": "radcliq", "radcliq_v1": "radcliq",
    "RadGraphF1": "radgraph", "radgraph_feature": "radgraph",
    "BLEU": "text", "GLEU": "text", "ROUGEL": "text", "bleu": "text", "gleu": "text", "rouge_l": "text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'metrics' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"metrics.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
