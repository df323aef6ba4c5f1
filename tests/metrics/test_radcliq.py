"""RadCliQ-v1 (metrics/radcliq.py): the formula by hand, the short-text rule, NaN propagation, text
preparation, and the composition of real (tiny) component models."""

import warnings

import pytest
import torch

from metrics.base import PerSampleMetric
from metrics.bertscore import BERTScore
from metrics.chexbert import CheXbertSimilarity
from metrics.radcliq import (
    RADCLIQ_V1_INTERCEPT,
    RADCLIQ_V1_MEAN,
    RADCLIQ_V1_SCALE,
    RADCLIQ_V1_WEIGHT,
    RadCliQ,
    radcliq_v1,
)
from metrics.radgraph import RadGraphF1
from metrics.text import BLEU
from metrics.tiny import write_tiny_bert, write_tiny_chexbert, write_tiny_radgraph

REPORTS = [
    "The heart size is normal. No pleural effusion.",
    "Mild cardiomegaly with left lower lobe atelectasis.",
    "Small right pleural effusion, unchanged from prior.",
    "No acute cardiopulmonary process.",
]


class Recorder(PerSampleMetric):
    """A fake component: returns ``value`` (or ``fn(pred, ref)``) per pair and records what it was given."""

    def __init__(self, value=0.5, fn=None):
        super().__init__()
        self.value, self.fn, self.calls = value, fn, []

    def score(self, preds, targets):
        self.calls.append((list(preds), list(targets)))
        if self.fn is not None:
            return torch.tensor([self.fn(p, t) for p, t in zip(preds, targets)], dtype=torch.float32)
        return torch.full((len(preds),), self.value)


def fakes(**values):
    return {name: Recorder(values.get(name, 0.5)) for name in ("radgraph", "bertscore", "semb", "bleu")}


def test_constants_have_full_precision():
    assert RADCLIQ_V1_MEAN == (0.5379231241355762, 0.6175725628125001, 0.7647942121140658, 0.44738335396242174)
    assert RADCLIQ_V1_SCALE == (0.3028258411486429, 0.22430938459304575, 0.2539439110169773, 0.2989271671041838)
    assert RADCLIQ_V1_WEIGHT == (-0.37708368261038905, -0.37030009974480316, -0.25261621789593225,
                                 4.315048405024756e-12)
    assert RADCLIQ_V1_INTERCEPT == 2.466552561323256e-10


def test_radcliq_v1_by_hand():
    m, s = RADCLIQ_V1_MEAN, RADCLIQ_V1_SCALE
    radgraph = torch.tensor([m[0], m[0] + s[0], m[0], m[0] + 2 * s[0]], dtype=torch.float64)
    bertscore = torch.tensor([m[1], m[1], m[1] - s[1], m[1] - s[1]], dtype=torch.float64)
    semb = torch.tensor([m[2], m[2], m[2], m[2] + s[2]], dtype=torch.float64)
    bleu = torch.tensor([m[3], m[3], m[3] + 10 * s[3], m[3]], dtype=torch.float64)
    expected = torch.tensor([
        # all features at their means: z = 0, only the intercept remains
        2.466552561323256e-10,
        # radgraph one scale above its mean (z = 1): -0.37708368261038905 + 2.466552561323256e-10
        -0.3770836823637338,
        # bertscore z = -1, bleu z = 10: 0.37030009974480316 + 4.315048405024756e-11 + 2.466552561323256e-10
        0.3703001000345089,
        # radgraph z = 2, bertscore z = -1, semb z = 1:
        # 2 * -0.37708368261038905 = -0.7541673652207781; + 0.37030009974480316 = -0.38386726547597494;
        # - 0.25261621789593225 = -0.6364834833719072; + 2.466552561323256e-10 = -0.6364834831252519
        -0.6364834831252519,
    ], dtype=torch.float64)
    torch.testing.assert_close(radcliq_v1(radgraph, bertscore, semb, bleu), expected, atol=1e-12, rtol=0)


