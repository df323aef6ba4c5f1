"""Evaluation parity with RadVLM and the paper (radvlm_tools/prediction_files.py, radvlm_tools/evaluate.py): RadVLM's output
files read beside ours, GREEN as a column, RadCliQ-v1's RadEval variant."""

import json

import pytest

from metrics.green import GREEN
from radvlm_tools.eval_tables import format_table
from radvlm_tools.evaluate import evaluate_file, main, read_predictions, scored_path_for
from radvlm_tools.prediction_files import detect_format, parse_keys, read_prediction_file, task_from_filename
from tests.helpers import FakeChatServer, eval_metrics_config

# what RadVLM's evaluate_instructions.py writes for report generation: no id, no task, the ground truth under
# "txt" (and the instruction's answer under "answer"), the model's text under "output"
THEIRS = [
    {"idx": 7, "instr": "Write a radiology report for this Chest X-ray.", "output": "No pleural effusion.",
     "answer": "No pleural effusion.", "txt": "No pleural effusion.", "img_path": "p10/s1/a.jpg",
     "labels": ["No Finding"]},
    {"idx": 3, "instr": "Write a radiology report for this Chest X-ray.",
     "output": "the heart is normal and lungs are clear", "answer": "x",
     "txt": "The heart is normal and lungs are clear.", "img_path": "p10/s2/b.jpg", "labels": []},
]
OURS = [
    # ROUGE-L 2/3 (LCS 4 of 4 and 8 tokens) and 1: mean 0.8333
    {"id": "r1", "task": "report_generation", "answer": "the heart is normal",
     "reference": "the heart is normal and lungs are clear"},
    {"id": "r2", "task": "report_generation", "answer": "No pleural effusion.", "reference": "No pleural effusion."},
]
MISSING = eval_metrics_config("/nonexistent/bert", "/nonexistent/c.pth", "/nonexistent/rg", "/nonexistent/rg",
                              offline=True)


def write_config(path, *layers):
    """``--metrics-config PATH`` arguments, one file per layer."""
    args = []
    for i, layer in enumerate(layers):
        file = path / f"metrics{i}.yaml"
        file.write_text(json.dumps(layer))  # JSON is YAML
        args += ["--metrics-config", str(file)]
    return args


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------ reading RadVLM
def test_radvlm_output_rows_get_our_keys_stable_ids_and_the_task_of_the_file_name(tmp_path):
    path = write_json(tmp_path / "radvlm_report_generation_output.json", THEIRS)
    read = read_prediction_file(path)
    assert read.format == "radvlm" and read.duplicates == 0
    a, b = read.rows  # sorted by id: dataset index 3, then 7
    assert a["id"] == "radvlm_report_generation_output_3" and b["id"] == "radvlm_report_generation_output_7"
    assert (b["task"], b["answer"], b["reference"]) == ("report_generation", "No pleural effusion.",
                                                        "No pleural effusion.")
    assert a["reference"] == "The heart is normal and lungs are clear."  # "txt", not RadVLM's "answer"
    assert (a["prompt"], a["image"], a["labels"], a["idx"]) == (THEIRS[1]["instr"], "p10/s2/b.jpg", [], 3)
    assert "output" not in a and "txt" not in a and "x" not in a.values()  # RadVLM's "answer" is not ours
    assert "txt" in read.describe() and "answer ← output" in read.describe()


def test_rows_without_index_are_numbered_by_position_and_repeated_samples_are_counted(tmp_path):
    objs = [{k: v for k, v in o.items() if k != "idx"} for o in THEIRS]
    assert [r["id"] for r in read_predictions(write_json(tmp_path / "m_report_generation_output.json", objs))[0]] \
        == ["m_report_generation_output_0", "m_report_generation_output_1"]
    padded = THEIRS + [THEIRS[0]]  # a distributed run writes a padded sample twice (same dataset index)
    rows, dropped = read_predictions(write_json(tmp_path / "p_report_generation_output.json", padded))
    assert len(rows) == 2 and dropped == 1


