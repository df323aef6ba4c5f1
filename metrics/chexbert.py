"""CheXbert labeler and encoder (our implementation) and the metrics built on it: CheXbert F1 and RadCliQ's
semantic embedding similarity.

Model: docs/paper.md §7, Smit et al. 2020 (``CheXbertModel``, ``CheXbert``); metrics: ``CheXbertF1`` and
``CheXbertSimilarity``. Deviation: the per-sample F1 that ``CheXbertF1.score`` gives rewards is our definition
(``sample_f1``); the paper's CheXbert F1 is the corpus-level one of ``compute``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

import torch
from torch import nn

from metrics.base import PerSampleMetric, ReferenceCache, check_cancelled, check_pairs, load_once, resolve_device, warn_once

CONDITIONS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
    "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices", "No Finding",
)
SUBSET_5 = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
SUBSET_5_INDEX = tuple(CONDITIONS.index(c) for c in SUBSET_5)  # (1, 4, 5, 7, 9)
CHEXBERT_REPO = "StanfordAIMI/RRG_scorers"
DEFAULT_CHECKPOINT = os.path.join(os.path.expanduser("~"), ".cache", "radvlm", "chexbert.pth")
MAX_TOKENS = 512

_ENGINES: dict[tuple, object] = {}


class CheXbertModel(nn.Module):
    """BERT encoder + 14 linear heads on [CLS] (13 × 4 classes, "No Finding" × 2).

    Model (docs/paper.md §7, Smit et al. 2020): a bert-base-uncased ``BertModel`` and 14 linear heads on the
    last-layer [CLS] state (dropout before them at training): 13 observations with 4 classes (0 blank,
    1 positive, 2 negative, 3 uncertain) and "No Finding" with 2. The public ``chexbert.pth`` holds
    ``model_state_dict`` with ``module.``-prefixed keys (``bert.*``, ``linear_heads.N.*``); it is read with
    ``torch.load(weights_only=True)`` (``load_state``).
    """

    def __init__(self, config, dropout: float = 0.1) -> None:
        super().__init__()
        from transformers import BertModel

        self.bert = BertModel(config)
        self.dropout = nn.Dropout(dropout)
        hidden = config.hidden_size
        self.linear_heads = nn.ModuleList([nn.Linear(hidden, 4) for _ in range(13)] + [nn.Linear(hidden, 2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list]:
        cls = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]  # (B, H)
        logits = [head(self.dropout(cls)) for head in self.linear_heads]  # 13 × (B, 4), (B, 2)
        return cls, logits


def load_state(path: str) -> dict[str, torch.Tensor]:
    """The model weights of a ``chexbert.pth`` (``model_state_dict``, ``module.`` prefix removed)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("model_state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a dict with 'model_state_dict', got {type(blob).__name__}")
    return {(k.removeprefix("module.")): v for k, v in state.items()}


def resolve_checkpoint(checkpoint: str | None) -> str:
    """A readable ``chexbert.pth`` path: the given one, the default cache file, or a hub download.

    ``checkpoint=None`` looks in ``~/.cache/radvlm/chexbert.pth`` and then tries
    ``hf_hub_download("StanfordAIMI/RRG_scorers", "chexbert.pth")``.
    """
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"CheXbert checkpoint not found: {checkpoint}")
        return checkpoint
    if os.path.isfile(DEFAULT_CHECKPOINT):
        return DEFAULT_CHECKPOINT
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=CHEXBERT_REPO, filename="chexbert.pth")


