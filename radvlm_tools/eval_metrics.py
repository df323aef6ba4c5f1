"""The model-based metrics of ``radvlm_tools.evaluate``, built the way training builds its metrics: from
``class_path`` entries, one per column, in ``configs/eval_metrics/default.yaml`` (the paper's settings) with
``--metrics-config FILE`` layered over it (``load_config``); ``Scorers`` builds each entry once, on first use,
and probes it. A model that cannot be loaded makes its columns ``unavailable: <reason>``, never numbers.

No network contact unless asked: the Hugging Face hub is offline (local folders and the HF cache only) unless
``offline: false`` (``--online``) or ``RADVLM_ALLOW_DOWNLOADS=1`` (``set_hub_mode``); GREEN's endpoint is
called only when configured.

Not in the paper: the RadGraph-F1 column uses the radgraph package's ``partial`` level (the usual "RadGraph
F1" of RadEval / ReXrank; the paper does not name one); GREEN needs a judge (without one it is unavailable);
``radcliq_radeval`` (``configs/eval_metrics/radeval.yaml``) adds RadCliQ-v1 as RadEval 2.x computes it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch

from metrics.base import DOWNLOAD_ENV, PerSampleMetric, downloads_allowed
from metrics.grounding import GroundingMAP, SoftF1
from metrics.text import GLEU, ROUGEL

#: the model-based columns a metrics config may fill (``null``: not computed)
MODEL_METRICS = ("bertscore", "chexbert", "radgraph", "radcliq", "radcliq_radeval", "green")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "eval_metrics" / "default.yaml"
PROBE_PAIR = ("The heart size is normal. There is a small left pleural effusion.",
              "Normal heart size. Small left pleural effusion, no pneumothorax.")
#: a layer of the metrics config: a YAML/JSON file or its mapping
Layer = Union[str, os.PathLike, Mapping[str, Any]]


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


# ------------------------------------------------------------------------------------------ the config
def metrics_parser():
    """The jsonargparse parser of a metrics config: ``device``, ``offline`` and one ``PerSampleMetric``
    (``class_path`` / ``init_args``, as in the training configs) or ``null`` per name of ``MODEL_METRICS``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="metrics config", exit_on_error=False)
    parser.add_argument("--device", type=Optional[str], default=None,
                        help="device of every metric that takes one (null: cuda when available)")
    parser.add_argument("--offline", type=Optional[bool], default=None,
                        help="null / true: Hugging Face hub offline; false: downloads allowed (--online)")
    for name in MODEL_METRICS:
        parser.add_argument(f"--{name}", type=Optional[PerSampleMetric], default=None)
    return parser


def load_config(layers: Layer | Sequence[Layer] | None = None, device: str | None = None,
                offline: bool | None = None):
    """The metrics config (a jsonargparse ``Namespace``): ``configs/eval_metrics/default.yaml``, then each layer (a
    file or a mapping) over it: an entry replaces the default's ``class_path`` or, naming the same class or
    none, updates its ``init_args``; ``null`` drops it. Non-None ``device`` / ``offline`` override the files.
    An unknown key or init argument raises ``ValueError`` naming the layer."""
    import yaml

    if layers is None or isinstance(layers, (str, os.PathLike, Mapping)):
        layers = [] if layers is None else [layers]
    parser = metrics_parser()
    cfg = None
    for layer in [DEFAULT_CONFIG, *layers]:
        name = str(layer) if isinstance(layer, (str, os.PathLike)) else "metrics config"
        values = yaml.safe_load(Path(layer).read_text()) if isinstance(layer, (str, os.PathLike)) else layer
        if not isinstance(values, Mapping):
            raise ValueError(f"{name}: expected a mapping of metric names to class_path entries")
        try:
            cfg = parser.parse_object(dict(values), namespace=cfg)
        except Exception as exc:  # jsonargparse's ArgumentError: unknown key, init argument or type
            raise ValueError(f"{name}: {exc}") from exc
    cfg.device = device if device is not None else cfg.device
    cfg.offline = offline if offline is not None else cfg.offline
    return cfg


def with_device(spec: dict, device: str | None) -> dict:
    """``spec`` (a ``class_path`` entry as a dict) with ``device`` set wherever a class, nested ones included,
    takes a ``device`` that the entry leaves ``None``."""
    if isinstance(spec, dict) and "class_path" in spec:
        args = {k: with_device(v, device) for k, v in (spec.get("init_args") or {}).items()}
        if device is not None and "device" in args and args["device"] is None:
            args["device"] = device
        return {**spec, "init_args": args}
    return spec