def test_grounding_outputs_are_scored_against_their_unrounded_boxes(tmp_path):
    box = [0.123456, 0.2, 0.4, 0.654321]
    objs = [{"idx": 0, "output": "The mass is located at the coordinates [0.123456, 0.2, 0.4, 0.654321] on the "
             "image.", "answer": "The mass is located at the coordinates [0.12, 0.2, 0.4, 0.65] on the image.",
             "boxes": [box], "label": "mass"}]
    path = write_json(tmp_path / "vindr_output.json", objs)
    result = evaluate_file(path, MISSING, n_boot=20, default_task="abnormality_grounding")
    row = read_predictions(path, "abnormality_grounding")[0][0]
    assert row["gt_boxes"] == [box] and row["reference"] == objs[0]["answer"] and row["label"] == "mass"
    m = result["tasks"]["abnormality_grounding"]["metrics"]
    assert m["mean_iou"]["value"] == pytest.approx(1.0)  # the 2-decimal reference text would give < 1
    assert m["map"]["value"] == 1.0


def test_the_task_comes_from_the_flag_or_the_file_name_with_clear_errors(tmp_path):
    assert task_from_filename("llavaov_region_grounding_output_partial.json") == "region_grounding"
    assert task_from_filename("x_grounded_conversation_output.json") == "grounded_conversation"
    assert task_from_filename("vindr_output.json") is None
    path = write_json(tmp_path / "vindr_output.json", THEIRS)
    with pytest.raises(ValueError, match=r"vindr_output.json: .*pass --task"):
        read_predictions(path)
    assert read_predictions(path, "report_generation")[0][0]["task"] == "report_generation"
    named = write_json(tmp_path / "m_report_generation_output.json", THEIRS)
    with pytest.raises(ValueError, match="contradicts"):
        read_predictions(named, "phrase_grounding")
    both = write_json(tmp_path / "m_phrase_grounding_vs_region_grounding_output.json", THEIRS)
    with pytest.raises(ValueError, match="several tasks"):
        read_predictions(both)


def test_formats_are_detected_and_keys_can_be_remapped(tmp_path):
    lines = write_jsonl(tmp_path / "t_report_generation_output.jsonl", THEIRS)
    assert detect_format(lines) == "radvlm-jsonl"
    assert detect_format(write_jsonl(tmp_path / "ours.jsonl", OURS)) == "jsonl"
    assert read_predictions(lines)[0][1]["answer"] == "No pleural effusion."
    listed = write_json(tmp_path / "l_report_generation_output.json", THEIRS)
    with pytest.raises(ValueError, match="--format radvlm"):
        read_predictions(listed, fmt="jsonl")
    custom = [{"uid": "s1", "pred": "Mild edema.", "gt": "Moderate edema."}]
    rows, _ = read_predictions(write_json(tmp_path / "other.json", custom), "report_generation",
                               keys="id=uid,answer=pred,reference=gt")
    assert (rows[0]["id"], rows[0]["answer"], rows[0]["reference"]) == ("s1", "Mild edema.", "Moderate edema.")
    assert parse_keys("answer=output, reference=txt") == {"answer": "output", "reference": "txt"}
    with pytest.raises(ValueError, match="OURS=THEIRS"):
        parse_keys("score=output")
    with pytest.raises(ValueError, match=r"other.json\[0\]: no key 'missing'"):
        read_predictions(tmp_path / "other.json", "report_generation", keys="answer=missing")
    nan_txt = [{"output": "x", "txt": float("nan")}]
    with pytest.raises(TypeError, match=r"nan.json\[0\]: 'reference' must be a string, got float"):
        read_predictions(write_json(tmp_path / "nan.json", nan_txt), "report_generation")


