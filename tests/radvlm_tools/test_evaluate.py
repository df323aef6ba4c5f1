import json
import math
from statistics import NormalDist

import numpy as np
import pytest
from PIL import Image

from metrics.grounding import GroundingMAP
from radvlm_tools.eval_metrics import Scorers, load_config
from radvlm_tools.evaluate import (
    bootstrap_ci,
    evaluate_file,
    format_table,
    main,
    nan_mean,
    ratio_of_sums,
    read_predictions,
    scored_path_for,
)
from tests.helpers import eval_metrics_config

# ------------------------------------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_of_a_bernoulli_mean_contains_p_and_has_the_normal_width():
    values = np.array([1.0] * 120 + [0.0] * 280)  # p̂ = 0.3, n = 400
    lo, hi = bootstrap_ci(values, nan_mean)
    # normal approximation: half-width 1.96 · sqrt(0.3 · 0.7 / 400) = 1.96 · 0.022913 = 0.04491
    assert lo < 0.3 < hi
    assert hi - lo == pytest.approx(2 * 0.04491, rel=0.10)
    assert (lo + hi) / 2 == pytest.approx(0.3, abs=0.01)


def test_bootstrap_ci_of_a_normal_mean_has_the_normal_width():
    values = np.array([NormalDist(5.0, 2.0).inv_cdf((i + 0.5) / 500) for i in range(500)])  # sd ≈ 2.0
    lo, hi = bootstrap_ci(values, nan_mean, n=2000, seed=0)
    # half-width 1.96 · 2 / sqrt(500) = 0.1753
    assert lo < 5.0 < hi
    assert hi - lo == pytest.approx(2 * 0.1753, rel=0.10)


def test_bootstrap_ci_is_reproducible_for_a_seed():
    values = np.arange(50, dtype=float) ** 2
    assert bootstrap_ci(values, nan_mean, seed=3) == bootstrap_ci(values, nan_mean, seed=3)
    assert bootstrap_ci(values, nan_mean, seed=3) != bootstrap_ci(values, nan_mean, seed=4)


def test_bootstrap_ci_of_two_values_spans_them():
    # resample means are 1 (p 1/4), 2 (p 1/2), 3 (p 1/4): the 2.5 % and 97.5 % quantiles are 1 and 3
    assert bootstrap_ci(np.array([1.0, 3.0]), nan_mean) == (1.0, 3.0)


def test_bootstrap_ci_resamples_whole_rows():
    rows = np.array([[1.0, 2.0], [3.0, 6.0], [0.5, 1.0], [2.0, 4.0]])  # col 0 / col 1 = 0.5 in every row
    assert bootstrap_ci(rows, ratio_of_sums) == pytest.approx((0.5, 0.5))


