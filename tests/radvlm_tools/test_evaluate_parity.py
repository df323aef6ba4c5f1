"""``radvlm_tools.evaluate`` as RadVLM evaluates: unrounded ground-truth boxes, its box regex, abnormality
classification, and the paper's column order."""

import json

import pytest

from metrics.classification import AbnormalityClassification
from metrics.grounding import GroundingMAP
from radvlm_tools.eval_tables import COLUMNS, format_table
from radvlm_tools.evaluate import evaluate_file, scored_path_for
from tests.helpers import eval_metrics_config

MISSING = eval_metrics_config("/nonexistent/bert", "/nonexistent/chexbert.pth", "/nonexistent/radgraph", None)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------ grounding
HALF, WHOLE_TEXT = "[0.0, 0.0, 0.5, 1.0]", "[0.0, 0.0, 1.0, 1.0]"
BOX_ROWS = [
    # unrounded truth [.004, 0, 1, 1] (its text rounds to [0, 0, 1, 1]): intersection .496, union 1 -> IoU .496
    # < .5 -> AP 0 (the text would give IoU .5, AP 1); soft-F1 2 * .496 / 1.496 = .992 / 1.496
    {"id": "u1", "task": "phrase_grounding", "answer": HALF, "reference": WHOLE_TEXT,
     "gt_boxes": [[0.004, 0.0, 1.0, 1.0]]},
    # no gt_boxes (an empty list, as predict writes for a record without boxes): the reference text's box,
    # IoU .5 -> AP 1; soft-F1 2 * .5 / 1.5 = 2/3
    {"id": "u2", "task": "phrase_grounding", "answer": HALF, "reference": WHOLE_TEXT, "gt_boxes": []},
    # a negative coordinate is no box for RadVLM's regex: AP 0 and no pair for the mean IoU; soft-F1 is the
    # reward, whose parser reads it: IoU .06 / .062 = 30/31 -> 2 (30/31) / (61/31) = 60/61
    {"id": "u3", "task": "phrase_grounding", "answer": "[-0.01, 0.2, 0.3, 0.4]", "reference": "[0.0, 0.2, 0.3, 0.4]",
     "gt_boxes": [[0.0, 0.2, 0.3, 0.4]]},
]


def test_grounding_scores_against_the_rows_unrounded_boxes_and_radvlms_regex(tmp_path):
    path = write_jsonl(tmp_path / "boxes.jsonl", BOX_ROWS)
    m = evaluate_file(path, MISSING, n_boot=50)["tasks"]["phrase_grounding"]["metrics"]
    assert m["map"]["value"] == pytest.approx(1 / 3)  # APs 0, 1, 0
    assert m["mean_iou"]["value"] == pytest.approx((0.496 + 0.5) / 2)  # two pairs; u3 has none
    assert m["soft_f1"]["value"] == pytest.approx((0.992 / 1.496 + 2 / 3 + 60 / 61) / 3, abs=1e-6)
    metric = GroundingMAP()  # the validation metric agrees when given the same boxes
    metric.update([r["answer"] for r in BOX_ROWS], [r["reference"] for r in BOX_ROWS],
                  gt_boxes=[r["gt_boxes"] for r in BOX_ROWS])
    out = metric.compute()
    assert m["map"]["value"] == pytest.approx(float(out["map"]))
    assert m["mean_iou"]["value"] == pytest.approx(float(out["mean_iou"]))
    scores = {r["id"]: r["scores"] for r in map(json.loads, scored_path_for(path).read_text().splitlines())}
    assert scores["u1"]["ap"] == 0.0 and scores["u1"]["iou"] == pytest.approx(0.496)
    assert scores["u2"]["ap"] == 1.0 and scores["u3"]["iou"] is None


# ------------------------------------------------------------------------------------------ classification
LABELS = ["Atelectasis", "Cardiomegaly", "Edema"]
CLS = [  # the hand example of tests/metrics/test_classification.py
    ("Cardiomegaly and edema.", ["Cardiomegaly"]),
    ("Atelectasis.", ["Atelectasis", "Edema"]),
    ("No findings.", ["Cardiomegaly"]),
    ("CARDIOMEGALY and atelectasis", []),
    ("atelectasis", ["atelectasis"]),
]
CLS_ROWS = [{"id": f"c{i}", "task": "abnormality_classification", "answer": a, "labels": t, "pathologies": LABELS,
             "reference": ("The abnormalities are " + ", ".join(t)) if t else "No abnormalities."}
            for i, (a, t) in enumerate(CLS)]