# ------------------------------------------------------------------------------------------- side by side
def test_published_output_and_ours_in_one_table_with_bootstrap_cis(tmp_path, capsys):
    ours = write_jsonl(tmp_path / "ours.jsonl", OURS)
    theirs = write_json(tmp_path / "theirs_output.json", THEIRS)
    out = main([str(ours), str(theirs), "--task", "report_generation", "--bootstrap", "200",
                *write_config(tmp_path, MISSING)])
    table = capsys.readouterr().out
    assert "### report_generation (ours: n = 2, theirs_output: n = 2)" in table
    assert "| metric | ours | 95 % CI | theirs_output | 95 % CI | Δ theirs_output |" in table
    # theirs: both outputs equal their "txt" up to case and punctuation → ROUGE-L 1 each
    assert "| ROUGE-L | 83.3 | [66.7, 100.0] | 100.0 | [100.0, 100.0] | +16.7 |" in table
    assert "| GREEN | unavailable [" in table and "unavailable: no GREEN judge configured" in table
    assert "theirs_output.json: RadVLM evaluation output (radvlm); keys answer ← output" in table
    assert [r["format"] for r in out["runs"]] == ["jsonl", "radvlm"]
    assert (tmp_path / "ours.eval.json").is_file() and scored_path_for(theirs).name == "theirs_output.scored.jsonl"
    scored = [json.loads(x) for x in scored_path_for(theirs).read_text().splitlines()]
    assert [r["id"] for r in scored] == ["theirs_output_3", "theirs_output_7"]
    assert scored[0]["scores"]["rouge_l"] == pytest.approx(1.0)


def test_green_column_from_an_endpoint_judge(tmp_path, capsys):
    half = ("[Clinically Significant Errors]:\n(b) Missing a finding present in the reference: 1. Clear lungs.\n\n"
            "[Matched Findings]:\n1. Normal heart.\n")  # 1 / (1 + 1) = 0.5
    full = "[Clinically Significant Errors]:\nNo errors.\n\n[Matched Findings]:\n1. No effusion.\n"  # 1.0

    def respond(payload):
        return half if "the heart is normal\n" in payload["messages"][0]["content"] else full

    with FakeChatServer(respond) as server:
        green = {"green": {"class_path": "metrics.green.GREEN", "init_args": {"model": "green-judge",
                                                                               "endpoint": server.url}}}
        out = main([str(write_jsonl(tmp_path / "ours.jsonl", OURS)), "--bootstrap", "100",
                    *write_config(tmp_path, MISSING, green)])
    green = out["tasks"]["report_generation"]["metrics"]["green"]
    assert green["value"] == pytest.approx((0.5 + 1.0) / 2) and green["ci"] == [0.5, 1.0] and green["n"] == 2
    assert "| GREEN | 75.0 | [50.0, 100.0] |" in capsys.readouterr().out
    assert {p["model"] for _, p in server.seen} == {"green-judge"}
    scored = {r["id"]: r["scores"] for r in map(json.loads, scored_path_for(tmp_path / "ours.jsonl").read_text()
                                                 .splitlines())}
    assert (scored["r1"]["green"], scored["r2"]["green"]) == (0.5, 1.0)


def test_green_with_an_unreadable_local_judge_is_unavailable_with_the_reason(tmp_path):
    settings = {**MISSING, "green": {"class_path": "metrics.green.GREEN", "init_args": {"model": str(tmp_path / "no-judge")}}}
    m = evaluate_file(write_jsonl(tmp_path / "o.jsonl", OURS), settings, n_boot=10)["tasks"]["report_generation"]
    assert "GREEN judge" in m["metrics"]["green"]["unavailable"] and "no-judge" in m["metrics"]["green"]["unavailable"]
    assert GREEN.higher_is_better



def test_green_endpoint_key_comes_from_the_variable_the_config_names(tmp_path, monkeypatch):
    monkeypatch.delenv("GREEN_TEST_KEY", raising=False)
    green = {"class_path": "metrics.green.GREEN",
             "init_args": {"model": "m", "endpoint": "https://judge.invalid/v1", "api_key_env": "GREEN_TEST_KEY"}}
    m = evaluate_file(write_jsonl(tmp_path / "o.jsonl", OURS), {**MISSING, "green": green}, n_boot=10)
    assert "GREEN_TEST_KEY is not set" in m["tasks"]["report_generation"]["metrics"]["green"]["unavailable"]

