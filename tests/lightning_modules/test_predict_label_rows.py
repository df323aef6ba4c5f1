"""Prediction rows carry what RadVLM's evaluation needs beyond the reference text: the record's unrounded
``boxes`` (``gt_boxes``), its classification ``labels`` and label set ``pathologies``."""

import json
from types import SimpleNamespace

import torch

from datamodules.collate import PromptCollator
from datamodules.records import load_records
from lightning_modules.common import PolicyModule
from radvlm.processor import load_processor
from radvlm_tools.evaluate import evaluate_file
from tests.helpers import write_records

PATHOLOGIES = ["Atelectasis", "Cardiomegaly", "Edema"]


def classification_record(i, labels, answer):
    return {"id": f"chexpert-test_{i}", "image": f"img/{i}.png", "labels": labels, "pathologies": PATHOLOGIES,
            "conversations": [{"from": "human", "value": "<image>\nAre there any abnormalities on this Chest X-ray?"},
                              {"from": "gpt", "value": answer}]}


def box_record(i):
    return {"id": f"mscxr-test1_{i}", "image": f"img/b{i}.png", "boxes": [[0.004, 0.0, 1.0, 1.0]],
            "conversations": [{"from": "human", "value": "<image>\nWhere is the opacity?"},
                              {"from": "gpt", "value": "This phrase can be observed at [0.0, 0.0, 1.0, 1.0] on the image."}]}


def test_prompt_batches_carry_the_records_labels_pathologies_and_boxes(tiny_ckpt, tmp_path):
    records = load_records(write_records(tmp_path, [
        classification_record(0, ["Cardiomegaly"], "The abnormalities are cardiomegaly."), box_record(1)]))
    batch = PromptCollator(load_processor(tiny_ckpt))(records)
    assert batch["labels"] == [["Cardiomegaly"], None]  # the record's labels, not token labels
    assert batch["pathologies"] == [PATHOLOGIES, None]
    assert batch["gt_boxes"] == [[], [[0.004, 0.0, 1.0, 1.0]]]
    assert batch["tasks"] == ["abnormality_classification", "phrase_grounding"]


def _fake_module(texts):
    gen = SimpleNamespace(texts=texts, completion_mask=torch.ones(len(texts), 3), truncated=torch.zeros(len(texts)))
    return SimpleNamespace(policy=SimpleNamespace(generate=lambda *a, **k: gen), synced_generation=False,
                           shared_batch=lambda b: (b, False),
                           predict_max_new_tokens=8)


def _batch(n, **extra):
    return {"ids": [f"chexpert-test_{i}" for i in range(n)], "tasks": ["abnormality_classification"] * n,
            "thinking": [False] * n, "targets": ["x"] * n, "prompts": ["Any abnormality?"] * n,
            "images": [None] * n, "gt_boxes": [[]] * n, **extra}


def test_predict_rows_carry_labels_and_pathologies_and_evaluate_scores_them(tmp_path):
    texts = ["Cardiomegaly and edema.", "No abnormalities."]
    batch = _batch(2, labels=[["Cardiomegaly"], ["Edema"]], pathologies=[PATHOLOGIES, PATHOLOGIES])
    rows = PolicyModule.predict_step(_fake_module(texts), batch, 0)
    assert [(r["labels"], r["pathologies"]) for r in rows] == [(["Cardiomegaly"], PATHOLOGIES),
                                                              (["Edema"], PATHOLOGIES)]
    # C: TP 1; E: FP 1 (row 0), FN 1 (row 1) -> micro P 1/2, R 1/2, F1 1/2
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = evaluate_file(path, {"device": "cpu"}, n_boot=10)["tasks"]["abnormality_classification"]["metrics"]
    assert (m["micro_precision"]["value"], m["micro_recall"]["value"], m["micro_f1"]["value"]) == (0.5, 0.5, 0.5)


def test_predict_rows_without_label_fields_in_the_batch_hold_none():
    rows = PolicyModule.predict_step(_fake_module(["Edema."]), _batch(1), 0)
    assert rows[0]["labels"] is None and rows[0]["pathologies"] is None


def test_predict_rows_carry_the_boxes_of_the_reference_when_the_record_has_none():
    from lightning_modules.prediction import row_boxes

    # RadVLM's grounding records often hold their boxes only in the answer text
    assert row_boxes("phrase_grounding", [], "The opacity is at [0.12, 0.3, 0.5, 0.61].") == {
        "gt_boxes": [[0.12, 0.3, 0.5, 0.61]], "gt_boxes_from": "reference"}
    assert row_boxes("abnormality_grounding", [[0.1234, 0.2, 0.3, 0.4]], "[0.12, 0.2, 0.3, 0.4]") == {
        "gt_boxes": [[0.1234, 0.2, 0.3, 0.4]], "gt_boxes_from": "record"}  # the unrounded record boxes win
    assert row_boxes("report_generation", None, "a [0.1, 0.2, 0.3, 0.4] in a report") == {
        "gt_boxes": [], "gt_boxes_from": "none"}  # no box task: the text is not parsed
    assert row_boxes("abnormality_grounding", [], "No abnormalities or lesions are detected on this Chest X-ray.") \
        == {"gt_boxes": [], "gt_boxes_from": "none"}
