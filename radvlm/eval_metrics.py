"""The metric objects of ``radvlm.evaluate``: which weights the model-based metrics use (``MetricSettings``,
``load_settings``), and ``Scorers``, which builds each model-based metric once and probes it.

Model-based metrics (``MetricSettings``: CLI flags or ``--metrics-config`` YAML/JSON with the same names):
BERTScore distilbert-base-uncased layer 5 rescaled; RadCliQ-v1 = ``metrics.radcliq.RadCliQ`` (its RadGraph
term with the ``radgraph`` model (``radcliq_radgraph_model``, folder ``radcliq_radgraph_dir``), as the
original RadCliQ and RadEval; distilroberta-base BERTScore rescaled, no idf; CheXbert embeddings; BLEU-2);
CheXbert ``chexbert.pth``; RadGraph-F1 (``radgraph_model``, default ``radgraph-xl``) from a folder or the
radgraph package cache; GREEN (``metrics.green.GREEN``) only with a judge: ``green_model`` (a local folder or
hub id of a causal LM, e.g. ``StanfordAIMI/GREEN-radllama2-7b``) or ``green_endpoint`` (an OpenAI-compatible
server serving ``green_model``, default that id; its key from the environment variable ``green_api_key_env``);
without one GREEN is ``unavailable: no GREEN judge configured``. Each is built once and probed with strict
scoring of one pair (``probe``; GREEN: its local judge is loaded, an endpoint is not called): a model that
cannot be loaded raises ``Unavailable`` and its columns become ``unavailable: <reason>``, never numbers.
The evaluation makes no network contact unless asked: the Hugging Face hub is offline (local folders and the
HF cache only, missing weights fail at once) unless ``--online`` or ``RADVLM_ALLOW_DOWNLOADS=1``
(``set_hub_mode``); GREEN's endpoint is called only when configured.

``radeval_variant`` (``--radeval-variant``) adds ``radcliq_radeval``: RadCliQ-v1 as RadEval 2.x defines it
where it differs from the paper's setting: BERTScore with idf weights over the references of the call (all
report pairs of the task), no lower-casing, no 2048-character cut, no short-answer floor, and the aggregate
reported as 1 / mean of the per-sample values. Its BLEU-2 term stays ours (RadEval takes pycocoevalcap's;
weight 4e-12).

Choices: the RadGraph-F1 column uses the radgraph package's ``partial`` level (the usual "RadGraph F1" of
RadEval / ReXrank; the paper does not name it; ``radgraph_level``). A local BERTScore folder without a
baseline table (``bertscore_baseline``) is used unrescaled and a note says so (not comparable with the paper).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from metrics.base import DOWNLOAD_ENV, downloads_allowed
from metrics.grounding import GroundingMAP, SoftF1
from metrics.text import GLEU, ROUGEL

PROBE_PAIR = ("The heart size is normal. There is a small left pleural effusion.",
              "Normal heart size. Small left pleural effusion, no pneumothorax.")


@dataclass
class MetricSettings:
    """Which weights the model-based metrics use (defaults: the paper's models, from the hub or HF cache)."""

    bertscore_model: str = "distilbert-base-uncased"  # hub id or local folder
    bertscore_layers: int | None = 5
    bertscore_baseline: str | None = None  # bert-score LAYER,P,R,F table (to rescale a local folder)
    radcliq_bertscore_model: str = "distilroberta-base"
    radcliq_bertscore_layers: int | None = None  # None: bert-score's default layer of a hub model
    radcliq_bertscore_baseline: str | None = None
    chexbert: str | None = None  # chexbert.pth; None: ~/.cache/radvlm/chexbert.pth, then the hub
    chexbert_bert: str = "bert-base-uncased"  # config and tokenizer of CheXbert's encoder
    radgraph_dir: str | None = None  # extracted radgraph model folder; None: the radgraph package cache
    radgraph_model: str = "radgraph-xl"  # the RadGraph-F1 column
    radgraph_level: str = "partial"
    radcliq_radgraph_model: str = "radgraph"  # RadCliQ's RadGraph term (the original RadCliQ's and RadEval's)
    radcliq_radgraph_dir: str | None = None  # its extracted model folder; None: the radgraph package cache
    green_model: str | None = None  # GREEN judge: local folder / hub id, or the model name at green_endpoint
    green_endpoint: str | None = None  # OpenAI-compatible base URL (http://host:8000/v1)
    green_api_key_env: str | None = None  # name of the environment variable holding the endpoint's key
    radeval_variant: bool = False  # also report RadCliQ-v1 as RadEval defines it (``radcliq_radeval``)
    device: str | None = None  # None: cuda when available
    offline: bool | None = None  # None/True: hub offline; False (--online): downloads allowed


class Unavailable(Exception):
    """A metric that cannot be computed: ``reason`` (one line, for tables) and ``detail`` (full message)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def describe(what: str, exc: BaseException) -> Unavailable:
    root = exc.__cause__ or exc
    first = (str(root).strip().splitlines() or [""])[0]
    first = first if len(first) <= 200 else first[:200].rsplit(" ", 1)[0] + " …"
    return Unavailable(f"{what} could not be loaded ({type(root).__name__}: {first})", str(exc))


def set_hub_mode(offline: bool | None) -> str | None:
    """The hub for this evaluation: offline (no network contact) unless ``offline is False`` (``--online``) or
    the user allowed downloads (``RADVLM_ALLOW_DOWNLOADS=1``); ``--online`` allows the metrics' downloads.
    Returns a note for the table when the hub is offline."""
    if offline is False:
        os.environ[DOWNLOAD_ENV] = "1"
        return None
    if downloads_allowed() and offline is None:
        return None
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub.constants" in sys.modules:  # already imported: it read the variable at import
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    return (f"Hugging Face hub offline: only local weights are used (--online or {DOWNLOAD_ENV}=1 to allow "
            f"downloads)")


def probe(metric: Any, what: str) -> Any:
    """Score one report pair with ``strict`` on; ``Unavailable`` when loading fails or gives NaN."""
    strict = getattr(metric, "strict", None)
    if strict is not None:
        metric.strict = True
    try:
        values = metric.score([PROBE_PAIR[0]], [PROBE_PAIR[1]])
    except Exception as exc:
        raise describe(what, exc) from exc
    finally:
        if strict is not None:
            metric.strict = strict
    if torch.isnan(torch.as_tensor(values, dtype=torch.float64)).all():
        raise Unavailable(f"{what} gave NaN on a probe pair")
    return metric


class Scorers:
    """The metric objects of an evaluation; model-based ones are built and probed once, on first use."""

    def __init__(self, settings: MetricSettings | None = None) -> None:
        self.settings = settings or MetricSettings()
        self.rouge_l, self.gleu, self.soft_f1, self.grounding_map = ROUGEL(), GLEU(), SoftF1(), GroundingMAP()
        self.notes: list[str] = []
        self._built: dict[str, Any] = {}

    def model_metric(self, name: str) -> Any:
        """``bertscore``, ``chexbert``, ``radgraph``, ``radcliq``, ``radcliq_radeval`` or ``green``; raises
        ``Unavailable``."""
        if name not in self._built:
            if not self._built and (note := set_hub_mode(self.settings.offline)):
                self.notes.append(note)
            try:
                self._built[name] = self._build(name)
            except Unavailable as exc:
                self._built[name] = exc
        if isinstance(self._built[name], Unavailable):
            raise self._built[name]
        return self._built[name]

    def _bertscore(self, model: str, layers: int | None, baseline: str | None, label: str, idf: bool = False):
        from metrics.bertscore import BERTScore

        what = f"{label} model {model!r}"
        local = os.path.exists(os.path.expanduser(model)) or model.startswith(("/", ".", "~"))
        rescale = baseline is not None or not local  # bert-score ships baselines for its hub models only
        try:
            metric = BERTScore(model, num_layers=layers, rescale_with_baseline=rescale,
                               baseline_path=baseline, idf=idf, device=self.settings.device)
        except Exception as exc:
            raise describe(what, exc) from exc
        probe(metric, what)
        if not rescale:
            self.notes.append(f"{label}: local model {model} has no baseline table: values are not rescaled")
        return metric

    def _build(self, name: str) -> Any:
        from metrics.chexbert import CheXbertF1, CheXbertSimilarity
        from metrics.radgraph import RadGraphF1

        s = self.settings
        chexbert = {"checkpoint": s.chexbert, "bert_name_or_path": s.chexbert_bert, "device": s.device}
        chexbert_what = f"CheXbert ({s.chexbert or 'default checkpoint'}, encoder {s.chexbert_bert!r})"
        radgraph = {"model_type": s.radgraph_model, "model_dir": s.radgraph_dir, "device": s.device}
        radgraph_what = f"RadGraph {s.radgraph_model!r} ({s.radgraph_dir or 'radgraph package cache'})"
        if name == "bertscore":
            return self._bertscore(s.bertscore_model, s.bertscore_layers, s.bertscore_baseline, "BERTScore")
        if name == "chexbert":
            return probe(CheXbertF1(**chexbert), chexbert_what)
        if name == "radgraph":
            return probe(RadGraphF1(reward_level=s.radgraph_level, **radgraph), radgraph_what)
        if name == "green":
            return self._green()
        if name not in ("radcliq", "radcliq_radeval"):
            raise KeyError(f"unknown model-based metric {name!r}")
        from metrics.radcliq import RadCliQ
        from metrics.text import BLEU

        if name == "radcliq_radeval":  # the paper's components, but idf BERTScore and RadEval's text handling
            paper = self.model_metric("radcliq")
            try:
                idf = self._bertscore(s.radcliq_bertscore_model, s.radcliq_bertscore_layers,
                                      s.radcliq_bertscore_baseline, "RadCliQ BERTScore (idf)", idf=True)
            except Unavailable as exc:
                raise Unavailable(f"needs {exc.reason}", exc.detail) from exc
            return RadCliQ(radgraph=paper.radgraph, bertscore=idf, semb=paper.semb, bleu=paper.bleu,
                           lowercase=False, max_chars=None, min_chars=None)
        rg = {"model_type": s.radcliq_radgraph_model, "model_dir": s.radcliq_radgraph_dir, "device": s.device}
        rg_what = f"RadGraph {s.radcliq_radgraph_model!r} ({s.radcliq_radgraph_dir or 'radgraph package cache'})"
        try:
            return RadCliQ(radgraph=probe(RadGraphF1(reward_level="radcliq", **rg), rg_what),
                           bertscore=self._bertscore(s.radcliq_bertscore_model, s.radcliq_bertscore_layers,
                                                     s.radcliq_bertscore_baseline, "RadCliQ BERTScore"),
                           semb=probe(CheXbertSimilarity(**chexbert), chexbert_what), bleu=BLEU(n=2))
        except Unavailable as exc:
            raise Unavailable(f"needs {exc.reason}", exc.detail) from exc

    def _green(self) -> Any:
        s = self.settings
        if not s.green_model and not s.green_endpoint:
            raise Unavailable("no GREEN judge configured (--green-model FOLDER_OR_HUB_ID, e.g. "
                              "StanfordAIMI/GREEN-radllama2-7b, or --green-endpoint URL of an OpenAI-compatible server)")
        from metrics.green import DEFAULT_JUDGE, GREEN

        api_key = None
        if s.green_api_key_env:
            api_key = os.environ.get(s.green_api_key_env)
            if not api_key:
                raise Unavailable(f"the GREEN endpoint key variable {s.green_api_key_env} is not set")
        metric = GREEN(model=s.green_model or DEFAULT_JUDGE, endpoint=s.green_endpoint, api_key=api_key,
                       device=s.device)
        if hasattr(metric.judge, "load"):  # a local judge: load it now (an endpoint is only called to score)
            try:
                metric.judge.load()
            except Exception as exc:
                raise describe(f"GREEN judge {s.green_model!r}", exc) from exc
        return metric


def load_settings(config: str | None, overrides: dict[str, Any]) -> MetricSettings:
    """``MetricSettings`` from a YAML/JSON file (field names with ``-`` or ``_``) and non-None overrides."""
    values: dict[str, Any] = {}
    if config:
        import yaml

        loaded = yaml.safe_load(Path(config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config}: expected a mapping of metric settings")
        values = {k.replace("-", "_"): v for k, v in loaded.items()}
    names = {f.name for f in fields(MetricSettings)}
    if unknown := sorted(set(values) - names):
        raise ValueError(f"{config}: unknown metric settings {unknown}; known: {sorted(names)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return MetricSettings(**values)