# ---------------------------------------------------------------------------------------- RadEval variant
def test_radeval_variant_is_idf_bertscore_without_the_reward_wrapper_and_one_over_the_mean(tmp_path, capsys):
    from metrics.bertscore import BERTScore
    from metrics.chexbert import CheXbertSimilarity
    from metrics.radcliq import RadCliQ
    from metrics.radgraph import RadGraphF1
    from metrics.text import BLEU
    from metrics.tiny import write_tiny_bert, write_tiny_chexbert, write_tiny_radgraph

    bert = write_tiny_bert(tmp_path / "bert")
    chexbert = write_tiny_chexbert(tmp_path / "chexbert.pth", bert)
    radgraph = write_tiny_radgraph(tmp_path / "radgraph", bert, model_type="radgraph")
    rows = [{"id": f"r{i}", "task": "report_generation", "answer": a, "reference": b} for i, (a, b) in enumerate([
        ("The heart size is normal.", "Heart size is normal. No pleural effusion."),
        ("Small left pleural effusion.", "Moderate left pleural effusion with atelectasis."),
        ("Fine.", "Mild cardiomegaly. Lungs are clear."),  # ≤ 5 characters: the reward's floor, not RadEval's
    ])]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    tiny = eval_metrics_config(bert, chexbert, "/nonexistent/rg", radgraph)
    radeval = {"radcliq_radeval": {"class_path": "metrics.radcliq.RadCliQ", "init_args": {
        **tiny["radcliq"]["init_args"], "lowercase": False, "max_chars": None, "min_chars": None,
        "bertscore": {"class_path": "metrics.bertscore.BERTScore", "init_args": {"model_type": bert, "num_layers": 2,
                                                                                 "idf": True}}}}}
    out = main([str(path), "--bootstrap", "50", "--offline", "--device", "cpu", *write_config(tmp_path, tiny, radeval)])
    preds, refs = [r["answer"] for r in rows], [r["reference"] for r in rows]
    radeval = RadCliQ(radgraph=RadGraphF1("radgraph", reward_level="radcliq", model_dir=radgraph, device="cpu"),
                      bertscore=BERTScore(bert, num_layers=2, idf=True, device="cpu"),
                      semb=CheXbertSimilarity(chexbert, bert, device="cpu"), bleu=BLEU(n=2),
                      lowercase=False, max_chars=None, min_chars=None).score(preds, refs)
    m = out["tasks"]["report_generation"]["metrics"]
    assert m["radcliq_radeval"]["value"] == pytest.approx(1.0 / float(radeval.double().mean()), rel=1e-5)
    assert m["radcliq"]["value"] is not None and m["radcliq_radeval"]["value"] != m["radcliq"]["value"]
    scored = {r["id"]: r["scores"] for r in map(json.loads, scored_path_for(path).read_text().splitlines())}
    assert scored["r2"]["radcliq"] == 3.0 and scored["r2"]["radcliq_radeval"] == pytest.approx(float(radeval[2]),
                                                                                               rel=1e-5)
    assert "| RadCliQ-v1, RadEval variant (idf BERTScore; 1 / mean) |" in capsys.readouterr().out
    plain = format_table(evaluate_file(path, MISSING, n_boot=10, write_scored=False))
    assert "RadEval variant" not in plain  # only on request


def test_header_lines_are_skipped_and_two_models_in_one_file_are_refused(tmp_path):
    from radvlm_tools.prediction_files import header_line, model_identity

    a = model_identity("m.M", "hub/a", None, {"max_new_tokens": 4})
    b = model_identity("m.M", "hub/b", None, {"max_new_tokens": 4})
    rows = "".join(json.dumps(r) + "\n" for r in OURS)
    path = tmp_path / "p.jsonl"
    path.write_text(header_line(a) + rows)
    read = read_prediction_file(path)
    assert [r["id"] for r in read.rows] == ["r1", "r2"] and read.header["name_or_path"] == "hub/a"
    assert detect_format(path) == "jsonl"
    path.write_text(rows)  # an older file without header reads as before
    assert [r["id"] for r in read_prediction_file(path).rows] == ["r1", "r2"]
    assert read_prediction_file(path).header is None
    path.write_text(header_line(a) + json.dumps(OURS[0]) + "\n" + header_line(b) + json.dumps(OURS[1]) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:3: this file holds the predictions of two models.*hub/a.*hub/b"):
        read_prediction_file(path)
