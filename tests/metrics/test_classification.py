"""RadVLM's abnormality classification: label matching and scikit-learn's micro/macro P/R/F1
(metrics/classification.py)."""

import json
import random

import pytest
import torch

from metrics.classification import (
    CHEXPERT_PATHOLOGIES,
    AbnormalityClassification,
    counts,
    parse_label_list,
    precision_recall_f1,
    predicted_labels,
    record_indicators,
    sample_f1,
)

LABELS = ["Atelectasis", "Cardiomegaly", "Edema"]
# answer -> ground-truth labels (A = Atelectasis, C = Cardiomegaly, E = Edema)
HAND = [
    ("Cardiomegaly and edema.", ["Cardiomegaly"]),  # pred {C, E}, true {C}: C TP, E FP
    ("Atelectasis.", ["Atelectasis", "Edema"]),  # pred {A}, true {A, E}: A TP, E FN
    ("No findings.", ["Cardiomegaly"]),  # pred {}, true {C}: C FN
    ("CARDIOMEGALY and atelectasis", []),  # pred {C, A}, true {}: C FP, A FP
    ("atelectasis", ["atelectasis"]),  # pred {A}, true {A} (case-insensitive): A TP
]
# per label: A TP 2 FP 1 FN 0 -> P 2/3, R 1, F1 2*2 / (4 + 1 + 0) = 4/5
#            C TP 1 FP 1 FN 1 -> P 1/2, R 1/2, F1 2 / 4 = 1/2
#            E TP 0 FP 1 FN 1 -> P 0, R 0, F1 0
# micro: TP 3, FP 3, FN 2 -> P 3/6 = 1/2, R 3/5, F1 6 / (6 + 3 + 2) = 6/11
# macro: P (2/3 + 1/2 + 0) / 3 = 7/18, R (1 + 1/2 + 0) / 3 = 1/2, F1 (4/5 + 1/2 + 0) / 3 = 13/30
#        (not the F1 of macro P and R: 2 (7/18)(1/2) / (7/18 + 1/2) = 7/16)
EXPECTED = {"micro_precision": 1 / 2, "micro_recall": 3 / 5, "micro_f1": 6 / 11,
            "macro_precision": 7 / 18, "macro_recall": 1 / 2, "macro_f1": 13 / 30,
            "f1/Atelectasis": 4 / 5, "f1/Cardiomegaly": 1 / 2, "f1/Edema": 0.0}


def hand_metric(labels=LABELS):
    metric = AbnormalityClassification(labels=labels, target_format="labels")
    metric.update([a for a, _ in HAND], [json.dumps(t) for _, t in HAND])
    return metric


def test_micro_and_macro_precision_recall_f1_match_the_hand_computed_example():
    out = hand_metric().compute()
    assert out.keys() == EXPECTED.keys()
    for key, value in EXPECTED.items():
        assert out[key].item() == pytest.approx(value, abs=1e-6), key


def test_a_label_without_any_positive_counts_zero_in_the_macro_average():
    # zero_division=0: Fracture has TP = FP = FN = 0 -> P = R = F1 = 0, and the macro mean is over 4 labels:
    # P (7/6) / 4 = 7/24, R (3/2) / 4 = 3/8, F1 (13/10) / 4 = 13/40; micro is unchanged
    out = hand_metric(LABELS + ["Fracture"]).compute()
    assert out["macro_precision"].item() == pytest.approx(7 / 24, abs=1e-6)
    assert out["macro_recall"].item() == pytest.approx(3 / 8, abs=1e-6)
    assert out["macro_f1"].item() == pytest.approx(13 / 40, abs=1e-6)
    assert out["micro_f1"].item() == pytest.approx(6 / 11, abs=1e-6)
    assert out["f1/Fracture"].item() == 0.0


def test_score_is_the_per_sample_f1_of_the_label_sets():
    # 2TP / (2TP + FP + FN): {C,E} vs {C} 2/3; {A} vs {A,E} 2/3; {} vs {C} 0; {C,A} vs {} 0; {A} vs {A} 1
    metric = AbnormalityClassification(labels=LABELS, target_format="labels")
    values = metric.score([a for a, _ in HAND], [", ".join(t) for _, t in HAND])
    torch.testing.assert_close(values, torch.tensor([2 / 3, 2 / 3, 0.0, 0.0, 1.0]))
    assert values.dtype == torch.float32
    assert metric.score(["Nothing to see."], [""]).tolist() == [1.0]  # neither side has a label


def test_a_label_counts_as_predicted_when_its_name_occurs_even_negated():
    # RadVLM's rule is a plain substring test of the lower-cased name in the lower-cased answer
    pred = predicted_labels(["No cardiomegaly. Pleural effusion is absent.", "Lung opacity"],
                            ["Cardiomegaly", "Pleural Effusion", "Lung Lesion"])
    assert pred.tolist() == [[True, True, False], [False, False, False]]


def test_text_targets_take_the_truth_from_the_reference_answer():
    # validation has only the reference answer: truth = the labels found in it by the same rule
    metric = AbnormalityClassification(labels=LABELS)
    metric.update(["Cardiomegaly."], ["The abnormalities are cardiomegaly and edema."])
    out = metric.compute()
    assert out["micro_precision"].item() == 1.0 and out["micro_recall"].item() == 0.5
    assert metric.score(["Cardiomegaly."], ["Cardiomegaly and edema."]).tolist() == [pytest.approx(2 / 3)]