def test_radcliq_v1_propagates_nan():
    out = radcliq_v1(torch.tensor([0.5, float("nan")]), torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]),
                     torch.tensor([0.5, 0.5]))
    assert torch.isfinite(out[0]) and torch.isnan(out[1])


def test_short_texts_get_three_without_running_components():
    parts = fakes()
    metric = RadCliQ(**parts)
    preds = ["No acute findings.", "ok   ", "Normal chest.", "heart", "  None.  "]
    refs = ["Normal chest radiograph.", "Normal chest radiograph.", "abc", "Cardiomegaly.", "Cardiomegaly."]
    values = metric.score(preds, refs)
    # row 1 "ok   " has 5 characters, row 2's reference "abc" 3, row 3 "heart" exactly 5: all floored.
    # Row 4 "  None.  " has 9 characters as given: the authors' plain-answer guard counts whitespace, so it
    # is scored (a stripping guard would floor it: "none." has 5).
    assert values[1].item() == 3.0 and values[2].item() == 3.0 and values[3].item() == 3.0
    assert values[0].item() != 3.0 and values[4].item() != 3.0
    assert metric.worst_value == 3.0 and metric.higher_is_better is False
    for part in parts.values():  # only the two long pairs reached the components
        assert part.calls == [(["no acute findings.", "  none.  "], ["normal chest radiograph.", "cardiomegaly."])]
    from radvlm.rewards import RewardTerm

    assert RewardTerm(metric).sign == -1.0  # the one place a metric's value gets its reward sign


def test_texts_are_lower_cased_and_cut_to_max_chars():
    parts = fakes()
    RadCliQ(**parts).score(["A" * 3000], ["Pleural EFFUSION."])
    pred, ref = parts["bleu"].calls[0][0][0], parts["bleu"].calls[0][1][0]
    assert pred == "a" * 2048 and ref == "pleural effusion."


def test_nan_component_gives_nan_not_a_low_score():
    parts = fakes()
    parts["semb"] = Recorder(fn=lambda p, t: float("nan") if "edema" in p else 0.9)
    values = RadCliQ(**parts).score(["Pulmonary edema.", "Clear lungs."], ["Normal chest.", "Normal chest."])
    assert torch.isnan(values[0]) and torch.isfinite(values[1])


def test_missing_component_model_gives_nan(tmp_path):
    parts = fakes()
    parts["bertscore"] = BERTScore(str(tmp_path / "absent"), num_layers=2, device="cpu")
    with pytest.warns(RuntimeWarning, match="could not load model"):
        values = RadCliQ(**parts).score(REPORTS, REPORTS[::-1])
    assert torch.isnan(values).all()


def test_score_is_the_formula_of_the_component_values():
    parts = fakes(radgraph=0.2, bertscore=0.3, semb=0.6, bleu=0.1)
    values = RadCliQ(**parts).score(REPORTS, REPORTS[::-1])
    expected = radcliq_v1(*(torch.full((4,), v, dtype=torch.float64) for v in (0.2, 0.3, 0.6, 0.1)))
    torch.testing.assert_close(values, expected.float())


def test_components_must_be_metrics():
    with pytest.raises(TypeError, match="component 'bleu'"):
        RadCliQ(**{**fakes(), "bleu": "BLEU-2"})


# ------------------------------------------------------------------------ composed real (tiny) models
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("radcliq")
    bert = write_tiny_bert(root / "bert")
    return {
        "bert": bert,
        "radgraph": write_tiny_radgraph(root / "radgraph-xl", bert),
        "chexbert": write_tiny_chexbert(root / "chexbert.pth", bert),
    }


def composed(models):
    return RadCliQ(
        radgraph=RadGraphF1(reward_level="radcliq", model_dir=models["radgraph"], device="cpu"),
        bertscore=BERTScore(models["bert"], num_layers=2, device="cpu"),
        semb=CheXbertSimilarity(models["chexbert"], models["bert"], device="cpu"),
        bleu=BLEU(n=2),
    )