class CheXbert:
    """A loaded CheXbert: ``labels(texts) -> (N, 14)`` classes and ``embeddings(texts) -> (N, H)`` [CLS] states.

    Input: whitespace collapsed, WordPiece ids cut to 510, [CLS] … [SEP] (at most 512, "511 + [SEP]" as the
    original), so the model's cost per text is bounded whatever its length; :func:`metrics.base.check_cancelled`
    is checked before every batch. Config and tokenizer come from ``bert_name_or_path``.
    """

    def __init__(self, checkpoint: str | None = None, bert_name_or_path: str = "bert-base-uncased",
                 device: str | None = None, batch_size: int = 32) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.device = resolve_device(device)  # this rank's GPU for None or "cuda"
        self.batch_size = batch_size
        path = resolve_checkpoint(checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(bert_name_or_path)
        self.model = CheXbertModel(AutoConfig.from_pretrained(bert_name_or_path))
        state = load_state(path)
        expected = set(self.model.state_dict())
        # position ids were a saved buffer in older transformers; they are fixed (0..511), never learned
        state = {k: v for k, v in state.items() if k in expected or not k.endswith("embeddings.position_ids")}
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the CheXbert architecture on {bert_name_or_path}: "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()

    def token_ids(self, text: str) -> list[int]:
        """[CLS] + at most 510 WordPiece ids + [SEP] of the whitespace-normalised text."""
        text = re.sub(r"\s+", " ", text).strip()
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []
        return [self.tokenizer.cls_token_id] + ids[: MAX_TOKENS - 2] + [self.tokenizer.sep_token_id]

    @torch.no_grad()
    def run(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:  # (N, 14) long, (N, H) float
        """Classes and [CLS] embeddings, batched by length."""
        ids = [self.token_ids(t) for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        labels = torch.zeros(len(ids), len(CONDITIONS), dtype=torch.long)
        hidden = self.model.bert.config.hidden_size
        embeddings = torch.zeros(len(ids), hidden, dtype=torch.float32)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            check_cancelled()
            rows = order[start:start + self.batch_size]
            width = max(len(ids[i]) for i in rows)
            batch = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for j, i in enumerate(rows):
                batch[j, : len(ids[i])] = torch.tensor(ids[i])
                mask[j, : len(ids[i])] = 1
            cls, logits = self.model(batch.to(self.device), mask.to(self.device))
            index = torch.tensor(rows)
            labels[index] = torch.stack([lg.argmax(-1) for lg in logits], dim=1).cpu()  # (B, 14)
            embeddings[index] = cls.float().cpu()
        return labels, embeddings

    def labels(self, texts: Sequence[str]) -> torch.Tensor:  # (N, 14) long
        return self.run(texts)[0]

    def embeddings(self, texts: Sequence[str]) -> torch.Tensor:  # (N, H)
        return self.run(texts)[1]


def get_chexbert(checkpoint: str | None, bert_name_or_path: str, device: str, batch_size: int) -> CheXbert:
    """A process-wide shared ``CheXbert``; raises (every time) what loading raised the first time."""
    key = (os.path.abspath(checkpoint) if checkpoint else None, bert_name_or_path, device, batch_size)
    return load_once(_ENGINES, key, lambda: CheXbert(checkpoint, bert_name_or_path, device, batch_size))


def positive(labels: torch.Tensor) -> torch.Tensor:  # (N, 14) long -> (N, 14) bool
    """Report-generation positives: class 1 (positive) or 3 (uncertain); "No Finding" only has 0/1."""
    return (labels == 1) | (labels == 3)


def sample_f1(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:  # (N, 14) bool ×2 -> (N,)
    """Per-sample 2TP / (2TP + FP + FN) over the labels; 1.0 when neither side has a positive."""
    tp = (pred & ref).sum(1).float()
    wrong = (pred ^ ref).sum(1).float()  # FP + FN
    denom = 2 * tp + wrong
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.ones_like(tp))


def micro_macro_f1(pred: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro and macro F1 of (N, C) bool labels; a class with no positive anywhere has F1 0 (macro)."""
    tp = (pred & ref).sum(0).double()  # (C,)
    fp = (pred & ~ref).sum(0).double()
    fn = (~pred & ref).sum(0).double()
    per_class = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
    denom = 2 * tp.sum() + fp.sum() + fn.sum()
    micro = 2 * tp.sum() / denom if denom > 0 else torch.zeros((), dtype=torch.float64)
    return micro, per_class.mean()


class _CheXbertMetric(PerSampleMetric):
    """Shared loading and reference caching of the CheXbert metrics.

    The model is loaded lazily once per process in a module-level cache (``get_chexbert``), never as a
    submodule, so it is not in ``state_dict()``; reference outputs are cached per distinct reference,
    ``stats`` counts them. A missing checkpoint gives NaN scores and one warning saying where to put
    ``chexbert.pth`` (``strict=True`` raises).
    Device: None or ``"cuda"`` is this process's own GPU (``LOCAL_RANK``, ``metrics.base.resolve_device``).
    """

    def __init__(self, checkpoint: str | None = None, bert_name_or_path: str = "bert-base-uncased",
                 device: str | None = None, batch_size: int = 32, strict: bool = False,
                 reference_cache_size: int = 16384, **kwargs) -> None:
        super().__init__(**kwargs)
        self.checkpoint = checkpoint
        self.bert_name_or_path = bert_name_or_path
        self.model_device = resolve_device(device)  # this rank's GPU for None or "cuda"
        self.batch_size = batch_size
        self.strict = strict
        self.reference_cache_size = reference_cache_size
        self.reference_cache = ReferenceCache(reference_cache_size)
        self.stats = {"reference_encodings": 0, "prediction_encodings": 0}

    def _model(self) -> CheXbert | None:
        try:
            return get_chexbert(self.checkpoint, self.bert_name_or_path, self.model_device, self.batch_size)
        except Exception as exc:
            message = (
                f"CheXbert could not be loaded ({type(exc).__name__}: {exc}). Scores are NaN. Put the public "
                f"chexbert.pth (hub repo {CHEXBERT_REPO}) at {DEFAULT_CHECKPOINT} or pass checkpoint=<path>; "
                f"the config and tokenizer of {self.bert_name_or_path!r} must be reachable (hub, HF cache or "
                "a local folder as bert_name_or_path)."
            )
            if self.strict:
                raise RuntimeError(message) from exc
            warn_once(f"chexbert:{self.checkpoint}:{self.bert_name_or_path}", message)
            return None

    def available(self) -> bool:
        return self._model() is not None

    def outputs(self, preds: Sequence[str], targets: Sequence[str]) -> tuple | None:
        """(pred labels (N,14), ref labels (N,14), pred emb (N,H), ref emb (N,H)), or None without a model."""
        check_pairs(preds, targets)
        model = self._model()
        if model is None:
            return None
        table, new_refs, new_preds = self.reference_cache.split(targets, preds)
        texts = new_refs + new_preds
        if texts:
            try:
                labels, emb = model.run(texts)
            except Exception as exc:
                if self.strict:
                    raise
                warn_once(f"chexbert-fail:{exc}", f"CheXbert failed ({exc!r}); scores are NaN")
                return None
            table.update({t: (labels[i].clone(), emb[i].clone()) for i, t in enumerate(texts)})
        self.stats["reference_encodings"] += len(new_refs)
        self.stats["prediction_encodings"] += len(new_preds)
        self.reference_cache.store(table, new_refs)
        hidden = model.model.bert.config.hidden_size
        stack = lambda col, side, shape: (
            torch.stack([table[t][col] for t in side]) if side else torch.zeros(shape, dtype=torch.float32)
        )
        return (stack(0, preds, (0, 14)).long(), stack(0, targets, (0, 14)).long(),
                stack(1, preds, (0, hidden)), stack(1, targets, (0, hidden)))


class CheXbertF1(_CheXbertMetric):
    """CheXbert label agreement: per-sample F1 as reward, micro/macro F1 over 14 and 5 from ``compute``.

    ``compute()`` returns micro and macro F1 over the 14 observations and over the 5 (Cardiomegaly, Edema,
    Consolidation, Atelectasis, Pleural Effusion); a label is positive when the class is 1 or 3 (for "No
    Finding": 1). Per-class F1 with no positives on either side counts 0 in the macro mean (sklearn's
    zero_division=0). State: per-sample predicted and reference label tensors (N, 14) (−1 rows where the model
    was unavailable, excluded). Per-sample ``score`` (our definition, for rewards): 2·TP / (2·TP + FP + FN)
    over that sample's 14 binary labels, and 1.0 when neither report has a positive label (full agreement).
    """

    higher_is_better = True
    worst_value = 0.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_state("pred_labels", default=[], dist_reduce_fx="cat")
        self.add_state("target_labels", default=[], dist_reduce_fx="cat")

    def _labels(self, preds: Sequence[str], targets: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.outputs(preds, targets)
        if out is None:  # unavailable: -1 rows, excluded from compute
            rows = torch.full((len(preds), len(CONDITIONS)), -1, dtype=torch.long)
            return rows, rows.clone()
        return out[0], out[1]

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,)
        pred, ref = self._labels(list(preds), list(targets))
        values = sample_f1(positive(pred), positive(ref))
        return values.masked_fill((pred < 0).any(1), float("nan"))

    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        pred, ref = self._labels(list(preds), list(targets))
        values = sample_f1(positive(pred), positive(ref)).masked_fill((pred < 0).any(1), float("nan"))
        self.values.append(values.to(self.device))
        self.pred_labels.append(pred.to(self.device))
        self.target_labels.append(ref.to(self.device))

    def compute(self) -> dict[str, torch.Tensor]:
        cat = lambda s: s if isinstance(s, torch.Tensor) else (
            torch.cat(s) if s else torch.zeros(0, len(CONDITIONS), dtype=torch.long, device=self.device))
        pred, ref = cat(self.pred_labels).reshape(-1, 14), cat(self.target_labels).reshape(-1, 14)
        keep = (pred >= 0).all(1) & (ref >= 0).all(1)
        pred, ref = positive(pred[keep]), positive(ref[keep])
        if pred.shape[0] == 0:
            nan = torch.tensor(float("nan"), dtype=torch.float32, device=self.device)
            return {k: nan for k in ("micro_f1_14", "macro_f1_14", "micro_f1_5", "macro_f1_5", "sample_f1")}
        micro14, macro14 = micro_macro_f1(pred, ref)
        idx = list(SUBSET_5_INDEX)
        micro5, macro5 = micro_macro_f1(pred[:, idx], ref[:, idx])
        return {
            "micro_f1_14": micro14.float(), "macro_f1_14": macro14.float(),
            "micro_f1_5": micro5.float(), "macro_f1_5": macro5.float(),
            "sample_f1": sample_f1(pred, ref).mean(),
        }


class CheXbertSimilarity(_CheXbertMetric):
    """Cosine similarity of CheXbert [CLS] embeddings of prediction and reference (RadCliQ's "semb").

    The embedding is the last hidden state of token 0 ([CLS]).
    """

    higher_is_better = True
    worst_value = -1.0

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,)
        out = self.outputs(list(preds), list(targets))
        if out is None:
            return torch.full((len(preds),), float("nan"), dtype=torch.float32)
        _, _, pred_emb, ref_emb = out
        return torch.nn.functional.cosine_similarity(pred_emb, ref_emb, dim=-1)