def test_label_targets_are_a_json_list_or_names_joined_by_commas():
    assert parse_label_list('["Nodule/Mass", "Edema"]') == ["Nodule/Mass", "Edema"]
    assert parse_label_list("Cardiomegaly, Edema") == ["Cardiomegaly", "Edema"]
    assert parse_label_list("  ") == []
    with pytest.raises(ValueError, match="JSON list"):
        parse_label_list('["Edema"')
    metric = AbnormalityClassification(labels=LABELS, target_format="labels")
    # names outside the label set are ignored, case does not matter
    assert metric.score(["edema"], ["EDEMA, Fracture"]).tolist() == [1.0]


def test_construction_rejects_bad_label_sets_and_target_formats():
    with pytest.raises(ValueError, match="at least one label"):
        AbnormalityClassification(labels=[])
    with pytest.raises(ValueError, match="distinct"):
        AbnormalityClassification(labels=["Edema", "edema"])
    with pytest.raises(ValueError, match="target_format"):
        AbnormalityClassification(target_format="json")


def test_default_label_set_is_radvlms_sorted_chexpert_list():
    assert len(CHEXPERT_PATHOLOGIES) == 13 and list(CHEXPERT_PATHOLOGIES) == sorted(CHEXPERT_PATHOLOGIES)
    assert AbnormalityClassification().labels == list(CHEXPERT_PATHOLOGIES)
    assert "No Finding" not in CHEXPERT_PATHOLOGIES


def _sklearn_loop(pred, true):
    """Slow reference from scikit-learn's definitions (zero_division=0), one label at a time."""
    n, n_labels = len(pred), len(pred[0])

    def prf(tp, fp, fn):
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        return p, r, (2 * p * r / (p + r) if p + r else 0.0)

    per = []
    for j in range(n_labels):
        tp = sum(pred[i][j] and true[i][j] for i in range(n))
        fp = sum(pred[i][j] and not true[i][j] for i in range(n))
        fn = sum(true[i][j] and not pred[i][j] for i in range(n))
        per.append((tp, fp, fn, *prf(tp, fp, fn)))
    micro = prf(sum(x[0] for x in per), sum(x[1] for x in per), sum(x[2] for x in per))
    macro = tuple(sum(x[k] for x in per) / n_labels for k in (3, 4, 5))
    return micro, macro, [x[5] for x in per]


def test_precision_recall_f1_matches_a_loop_reference_of_sklearns_definition():
    rng = random.Random(0)
    for _ in range(100):
        n, n_labels = rng.randint(1, 12), rng.randint(1, 6)
        pred = [[rng.random() < 0.3 for _ in range(n_labels)] for _ in range(n)]
        true = [[rng.random() < 0.3 for _ in range(n_labels)] for _ in range(n)]
        out = precision_recall_f1(*counts(torch.tensor(pred), torch.tensor(true)))
        micro, macro, per_label = _sklearn_loop(pred, true)
        got_micro = tuple(out[f"micro_{k}"].item() for k in ("precision", "recall", "f1"))
        got_macro = tuple(out[f"macro_{k}"].item() for k in ("precision", "recall", "f1"))
        assert got_micro == pytest.approx(micro, abs=1e-12)
        assert got_macro == pytest.approx(macro, abs=1e-12)
        assert out["f1"].tolist() == pytest.approx(per_label, abs=1e-12)


def test_sample_f1_is_one_when_neither_side_has_a_label():
    pred = torch.tensor([[False, False], [True, False]])
    true = torch.tensor([[False, False], [False, False]])
    assert sample_f1(pred, true).tolist() == [1.0, 0.0]


def test_update_in_two_processes_merges_to_the_whole():
    # DDP-style: the counts are (L,) long tensors summed across processes, the per-sample values concatenated
    preds, targets = [a for a, _ in HAND], [json.dumps(t) for _, t in HAND]
    rank0 = AbnormalityClassification(labels=LABELS, target_format="labels")
    rank1 = AbnormalityClassification(labels=LABELS, target_format="labels")
    rank0.update(preds[:2], targets[:2])
    rank1.update(preds[2:], targets[2:])
    assert rank0.tp.dtype == torch.long and rank0.tp.shape == (3,)
    rank0.merge_state(rank1)
    whole = hand_metric().compute()
    merged = rank0.compute()
    for key in whole:
        torch.testing.assert_close(merged[key], whole[key])
    # merge_state concatenates the other process's values first: the order of samples is not kept
    torch.testing.assert_close(rank0.per_sample().sort().values, torch.tensor([0.0, 0.0, 2 / 3, 2 / 3, 1.0]))


def test_compute_is_float32_under_a_bfloat16_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        out = hand_metric().compute()
    finally:
        torch.set_default_dtype(previous)
    assert out["micro_f1"].dtype == torch.float32
    assert out["micro_f1"].item() == pytest.approx(6 / 11, abs=1e-6)


def test_record_indicators_take_the_label_set_from_pathologies_and_mask_other_datasets_labels():
    # label set = union of pathologies, case-insensitive, first spelling kept: [Cardiomegaly, edema]
    # record 0 knows only Cardiomegaly: its "edema" is neither predicted nor true; record 1 has no labels:
    # truth from its reference answer
    label_set, pred, true = record_indicators(
        ["Cardiomegaly and edema.", "edema"], ["x", "The abnormality is edema."],
        [["Cardiomegaly", "Edema"], None], [["Cardiomegaly"], "edema, cardiomegaly"])
    assert label_set == ["Cardiomegaly", "edema"]
    assert pred.tolist() == [[True, False], [False, True]]
    assert true.tolist() == [[True, False], [False, True]]
    assert record_indicators(["a"], ["b"], [None], [None])[0] == list(CHEXPERT_PATHOLOGIES)
    with pytest.raises(ValueError, match="1 label lists"):
        record_indicators(["a", "b"], ["a", "b"], [None], [None, None])