def instantiate(spec: dict) -> PerSampleMetric:
    """The metric of one validated ``class_path`` entry (nested entries instantiated too)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--metric", type=PerSampleMetric)
    return parser.instantiate(parser.parse_object({"metric": spec})).metric


def label(class_name: str, get: Any) -> str:
    """How a metric is named in reasons: by its weights (``get(init_arg)`` reads an entry or an object)."""
    if class_name == "BERTScore":
        return f"BERTScore model {get('model_type')!r}"
    if class_name.startswith("CheXbert"):
        return f"CheXbert ({get('checkpoint') or 'default checkpoint'}, encoder {get('bert_name_or_path')!r})"
    if class_name == "RadGraphF1":
        return f"RadGraph {get('model_type')!r} ({get('model_dir') or 'radgraph package cache'})"
    if class_name == "GREEN":
        return f"GREEN judge {get('model')!r}" + (f" at {get('endpoint')}" if get("endpoint") else "")
    return class_name


def spec_label(spec: dict) -> str:
    return label(spec["class_path"].rsplit(".", 1)[-1], (spec.get("init_args") or {}).get)


def object_label(metric: Any) -> str:
    return label(type(metric).__name__, lambda key: getattr(metric, key, None))


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


# ----------------------------------------------------------------------------------------- the metrics
class Scorers:
    """The metric objects of an evaluation: the text and box metrics, and the model-based ones of a metrics
    config (``load_config(config, device, offline)``), each built and probed once, on first use."""

    def __init__(self, config: Layer | Sequence[Layer] | None = None, device: str | None = None,
                 offline: bool | None = None) -> None:
        self.config = load_config(config, device, offline)
        self.rouge_l, self.gleu, self.soft_f1, self.grounding_map = ROUGEL(), GLEU(), SoftF1(), GroundingMAP()
        self.notes: list[str] = []
        self._built: dict[str, Any] = {}

    def configured(self, name: str) -> bool:
        return self.config.get(name) is not None

    def config_dict(self) -> dict[str, Any]:
        """The whole metrics config, every init argument written out (for the result JSON)."""
        return self.config.clone().as_dict()

    def model_metric(self, name: str) -> Any:
        """The metric of column ``name`` (``MODEL_METRICS``); raises ``Unavailable``."""
        if name not in MODEL_METRICS:
            raise KeyError(f"unknown model-based metric {name!r}; known: {MODEL_METRICS}")
        if name not in self._built:
            if not self._built and (note := set_hub_mode(self.config.offline)):
                self.notes.append(note)
            try:
                self._built[name] = self._build(name)
            except Unavailable as exc:
                self._built[name] = exc
        if isinstance(self._built[name], Unavailable):
            raise self._built[name]
        return self._built[name]

    def _build(self, name: str) -> Any:
        if not self.configured(name):
            if name == "green":
                raise Unavailable("no GREEN judge configured (a green entry in --metrics-config: class_path "
                                  "metrics.green.GREEN, init_args model: a folder or hub id such as "
                                  "StanfordAIMI/GREEN-radllama2-7b, or endpoint: URL of an OpenAI-compatible server)")
            raise Unavailable(f"no {name} entry in the metrics config")
        spec = with_device(self.config[name].as_dict(), self.config.device)
        what = spec_label(spec)
        try:
            metric = instantiate(spec)
        except Exception as exc:
            raise describe(what, exc) from exc
        from metrics.green import GREEN
        from metrics.radcliq import FEATURES, RadCliQ

        if isinstance(metric, RadCliQ):  # each component probed, named by its weights
            try:
                for feature in FEATURES:
                    probe(getattr(metric, feature), object_label(getattr(metric, feature)))
            except Unavailable as exc:
                raise Unavailable(f"needs {exc.reason}", exc.detail) from exc
            self._note_unrescaled(name, metric.bertscore)
        elif isinstance(metric, GREEN):
            if hasattr(metric.judge, "load"):  # a local judge: load it now (an endpoint is only called to score)
                try:
                    metric.judge.load()
                except Exception as exc:
                    raise describe(what, exc) from exc
        else:
            probe(metric, what)
            self._note_unrescaled(name, metric)
        return metric

    def _note_unrescaled(self, name: str, metric: Any) -> None:
        if type(metric).__name__ == "BERTScore" and metric.baseline is None:
            self.notes.append(f"{name}: BERTScore model {metric.model_type!r} has no baseline table: values are "
                              "not rescaled (not comparable with the paper)")
