"""RadCliQ-v1 (Yu et al. 2023), the paper's report-generation reward (as −RadCliQ), lower is better.

``radcliq_v1(radgraph, bertscore, semb, bleu)`` = Σ_k w_k · (x_k − mean_k) / scale_k + b with the fitted
constants of docs/paper.md §3 (features in that order; BLEU's weight is ≈ 0). ``RadCliQ`` composes four
injectable per-sample component metrics whose defaults are the paper's setting (the original RadCliQ code,
rajpurkarlab/CXR-Report-Metric; details in its docstring); this is the one place RadCliQ is composed, for
training and for evaluation (``configs/eval_metrics/``, RadEval's variant included, by init arguments).

Texts are lower-cased and cut to 2048 characters, and a pair with ≤ 5 characters on either side gets 3.0
(reward −3) without running the components: the authors' reward wrapper, not the metric as fitted
(``lowercase=False, max_chars=None, min_chars=None`` scores texts as RadEval's RadCliQ does). A NaN
component makes the sample NaN (unavailable, not low).

Weights: the defaults need the distilroberta-base, radgraph and CheXbert weights, which cannot be
downloaded offline (docs/paper.md §7b): offline, every value is NaN with a warning per missing model. Inject
offline-capable components instead (e.g. models written by ``metrics.tiny``: random, for plumbing only; the
fitted constants assume the real models, so such values are not RadCliQ numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metrics.base import PerSampleMetric, check_cancelled, check_pairs

FEATURES = ("radgraph", "bertscore", "semb", "bleu")
#: mean, scale, weight per feature, in FEATURES order (docs/paper.md §3, full precision)
RADCLIQ_V1_MEAN = (0.5379231241355762, 0.6175725628125001, 0.7647942121140658, 0.44738335396242174)
RADCLIQ_V1_SCALE = (0.3028258411486429, 0.22430938459304575, 0.2539439110169773, 0.2989271671041838)
RADCLIQ_V1_WEIGHT = (-0.37708368261038905, -0.37030009974480316, -0.25261621789593225, 4.315048405024756e-12)
RADCLIQ_V1_INTERCEPT = 2.466552561323256e-10


def radcliq_v1(radgraph: torch.Tensor, bertscore: torch.Tensor, semb: torch.Tensor,
               bleu: torch.Tensor) -> torch.Tensor:  # each (N,) -> (N,) float64
    """RadCliQ-v1 of per-sample feature values (NaN in any feature gives NaN)."""
    x = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in (radgraph, bertscore, semb, bleu)], -1)
    mean = torch.tensor(RADCLIQ_V1_MEAN, dtype=torch.float64, device=x.device)
    scale = torch.tensor(RADCLIQ_V1_SCALE, dtype=torch.float64, device=x.device)
    weight = torch.tensor(RADCLIQ_V1_WEIGHT, dtype=torch.float64, device=x.device)
    return ((x - mean) / scale * weight).sum(-1) + RADCLIQ_V1_INTERCEPT  # (N,)


class RadCliQ(PerSampleMetric):
    """Per-sample RadCliQ-v1 of composed component metrics; each default component is switchable by an init
    argument:

    - ``radgraph``: ``RadGraphF1(model_type=radgraph_model, reward_level="radcliq")`` ((entity F1 + relation
      F1)/2), ``radgraph_model="radgraph"``: the model the original RadCliQ was fitted with and RadEval's
      RadCliQ uses (``"radgraph-xl"`` is the newer model; RadEval's stand-alone RadGraph-F1 uses it);
    - ``bertscore``: ``BERTScore(bertscore_model, rescale_with_baseline=True, idf=bertscore_idf)`` with
      ``bertscore_model="distilroberta-base"`` (bert-score's default layer 5) and ``bertscore_idf=False`` (as
      fitted; RadEval turned idf on, over the references of the call, in 0.1.8);
    - ``semb``: ``CheXbertSimilarity()`` (cosine of CheXbert [CLS] embeddings);
    - ``bleu``: ``BLEU(n=bleu_n)`` of ``metrics.text`` with ``bleu_n=2``: the original RadCliQ's BLEU term is
      BLEU-2 (its weight is 4e-12, so the choice hardly matters).

    ``device``: that of the default components (None, "cuda": this rank's GPU). Texts are lower-cased
    (``lowercase``) and cut to ``max_chars`` before scoring; the short-text floor (``min_chars``) counts the
    characters as given, whitespace included, as the authors' reward does for plain answers (``"  None.  "``
    is scored, not floored); for thinking completions the caller passes the answer after ``</think>``, which
    the split strips. Each component scores the whole list in one batched call and loads its model once per
    process outside ``state_dict()``. ``compute`` is the mean of the per-sample values (RadEval reports 1 /
    that mean as its aggregate). Cost per sample is bounded twice: the character cut, then each model-based
    component's own token cap (RadGraph 512 word pieces, BERTScore and CheXbert 512 tokens); cancellation is
    checked between components."""

    higher_is_better = False
    worst_value = 3.0
    think_split = "last"  # thinking completions: the authors' RadCliQ reward scores the text after the LAST </think>

    def __init__(
        self,
        radgraph: PerSampleMetric | None = None,
        bertscore: PerSampleMetric | None = None,
        semb: PerSampleMetric | None = None,
        bleu: PerSampleMetric | None = None,
        radgraph_model: str = "radgraph",
        bertscore_model: str = "distilroberta-base",
        bertscore_idf: bool = False,
        bleu_n: int = 2,
        lowercase: bool = True,
        max_chars: int | None = 2048,
        min_chars: int | None = 5,
        device: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if radgraph is None:
            from metrics.radgraph import RadGraphF1

            radgraph = RadGraphF1(model_type=radgraph_model, reward_level="radcliq", device=device)
        if bertscore is None:
            from metrics.bertscore import BERTScore

            bertscore = BERTScore(bertscore_model, rescale_with_baseline=True, idf=bertscore_idf, lang="en",
                                  device=device)
        if semb is None:
            from metrics.chexbert import CheXbertSimilarity

            semb = CheXbertSimilarity(device=device)
        if bleu is None:
            from metrics.text import BLEU

            bleu = BLEU(n=bleu_n)
        for name, metric in zip(FEATURES, (radgraph, bertscore, semb, bleu)):
            if not hasattr(metric, "score"):
                raise TypeError(f"RadCliQ: component {name!r} must be a metric with score(preds, targets)")
        # children (their list states are not persistent; their models live in module-level caches)
        self.radgraph, self.bertscore, self.semb, self.bleu = radgraph, bertscore, semb, bleu
        self.lowercase = lowercase
        self.max_chars = max_chars
        self.min_chars = min_chars

    def prepare(self, text: str) -> str:
        return (text.lower() if self.lowercase else text)[: self.max_chars]

    def components(self, preds: Sequence[str], targets: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each feature (N,) float64 on prepared texts; NaN on pairs the short-text rule decides."""
        check_pairs(preds, targets)
        preds = [self.prepare(p) for p in preds]
        targets = [self.prepare(t) for t in targets]
        keep = [i for i, (p, t) in enumerate(zip(preds, targets))
                if not self._short(p, t)]
        sub_p, sub_t = [preds[i] for i in keep], [targets[i] for i in keep]
        out = {}
        for name in FEATURES:
            check_cancelled()
            column = torch.full((len(preds),), float("nan"), dtype=torch.float64)
            if keep:
                values = getattr(self, name).score(sub_p, sub_t)
                column[torch.tensor(keep)] = values.detach().to("cpu", torch.float64).reshape(-1)
            out[name] = column
        return out

    def _short(self, pred: str, target: str) -> bool:
        """The authors' guard on prepared texts: ≤ ``min_chars`` characters, whitespace counted (None: off)."""
        return self.min_chars is not None and (len(pred) <= self.min_chars or len(target) <= self.min_chars)

    def short_mask(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,) bool
        return torch.tensor([self._short(self.prepare(p), self.prepare(t)) for p, t in zip(preds, targets)],
                            dtype=torch.bool)

    def available(self) -> bool:
        """Whether every component can score (their models load)."""
        return all(getattr(getattr(self, name), "available", lambda: True)() for name in FEATURES)

    def score(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,)
        """RadCliQ-v1 per pair; the short-text floor ``worst_value`` where the rule decides; all NaN when a
        component's model is unavailable (the floor too: an unavailable metric logs no number)."""
        if preds and not self.available():
            return torch.full((len(preds),), float("nan"), dtype=torch.float32)
        feats = self.components(preds, targets)
        values = radcliq_v1(feats["radgraph"], feats["bertscore"], feats["semb"], feats["bleu"])
        values = values.masked_fill(self.short_mask(preds, targets), self.worst_value)
        return values.float()