def test_bootstrap_ci_is_nan_without_data_and_rejects_bad_arguments():
    assert all(math.isnan(x) for x in bootstrap_ci(np.zeros(0), nan_mean))
    assert all(math.isnan(x) for x in bootstrap_ci(np.full(5, np.nan), nan_mean))
    with pytest.raises(ValueError, match="n >= 1"):
        bootstrap_ci(np.ones(3), nan_mean, n=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci(np.ones(3), nan_mean, alpha=1.5)


# ------------------------------------------------------------------------------------------ hand-made file
ROWS = [
    # ROUGE-L: LCS 4, P = 4/4, R = 4/8 → F = 2·1·0.5/1.5 = 0.6667; GLEU: 10 hyp n-grams all in ref,
    # ref n-grams 8+7+6+5 = 26 → 10/26 = 0.3846; 19 characters
    {"id": "r1", "task": "report_generation", "answer": "the heart is normal",
     "reference": "the heart is normal and lungs are clear"},
    # identical: ROUGE-L 1, GLEU 1; 20 characters
    {"id": "r2", "task": "report_generation", "answer": "No pleural effusion.", "reference": "No pleural effusion."},
    # same box: IoU 1, AP 1, soft-F1 2·1/(1+1) = 1
    {"id": "g1", "task": "abnormality_grounding", "answer": "[0.1, 0.1, 0.3, 0.3]", "reference": "[0.1, 0.1, 0.3, 0.3]"},
    # overlap 0.1·0.2 = 0.02, union 0.04+0.04−0.02 = 0.06 → IoU 1/3 < 0.5: AP 0; soft-F1 (2/3)/(4/3) = 0.5
    {"id": "g2", "task": "abnormality_grounding", "answer": "[0.0, 0.0, 0.2, 0.2]", "reference": "[0.1, 0.0, 0.3, 0.2]"},
    # no predicted box: AP 0, soft-F1 0, no pair for the mean IoU
    {"id": "g3", "task": "abnormality_grounding",
     "answer": "No abnormalities or lesions are detected on this Chest X-ray.", "reference": "[0.5, 0.5, 0.7, 0.7]"},
]
MISSING = eval_metrics_config("/nonexistent/bert", "/nonexistent/chexbert.pth", "/nonexistent/radgraph", None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def hand_result(tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("ev") / "hand.jsonl", ROWS[::-1])  # order must not matter
    return path, evaluate_file(path, MISSING)


def test_report_columns_match_hand_computed_values(hand_result):
    _, result = hand_result
    task = result["tasks"]["report_generation"]
    assert task["n"] == 2
    m = task["metrics"]
    assert m["rouge_l"]["value"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-6)  # 0.8333
    assert m["rouge_l"]["ci"] == pytest.approx([2 / 3, 1.0], abs=1e-6)  # two samples: CI spans them
    assert m["gleu"]["value"] == pytest.approx((10 / 26 + 1) / 2, abs=1e-6)  # 0.6923
    assert m["chars"]["value"] == 19.5 and m["chars"]["ci"] == [19.0, 20.0]


def test_grounding_columns_match_hand_computed_values_and_the_metric_class(hand_result):
    _, result = hand_result
    m = result["tasks"]["abnormality_grounding"]["metrics"]
    assert m["map"]["value"] == pytest.approx(1 / 3)  # APs 1, 0, 0
    assert m["mean_iou"]["value"] == pytest.approx((1 + 1 / 3) / 2)  # Σ IoU / Σ pairs = (4/3) / 2
    assert m["soft_f1"]["value"] == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3
    for key in ("map", "mean_iou", "soft_f1"):
        lo, hi = m[key]["ci"]
        assert lo <= m[key]["value"] <= hi
    reference = GroundingMAP()
    reference.update([r["answer"] for r in ROWS[2:]], [r["reference"] for r in ROWS[2:]])
    agg = reference.compute()
    assert m["map"]["value"] == pytest.approx(float(agg["map"]))
    assert m["mean_iou"]["value"] == pytest.approx(float(agg["mean_iou"]))


def test_markdown_table_shows_values_cis_and_unavailable_reasons(hand_result):
    _, result = hand_result
    table = format_table(result)
    assert "| ROUGE-L | 83.3 | [66.7, 100.0] |" in table
    assert "| GLEU | 69.2 | [38.5, 100.0] |" in table
    assert "| mAP@0.5 | 33.3 (ceiling 100.0) |" in table  # every record has one box: perfect answers get 100
    assert "| mean IoU | 66.7 (ceiling 100.0) |" in table
    assert "| soft-F1 | 50.0 (ceiling 100.0) |" in table
    assert "records without a finding: hand: 0 of 3" in table
    assert "| avg. characters | 19.5 | [19.0, 20.0] |" in table
    assert "| BERTScore | unavailable [1] |" in table
    assert "[1] unavailable: BERTScore model '/nonexistent/bert' could not be loaded" in table


def test_model_metrics_without_weights_are_unavailable_never_numbers(hand_result):
    path, result = hand_result
    m = result["tasks"]["report_generation"]["metrics"]
    for key in ("bertscore", "chexbert_micro_14", "chexbert_macro_14", "chexbert_micro_5", "chexbert_macro_5",
                "radgraph_f1", "radcliq"):
        assert m[key]["value"] is None and "ci" not in m[key]
        assert "could not be loaded" in m[key]["unavailable"], key
    assert "/nonexistent/chexbert.pth" in m["chexbert_micro_14"]["unavailable"]
    assert "/nonexistent/radgraph" in m["radgraph_f1"]["unavailable"]
    assert m["radcliq"]["unavailable"].startswith("needs ")
    scored = {r["id"]: r["scores"] for r in map(json.loads, scored_path_for(path).read_text().splitlines())}
    assert "bertscore" not in scored["r1"] and "radcliq" not in scored["r1"]


def test_scored_file_holds_per_sample_values_sorted_by_id(hand_result):
    path, _ = hand_result
    lines = [json.loads(x) for x in scored_path_for(path).read_text().splitlines()]
    assert [r["id"] for r in lines] == ["g1", "g2", "g3", "r1", "r2"]
    g2, g3, r1 = lines[1]["scores"], lines[2]["scores"], lines[3]["scores"]
    assert g2["ap"] == 0.0 and g2["soft_f1"] == pytest.approx(0.5) and g2["iou"] == pytest.approx(1 / 3)
    assert g3["iou"] is None  # no pair: undefined, not 0
    assert r1["rouge_l"] == pytest.approx(2 / 3, abs=1e-6) and r1["chars"] == 19
    assert lines[3]["answer"] == "the heart is normal"  # input fields kept


def test_model_metrics_with_tiny_weights_equal_the_metric_classes(tmp_path):
    from metrics.bertscore import BERTScore
    from metrics.chexbert import CheXbertF1, CheXbertSimilarity
    from metrics.radcliq import RadCliQ
    from metrics.radgraph import RadGraphF1
    from metrics.text import BLEU
    from metrics.tiny import write_tiny_bert, write_tiny_chexbert, write_tiny_radgraph

    bert = write_tiny_bert(tmp_path / "bert")
    chexbert = write_tiny_chexbert(tmp_path / "chexbert.pth", bert)
    radgraph = write_tiny_radgraph(tmp_path / "radgraph-xl", bert)
    radgraph_rc = write_tiny_radgraph(tmp_path / "radgraph", bert, model_type="radgraph")  # RadCliQ's model
    settings = eval_metrics_config(bert, chexbert, radgraph, radgraph_rc)
    rows = [{"id": f"r{i}", "task": "report_generation", "answer": a, "reference": b} for i, (a, b) in enumerate([
        ("The heart size is normal.", "Heart size is normal. No pleural effusion."),
        ("Small left pleural effusion.", "Moderate left pleural effusion with atelectasis."),
        ("No acute process.", "Mild cardiomegaly. Lungs are clear."),
    ])]
    result = evaluate_file(write_jsonl(tmp_path / "p.jsonl", rows), settings, n_boot=200)
    m = result["tasks"]["report_generation"]["metrics"]
    preds, refs = [r["answer"] for r in rows], [r["reference"] for r in rows]
    expected_bs = BERTScore(bert, num_layers=2, device="cpu").score(preds, refs).mean()
    assert m["bertscore"]["value"] == pytest.approx(float(expected_bs), abs=1e-6)
    chex = CheXbertF1(checkpoint=chexbert, bert_name_or_path=bert, device="cpu")
    chex.update(preds, refs)
    agg = chex.compute()
    for key, name in (("chexbert_micro_14", "micro_f1_14"), ("chexbert_macro_14", "macro_f1_14"),
                      ("chexbert_micro_5", "micro_f1_5"), ("chexbert_macro_5", "macro_f1_5")):
        assert m[key]["value"] == pytest.approx(float(agg[name]), abs=1e-6), key
    expected_rg = RadGraphF1(model_dir=radgraph, reward_level="partial", device="cpu").score(preds, refs).mean()
    assert m["radgraph_f1"]["value"] == pytest.approx(float(expected_rg), abs=1e-6)
    radcliq = RadCliQ(radgraph=RadGraphF1("radgraph", model_dir=radgraph_rc, reward_level="radcliq", device="cpu"),
                      bertscore=BERTScore(bert, num_layers=2, device="cpu"),
                      semb=CheXbertSimilarity(checkpoint=chexbert, bert_name_or_path=bert, device="cpu"), bleu=BLEU(n=2))
    assert m["radcliq"]["value"] == pytest.approx(float(radcliq.score(preds, refs).mean()), abs=1e-5)
    assert any("not rescaled" in note for note in result["notes"])


# ----------------------------------------------------------------------------------------------- comparison
def test_comparison_shows_deltas_and_flags_a_length_change(tmp_path):
    base = [{"id": f"r{i}", "task": "report_generation", "answer": "the heart is normal and lungs are clear",
             "reference": "the heart is normal and lungs are clear"} for i in range(3)]
    short = [{**r, "answer": "heart normal"} for r in base]
    a = evaluate_file(write_jsonl(tmp_path / "sft.jsonl", base), MISSING, n_boot=100)
    b = evaluate_file(write_jsonl(tmp_path / "rl.jsonl", short), MISSING, n_boot=100)
    table = format_table([a, b])
    assert "| metric | sft | 95 % CI | rl | 95 % CI | Δ rl |" in table
    assert "| ROUGE-L | 100.0 | [100.0, 100.0] |" in table
    # 39 → 12 characters: (12 − 39) / 39 = −69.2 %
    assert "| avg. characters | 39.0 | [39.0, 39.0] | 12.0 | [12.0, 12.0] | -27.0 |" in table
    assert "sft 39.0 → rl 12.0 (-69.2%)" in table and "reward-hacking signal" in table
    same = format_table([a, evaluate_file(write_jsonl(tmp_path / "again.jsonl", base), MISSING, n_boot=100)])
    assert "reward-hacking" not in same


def test_cli_writes_json_scored_file_and_pictures(tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.new("L", (64, 64), 90).save(image)
    rows = [{**r, "image": str(image), "prompt": "Locate the mass."} for r in ROWS[2:]]
    path = write_jsonl(tmp_path / "run.jsonl", rows)
    out = main([str(path), "--json", str(tmp_path / "out.json"), "--draw", "2", str(tmp_path / "pics"),
                "--bootstrap", "50", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "| soft-F1 | 50.0 (ceiling 100.0) |" in printed
    assert json.loads((tmp_path / "out.json").read_text())["tasks"] == out["tasks"]
    assert out["bootstrap"] == {"n": 50, "seed": 0, "alpha": 0.05, "method": "percentile"}
    assert (tmp_path / "run.scored.jsonl").is_file()
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["g1.png", "g2.png"]  # first 2 by id


# ----------------------------------------------------------------------------------------------- input checks
def test_read_predictions_names_file_line_and_key(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "a", "task": "report_generation", "reference": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: id 'a' has no 'answer'"):
        read_predictions(path)
    path.write_text(json.dumps({"id": "a", "answer": "y", "reference": "x"}) + "\n")
    with pytest.raises(ValueError, match="default_task"):
        read_predictions(path)
    assert read_predictions(path, default_task="phrase_grounding")[0][0]["task"] == "phrase_grounding"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"id": "r2", "ans')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON \(an interrupted write"):
        read_predictions(path)


def test_duplicate_ids_keep_the_first_line_and_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [ROWS[0], {**ROWS[0], "answer": "other"}, ROWS[1]])
    rows, dropped = read_predictions(path)
    assert [r["id"] for r in rows] == ["r1", "r2"] and rows[0]["answer"] == ROWS[0]["answer"] and dropped == 1


def test_metrics_config_layers_update_or_replace_the_default_entries(tmp_path):
    cfg = tmp_path / "m.yaml"
    cfg.write_text("bertscore: {init_args: {model_type: /models/bert, num_layers: 4}}\n"
                   "radgraph: {class_path: metrics.radgraph.RadGraphF1, init_args: {model_dir: /models/rg}}\n"
                   "chexbert: null\n")
    c = load_config([cfg, {"bertscore": {"init_args": {"num_layers": 6}}}], device="cpu")
    bs = c.bertscore.init_args
    assert (bs.model_type, bs.num_layers, bs.rescale_with_baseline) == ("/models/bert", 6, True)  # rest: the default's
    assert (c.radgraph.init_args.model_dir, c.radgraph.init_args.model_type) == ("/models/rg", "radgraph-xl")
    assert c.chexbert is None and c.device == "cpu" and c.radcliq.class_path == "metrics.radcliq.RadCliQ"
    cfg.write_text("bertscore: {init_args: {model_typo: x}}\n")
    with pytest.raises(ValueError, match="(?s)m.yaml: .*model_typo"):
        load_config(cfg)
    cfg.write_text("unknown_metric: {class_path: metrics.text.GLEU}\n")
    with pytest.raises(ValueError, match="unknown_metric"):
        load_config(cfg)


def test_default_metrics_config_builds_the_papers_metrics():
    """configs/eval_metrics/default.yaml gives the settings evaluation had before it was a class_path config."""
    from bert_score.utils import model2layers

    from metrics.bertscore import BERTScore
    from metrics.chexbert import CheXbertF1, CheXbertSimilarity
    from metrics.radcliq import RadCliQ
    from metrics.radgraph import RadGraphF1
    from metrics.text import BLEU
    from radvlm_tools.eval_metrics import DEFAULT_CONFIG, instantiate, with_device

    cfg = load_config(device="cpu")
    build = lambda name: instantiate(with_device(cfg[name].as_dict(), cfg.device))  # noqa: E731
    assert cfg.offline is None and cfg.green is None and cfg.radcliq_radeval is None  # GREEN only with a judge
    bs = build("bertscore")
    assert type(bs) is BERTScore and (bs.model_type, bs.num_layers, bs.idf) == ("distilbert-base-uncased", 5, False)
    assert bs.baseline is not None and bs.model_device == "cpu"  # rescaled with bert-score's table
    chex = build("chexbert")
    assert type(chex) is CheXbertF1 and (chex.checkpoint, chex.bert_name_or_path) == (None, "bert-base-uncased")
    rg = build("radgraph")
    assert type(rg) is RadGraphF1 and (rg.model_type, rg.reward_level, rg.model_dir) == ("radgraph-xl", "partial", None)
    rc = build("radcliq")
    assert type(rc) is RadCliQ and (rc.lowercase, rc.max_chars, rc.min_chars) == (True, 2048, 5)
    assert (rc.radgraph.model_type, rc.radgraph.reward_level, rc.radgraph.model_dir) == ("radgraph", "radcliq", None)
    assert (rc.bertscore.model_type, rc.bertscore.num_layers) == ("distilroberta-base", model2layers["distilroberta-base"])
    assert rc.bertscore.baseline is not None and rc.bertscore.idf is False
    assert type(rc.semb) is CheXbertSimilarity and (rc.semb.checkpoint, rc.semb.bert_name_or_path) == (None, "bert-base-uncased")
    assert type(rc.bleu) is BLEU and rc.bleu.n == 2
    assert {m.model_device for m in (rc.radgraph, rc.bertscore, rc.semb)} == {"cpu"}
    radeval = load_config(DEFAULT_CONFIG.with_name("radeval.yaml"))
    rv = instantiate(radeval.radcliq_radeval.as_dict())
    assert (rv.lowercase, rv.max_chars, rv.min_chars, rv.bertscore.idf) == (False, None, None, True)
    assert (rv.radgraph.model_type, rv.bertscore.model_type) == ("radgraph", "distilroberta-base")


def test_each_model_metric_is_built_once_per_scorers(tmp_path, monkeypatch):
    scorers = Scorers(MISSING)
    calls = []
    original = Scorers._build
    monkeypatch.setattr(Scorers, "_build", lambda self, name: calls.append(name) or original(self, name))
    results = [evaluate_file(write_jsonl(tmp_path / f"{i}.jsonl", ROWS[:2]), scorers, n_boot=10) for i in range(2)]
    assert sorted(calls) == ["bertscore", "chexbert", "green", "radcliq", "radgraph"]  # not again for file 2
    reasons = [r["tasks"]["report_generation"]["metrics"]["bertscore"]["unavailable"] for r in results]
    assert reasons[0] == reasons[1]


NEGATIVE = "No abnormalities or lesions are detected on this Chest X-ray."
CEILING_ROWS = [
    # a correct "no finding" answer: AP 0 and soft-F1 0 by RadVLM's rule; no pair for the mean IoU
    {"id": "c1", "task": "abnormality_grounding", "answer": NEGATIVE, "reference": NEGATIVE},
    # two boxes answered exactly: AP 1, soft-F1 1; IoU of the 4 pairs 1, 1/3, 1/3, 1 (overlap 0.25·0.5 = 0.125,
    # union 0.25 + 0.25 − 0.125 = 0.375) → 8/3 over 4 pairs
    {"id": "c2", "task": "abnormality_grounding", "answer": "[0.0, 0.0, 0.5, 0.5] and [0.25, 0.0, 0.75, 0.5]",
     "reference": "[0.0, 0.0, 0.5, 0.5] and [0.25, 0.0, 0.75, 0.5]"},
    # one box missed: AP 0, soft-F1 0, no pair; a perfect answer: 1, 1 and 1 pair of IoU 1
    {"id": "c3", "task": "abnormality_grounding", "answer": NEGATIVE, "reference": "[0.1, 0.1, 0.3, 0.3]"},
]


def test_grounding_ceilings_say_what_a_perfect_answer_set_scores(tmp_path):
    result = evaluate_file(write_jsonl(tmp_path / "ceil.jsonl", CEILING_ROWS), MISSING, n_boot=20)
    task = result["tasks"]["abnormality_grounding"]
    m = task["metrics"]
    assert m["map"]["value"] == pytest.approx(1 / 3) and m["map"]["ceiling"] == pytest.approx(2 / 3)  # (0+1+1)/3
    assert m["soft_f1"]["value"] == pytest.approx(1 / 3) and m["soft_f1"]["ceiling"] == pytest.approx(2 / 3)
    assert m["mean_iou"]["value"] == pytest.approx(2 / 3)  # (8/3) / 4
    assert m["mean_iou"]["ceiling"] == pytest.approx(11 / 15)  # (8/3 + 1) / (4 + 1)
    assert task["info"]["no_finding_records"] == 1
    assert "without a finding scores 0" in m["map"]["meaning"] and "ALL predicted" in m["mean_iou"]["meaning"]
    table = format_table(result)
    assert "| mAP@0.5 | 33.3 (ceiling 66.7) |" in table
    assert "| mean IoU | 66.7 (ceiling 73.3) |" in table
    assert "| soft-F1 | 33.3 (ceiling 66.7) |" in table
    assert "records without a finding: ceil: 1 of 3" in table
    assert "mean IoU: RadVLM's average IoU over ALL predicted × ground-truth box pairs" in table


def test_rows_whose_boxes_come_from_the_reference_are_scored_with_each_metrics_own_parser(tmp_path):
    # gt_boxes parsed from the text by predict (reward style) are not the record's: mAP parses the reference
    # with RadVLM's regex, for which "[-0.1, ...]" is no box (docs/paper.md §5) → no ground truth: AP 0, ceiling 0
    row = {"id": "x", "task": "abnormality_grounding", "answer": "[0.0, 0.1, 0.2, 0.3]",
           "reference": "[-0.1, 0.1, 0.2, 0.3]", "gt_boxes": [[-0.1, 0.1, 0.2, 0.3]], "gt_boxes_from": "reference"}
    m = evaluate_file(write_jsonl(tmp_path / "ref.jsonl", [row]), MISSING, n_boot=5)["tasks"][
        "abnormality_grounding"]["metrics"]
    assert m["map"]["value"] == 0.0 and m["map"]["ceiling"] == 0.0
    # soft-F1 parses the sign: IoU = 0.2·0.2 / 0.3·0.2 = 2/3 → 2·(2/3) / (5/3) = 0.8; a perfect answer 1
    assert m["soft_f1"]["value"] == pytest.approx(0.8) and m["soft_f1"]["ceiling"] == pytest.approx(1.0)