def test_composed_models_give_the_formula_of_their_scores(tiny_models):
    metric = composed(tiny_models)
    preds, refs = REPORTS + ["Fine."], REPORTS[::-1] + ["Normal chest."]
    values = metric.score(preds, refs)
    lower_p, lower_r = [p.lower() for p in preds[:4]], [r.lower() for r in refs[:4]]
    feats = [getattr(metric, name).score(lower_p, lower_r).double() for name in ("radgraph", "bertscore", "semb", "bleu")]
    torch.testing.assert_close(values[:4], radcliq_v1(*feats).float())
    assert values[4].item() == 3.0  # "fine." has 5 characters
    assert torch.isfinite(values).all()
    names = [k for k in metric.state_dict()]
    assert not any("weight" in k or "bert" in k for k in names)


def test_update_on_halves_equals_update_on_whole(tiny_models):
    whole, halves = composed(tiny_models), composed(tiny_models)
    refs = REPORTS[1:] + REPORTS[:1]
    whole.update(REPORTS, refs)
    halves.update(REPORTS[:2], refs[:2])
    halves.update(REPORTS[2:], refs[2:])
    torch.testing.assert_close(whole.compute(), halves.compute())


def test_each_reference_is_processed_once_per_distinct_reference(tiny_models):
    metric = composed(tiny_models)
    refs = [f"Small effusion, study {i}." for i in range(8)]  # short texts keep the tiny RadGraph fast
    targets = [refs[i // 8] for i in range(64)]  # 8 prompts x 8 rollouts
    preds = [f"Mild edema, rollout {i}-{j}." for i in range(8) for j in range(8)]
    metric.score(preds, targets)
    assert metric.radgraph.stats["reference_annotations"] == 8
    assert metric.bertscore.stats["reference_encodings"] == 8
    assert metric.semb.stats["reference_encodings"] == 8


def test_defaults_are_the_papers_setting_and_each_is_switchable():
    metric = RadCliQ()  # nothing is loaded before the first score
    assert metric.radgraph.model_type == "radgraph" and metric.radgraph.reward_level == "radcliq"
    assert metric.bertscore.model_type == "distilroberta-base" and metric.bertscore.idf is False
    assert metric.bleu.n == 2
    assert (metric.lowercase, metric.max_chars, metric.min_chars) == (True, 2048, 5)
    other = RadCliQ(radgraph_model="radgraph-xl", bertscore_idf=True, bleu_n=4)
    assert (other.radgraph.model_type, other.bertscore.idf, other.bleu.n) == ("radgraph-xl", True, 4)


def test_radeval_text_handling_keeps_case_length_and_short_answers():
    parts = fakes()
    metric = RadCliQ(**parts, lowercase=False, max_chars=None, min_chars=None)
    values = metric.score(["A" * 3000, "ok"], ["Pleural EFFUSION.", "Normal."])
    assert parts["bleu"].calls[0] == (["A" * 3000, "ok"], ["Pleural EFFUSION.", "Normal."])
    assert torch.isfinite(values).all() and values[1].item() != 3.0  # no short-answer floor


def test_missing_model_makes_the_short_text_floor_nan_too(tmp_path):
    """First-day trap: with RadCliQ's models missing, ``score`` gave [nan, nan, 3.] (the short-text floor) and
    ``compute`` averaged it to 3.0, a measured-looking number for an unavailable metric."""
    parts = fakes()
    parts["bertscore"] = BERTScore(str(tmp_path / "absent"), num_layers=2, device="cpu")
    metric = RadCliQ(**parts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = metric.score(REPORTS[:2] + ["ok"], REPORTS[2:4] + ["Normal chest."])  # the last pair is short
        metric.update(REPORTS[:2] + ["ok"], REPORTS[2:4] + ["Normal chest."])
        assert torch.isnan(values).all()
        assert torch.isnan(metric.compute())
        assert not metric.available()
    ok = RadCliQ(**fakes())
    assert ok.available()
    assert ok.score(["ok"], ["Normal chest."]).tolist() == [3.0]  # models there: the floor is the authors' rule
