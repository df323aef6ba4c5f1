"""First-day traps of the data layer: ``python -m datamodules.records --check`` validates and reports per task
(it printed nothing and exited 0), and cold-start answers must hold a well-formed thinking block (10 of 20
answers without the opening ``<think>`` trained as they were)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.records import RecordError, check_files, load_records, main
from tests.helpers import report_record, write_records

ROOT = Path(__file__).resolve().parents[2]


def _thinking(i: int, answer: str) -> dict:
    rec = report_record(i, answer)
    rec["conversations"][0]["value"] += " /think"
    return rec


GOOD = "<think>\nThe heart is normal in size.\n</think>\n\nNo acute cardiopulmonary process."


@pytest.mark.parametrize("answer, message", [
    ("The heart is normal in size.\n</think>\n\nNo acute process.", "one <think> … </think> block"),
    ("<think>\nThe heart is normal in size.\n\nNo acute process.", "one <think> … </think> block"),
    ("Answer first. <think>trace</think> answer", "must start with <think>"),
    ("<think>trace</think>   ", "no answer after </think>"),
    ("<think>a</think> b <think>c</think> d", "found 2 <think>"),
])
def test_a_malformed_thinking_block_is_a_bad_record(tmp_path, answer, message):
    path = write_records(tmp_path, [_thinking(0, GOOD), _thinking(1, answer)])
    with pytest.raises(RecordError, match=message) as err:
        load_records(path)
    assert "r1" in str(err.value) and "turn 1 (gpt)" in str(err.value)
    reports, tasks = check_files([path])
    assert reports[str(path)].reasons() == {"bad_thinking": 1}
    assert tasks[str(path)] == {"report_generation": 1}


def test_answers_without_thinking_tags_and_upper_case_tags_pass(tmp_path):
    path = write_records(tmp_path, [report_record(0), _thinking(1, GOOD.replace("think>", "THINK>"))])
    assert len(load_records(path)) == 2


def test_check_reports_per_task_and_fails_on_bad_records(tmp_path, capsys):
    radvlm_style = [  # RadVLM's builders: the task only in the id prefix, no task key
        {"id": "mimic-train_0", "image": "img/a.png",
         "conversations": [{"from": "human", "value": "<image>\nWrite the report."},
                           {"from": "gpt", "value": "No acute process."}]},
        {"id": "vindr-cxr-mono-train1_17", "image": "img/b.png",
         "conversations": [{"from": "human", "value": "<image>\nWhere is the nodule?"},
                           {"from": "gpt", "value": "[0.1, 0.2, 0.3, 0.4]"}]},
        {"id": "mimic-train_1", "image": "img/missing.png",
         "conversations": [{"from": "human", "value": "<image>\nWrite the report."},
                           {"from": "gpt", "value": "Small effusion."}]},
    ]
    path = write_records(tmp_path, radvlm_style)
    (tmp_path / "img" / "missing.png").unlink()
    assert main(["--check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "3 records, 2 good, 1 bad" in out
    assert "report_generation: 1" in out and "abnormality_grounding: 1" in out
    assert "mimic-train_1" in out and "image_missing" in out
    good = write_records(tmp_path / "good", radvlm_style[:2])
    assert main(["--check", str(good)]) == 0


def test_check_runs_as_a_module(tmp_path):
    path = write_records(tmp_path, [report_record(0)])
    out = subprocess.run([sys.executable, "-m", "datamodules.records", "--check", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "1 records, 1 good, 0 bad" in out.stdout and "report_generation: 1" in out.stdout


def test_test_and_predict_score_every_record_unless_their_own_cap_is_set(tmp_path, tiny_ckpt):
    from datamodules.datamodule import RadVLMDataModule

    path = write_records(tmp_path, [report_record(i) for i in range(5)])
    files = {"val_files": [str(path)], "test_files": [str(path)], "predict_files": [str(path)]}
    data = RadVLMDataModule(str(tiny_ckpt), max_val_samples=2, check_images=False, **files)
    data.setup("validate"), data.setup("test"), data.setup("predict")
    assert [len(data.splits[s]) for s in ("val", "test", "predict")] == [2, 5, 5]  # the trap: 2, 2, 2
    assert data.task_summary["val"]["(all)"]["capped"] == 3
    capped = RadVLMDataModule(str(tiny_ckpt), max_test_samples=3, max_predict_samples=4, check_images=False, **files)
    capped.setup("test"), capped.setup("predict")
    assert len(capped.splits["test"]) == 3 and len(capped.splits["predict"]) == 4


def test_setup_reports_records_kept_and_dropped_per_task(tmp_path, tiny_ckpt, capsys, caplog):
    from datamodules.datamodule import RadVLMDataModule, format_task_summary

    grounding = {"id": "vindr-cxr-mono-train1_3", "image": "img/g.png",
                 "conversations": [{"from": "human", "value": "<image>\nWhere is the nodule?"},
                                   {"from": "gpt", "value": "[0.1, 0.2, 0.3, 0.4]"}]}
    path = write_records(tmp_path, [report_record(i) for i in range(3)] + [grounding])
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(path)], tasks=["report_generation"], check_images=False)
    data.setup("fit")
    summary = data.task_summary["train"]
    assert summary["abnormality_grounding"] == {"read": 1, "kept": 0, "dropped": 1}
    assert summary["report_generation"] == {"read": 3, "kept": 3, "dropped": 0}
    assert summary["(all)"]["kept"] == 3 and summary["(all)"]["read"] == 4
    line = format_task_summary("train", summary)
    assert line == ("train records per task (kept/read): abnormality_grounding 0/1, report_generation 3/3; "
                    "3 of 4 kept")