def test_classification_columns_match_the_hand_computed_example_and_the_metric_class(tmp_path):
    # per label A: TP 2 FP 1 FN 0, C: TP 1 FP 1 FN 1, E: TP 0 FP 1 FN 1
    # micro P 3/6, R 3/5, F1 6/11; macro P (2/3 + 1/2 + 0)/3 = 7/18, R (1 + 1/2 + 0)/3 = 1/2, F1 (4/5 + 1/2)/3 = 13/30
    path = write_jsonl(tmp_path / "cls.jsonl", CLS_ROWS[::-1])
    result = evaluate_file(path, MISSING, n_boot=100)
    task = result["tasks"]["abnormality_classification"]
    assert task["kind"] == "classification" and task["n"] == 5
    m = task["metrics"]
    expected = {"micro_precision": 1 / 2, "micro_recall": 3 / 5, "micro_f1": 6 / 11,
                "macro_precision": 7 / 18, "macro_recall": 1 / 2, "macro_f1": 13 / 30}
    for key, value in expected.items():
        assert m[key]["value"] == pytest.approx(value), key
        lo, hi = m[key]["ci"]
        assert lo <= m[key]["value"] <= hi and m[key]["n"] == 5
    metric = AbnormalityClassification(labels=LABELS, target_format="labels")
    metric.update([a for a, _ in CLS], [json.dumps(t) for _, t in CLS])
    out = metric.compute()
    for key in expected:
        assert m[key]["value"] == pytest.approx(float(out[key]), abs=1e-6), key
    table = format_table(result)
    assert "| micro F1 | 54.5 |" in table and "| macro F1 | 43.3 |" in table
    scores = {r["id"]: r["scores"] for r in map(json.loads, scored_path_for(path).read_text().splitlines())}
    assert scores["c0"]["label_f1"] == pytest.approx(2 / 3) and scores["c4"]["label_f1"] == 1.0


def test_classification_label_set_is_the_union_of_the_rows_pathologies(tmp_path):
    # two datasets in one file: a label outside a row's own pathologies is neither predicted nor true for it.
    # a: set {Cardiomegaly}; "edema" in the answer does not count -> C TP. b: set {Edema} -> E TP.
    # Every label: TP 1, FP 0, FN 0 -> every column 1 (without the mask, a's "edema" would be an FP).
    rows = [
        {"id": "a", "task": "abnormality_classification", "answer": "Cardiomegaly and edema.", "reference": "x",
         "labels": ["Cardiomegaly"], "pathologies": ["Cardiomegaly"]},
        {"id": "b", "task": "abnormality_classification", "answer": "Edema.", "reference": "x",
         "labels": ["Edema"], "pathologies": ["edema"]},
    ]
    m = evaluate_file(write_jsonl(tmp_path / "mixed.jsonl", rows), MISSING, n_boot=20)["tasks"][
        "abnormality_classification"]["metrics"]
    assert all(m[f"{avg}_{k}"]["value"] == 1.0 for avg in ("micro", "macro") for k in ("precision", "recall", "f1"))


def test_classification_without_labels_uses_the_reference_text_and_chexperts_label_set(tmp_path):
    # no labels / pathologies on the rows: truth = CheXpert labels named in the reference answer
    # a: pred {Cardiomegaly}, true {Cardiomegaly, Edema} -> micro P 1, R 1/2, F1 2/3
    rows = [{"id": "a", "task": "classification", "answer": "Cardiomegaly.",
             "reference": "The abnormalities are cardiomegaly and edema."}]
    m = evaluate_file(write_jsonl(tmp_path / "text.jsonl", rows), MISSING, n_boot=20)["tasks"][
        "abnormality_classification"]["metrics"]
    assert (m["micro_precision"]["value"], m["micro_recall"]["value"]) == (1.0, 0.5)
    assert m["micro_f1"]["value"] == pytest.approx(2 / 3)
    # macro over the 13 CheXpert labels: Cardiomegaly F1 1, Edema 0, 11 labels without positives 0 -> 1/13
    assert m["macro_f1"]["value"] == pytest.approx(1 / 13)


# ------------------------------------------------------------------------------------------------- columns
# the paper's report columns (docs/paper.md §6), then ours; other variants may sit between RadCliQ-v1 and GLEU
REPORT_ORDER = ["ROUGE-L", "BERTScore", "CheXbert F1 micro-14", "CheXbert F1 macro-14", "CheXbert F1 micro-5",
                "CheXbert F1 macro-5", "RadGraph-F1", "GREEN", "RadCliQ-v1 ↓", "GLEU", "avg. characters"]


def test_columns_follow_the_papers_order_per_task():
    labels = [c.label for c in COLUMNS["report"]]
    assert labels[:9] == REPORT_ORDER[:9] and labels[-2:] == REPORT_ORDER[-2:]
    assert [c.key for c in COLUMNS["grounding"]] == ["map", "mean_iou", "soft_f1", "chars"]
    assert [c.key for c in COLUMNS["classification"]] == [
        "micro_precision", "micro_recall", "micro_f1", "macro_precision", "macro_recall", "macro_f1", "chars"]


def test_report_table_rows_keep_the_order_and_skip_a_column_nobody_computed(tmp_path):
    rows = [{"id": "r1", "task": "report_generation", "answer": "No effusion.", "reference": "No effusion."}]
    result = evaluate_file(write_jsonl(tmp_path / "r.jsonl", rows), MISSING, n_boot=10)
    metrics = result["tasks"]["report_generation"]["metrics"]
    labels = [metrics[k]["label"] for k in metrics]
    assert [x for x in labels if x in REPORT_ORDER] == [x for x in REPORT_ORDER if x in labels]  # JSON in order
    table_rows = [line.split(" | ")[0].removeprefix("| ") for line in format_table(result).splitlines()
                  if line.startswith("| ") and not line.startswith("| metric")]
    assert table_rows == labels  # a column without data (the RadEval variant unless asked for) has no row
    assert "RadCliQ-v1, RadEval variant (idf BERTScore; 1 / mean)" not in labels
    assert {"ROUGE-L", "RadCliQ-v1 ↓", "GLEU", "avg. characters"} <= set(labels)
