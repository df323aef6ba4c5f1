"""Lenient reading of RadVLM data: ``bad_records="skip"`` with a report, LLaVA's conversation normalisation,
the ``max_bad_fraction`` limit, and one account per split in the data module (malformed records and images)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import pytest

from datamodules.datamodule import RadVLMDataModule
from datamodules.records import LoadReport, RecordError, SkippedRecord, Turn, load_records
from tests.helpers import write_records

PROMPT = {"from": "human", "value": "<image>\nWrite a radiology report for this Chest X-ray."}
ANSWER = {"from": "gpt", "value": "The lungs are clear. No pleural effusion."}
FOLLOW_UP = {"from": "human", "value": "Is there a pneumothorax?"}


def radvlm(i: int, prefix: str = "mimic-train", conversations: list[dict] | None = None, **over) -> dict:
    """A record as RadVLM's dataset builder writes it: id "<source>-<split>_<i>", no task key."""
    rec = {"id": f"{prefix}_{i}", "image": f"img/{i}.png", "conversations": conversations or [PROMPT, ANSWER]}
    rec.update(over)
    return rec


# name → (conversations or record overrides of the bad record, reason, substring of the message, id named)
BAD_KINDS = {
    "leading_gpt_turn": ({"conversations": [ANSWER, PROMPT, ANSWER]}, "leading_assistant_turn",
                         "turn 0 is from 'gpt' but turns must alternate", "vindr-cxr-mono-train1_1"),
    "trailing_human_turn": ({"conversations": [PROMPT, ANSWER, FOLLOW_UP]}, "trailing_user_turn",
                            "must end with a gpt (assistant) turn", "vindr-cxr-mono-train1_1"),
    "two_gpt_turns": ({"conversations": [PROMPT, ANSWER, ANSWER]}, "consecutive_assistant_turns",
                      "turn 2 is from 'gpt' but turns must alternate", "vindr-cxr-mono-train1_1"),
    "empty_answer": ({"conversations": [PROMPT, {"from": "gpt", "value": "  "}]}, "empty_answer",
                     "turn 1 (assistant) is empty", "vindr-cxr-mono-train1_1"),
    "null_id": ({"id": None}, "missing_id", "'id' must be a non-empty string or an integer, got None", None),
}


def bad_file(folder: Path, kind: str, suffix: str = ".json") -> Path:
    """Three records (index 0 and 2 good, index 1 of the given bad kind) in a .json or .jsonl file."""
    over = BAD_KINDS[kind][0]
    recs = [radvlm(0), radvlm(1, "vindr-cxr-mono-train1", **over), radvlm(2)]
    path = write_records(folder, recs, "data.json")
    if suffix == ".jsonl":
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- each bad kind


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_bad_record_with_error_names_file_index_and_id(tmp_path: Path, kind: str, suffix: str):
    path = bad_file(tmp_path, kind, suffix)
    _, _, message, rid = BAD_KINDS[kind]
    with pytest.raises(RecordError) as err:
        load_records(path, bad_records="error")
    assert (err.value.file, err.value.index, err.value.record_id) == (str(path), 1, rid)
    assert str(err.value).startswith(f"{path}: record 1" + (f" (id {rid!r})" if rid else "") + ": ")
    assert message in str(err.value)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_bad_record_with_skip_is_left_out_and_reported(tmp_path: Path, kind: str, suffix: str):
    path = bad_file(tmp_path, kind, suffix)
    _, reason, message, rid = BAD_KINDS[kind]
    report = LoadReport()
    out = load_records(path, bad_records="skip", report=report)
    assert [r.id for r in out] == ["mimic-train_0", "mimic-train_2"]
    assert [r.task for r in out] == ["report_generation"] * 2  # task from the id prefix, no task key
    assert (report.records, report.checked) == (3, 2)
    assert report.reasons() == {reason: 1}
    (skipped,) = report.skipped
    assert (skipped.file, skipped.index, skipped.id, skipped.reason, skipped.image) == (str(path), 1, rid, reason, None)
    assert message in skipped.message
    assert report.bad_fraction == pytest.approx(1 / 3)


def test_broken_jsonl_line_is_a_record_error_or_a_skipped_record(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    write_records(tmp_path, [radvlm(0), radvlm(2)], "unused.json")  # the images
    path.write_text(json.dumps(radvlm(0)) + "\n\n{\"id\": \"mimic-train_1\", oops\n" + json.dumps(radvlm(2)) + "\n",
                    encoding="utf-8")
    with pytest.raises(RecordError) as err:
        load_records(path)
    assert str(err.value).startswith(f"{path}: record 1: invalid JSON on line 3, column 25")
    report = LoadReport()
    assert [r.id for r in load_records(path, bad_records="skip", report=report)] == ["mimic-train_0", "mimic-train_2"]
    message = "invalid JSON on line 3, column 25: Expecting property name enclosed in double quotes"
    assert report.skipped == [SkippedRecord(str(path), 1, None, "invalid_json", message)]
    assert [r.index for r in load_records(path, bad_records="skip")] == [0, 2]  # indices count the bad line


def test_unreadable_json_file_still_raises_with_skip(tmp_path: Path):
    path = tmp_path / "data.json"
    path.write_text('[{"id": "mimic-train_0", "conversations": [}]', encoding="utf-8")
    with pytest.raises(RecordError, match=r"data\.json: invalid or truncated JSON at line 1, column 44 \(char 43\)"):
        load_records(path, bad_records="skip", report=LoadReport())


def test_duplicate_id_and_missing_image_are_skipped_with_their_reasons(tmp_path: Path):
    path = write_records(tmp_path, [radvlm(0), radvlm(1), radvlm(0)])
    (tmp_path / "img" / "1.png").unlink()
    report = LoadReport()
    assert [r.index for r in load_records(path, bad_records="skip", report=report)] == [0]
    assert report.reasons() == {"image_missing": 1, "duplicate_id": 1}
    image = report.skipped[0]
    assert (image.index, image.id, image.image, image.message) == (
        1, "mimic-train_1", str((tmp_path / "img" / "1.png").resolve()), "file not found")
    assert report.skipped[1].message.startswith("duplicate id, first used by record 0")


def test_skip_without_a_report_logs_the_skipped_records(tmp_path: Path, caplog):
    path = bad_file(tmp_path, "two_gpt_turns")
    with caplog.at_level(logging.WARNING, logger="datamodules.records"):
        assert len(load_records(path, bad_records="skip")) == 2
    assert "skipped 1 of 3 records" in caplog.text and "'consecutive_assistant_turns': 1" in caplog.text
    assert "id='vindr-cxr-mono-train1_1'" in caplog.text


def test_unknown_bad_records_value_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="bad_records must be 'error' or 'skip', got 'ignore'"):
        load_records(bad_file(tmp_path, "null_id"), bad_records="ignore")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- normalisation


def test_normalisation_drops_leading_gpt_and_trailing_human_turns_and_counts_them(tmp_path: Path):
    recs = [radvlm(0, conversations=[ANSWER, PROMPT, ANSWER]),
            radvlm(1, conversations=[PROMPT, ANSWER, FOLLOW_UP]),
            radvlm(2, conversations=[ANSWER, PROMPT, ANSWER, FOLLOW_UP]),
            radvlm(3)]
    path = write_records(tmp_path, recs)
    report = LoadReport()
    out = load_records(path, normalize_conversations=True, report=report)
    expected = [Turn("user", "Write a radiology report for this Chest X-ray."), Turn("assistant", ANSWER["value"])]
    assert [r.conversations for r in out] == [expected] * 4
    assert report.normalised == {"dropped_leading_assistant_turn": 2, "dropped_trailing_user_turn": 2}
    assert report.skipped == []


def test_without_normalisation_leading_gpt_and_trailing_human_turns_are_bad(tmp_path: Path):
    recs = [radvlm(0, conversations=[ANSWER, PROMPT, ANSWER]), radvlm(1, conversations=[PROMPT, ANSWER, FOLLOW_UP])]
    report = LoadReport()
    assert load_records(write_records(tmp_path, recs), bad_records="skip", report=report) == []
    assert report.reasons() == {"leading_assistant_turn": 1, "trailing_user_turn": 1}
    assert not report.normalised


@pytest.mark.parametrize("kind", ["two_gpt_turns", "empty_answer", "null_id"])
def test_normalisation_does_not_repair_other_bad_kinds(tmp_path: Path, kind: str):
    path = bad_file(tmp_path, kind)
    with pytest.raises(RecordError, match=BAD_KINDS[kind][2].replace("(", r"\(").replace(")", r"\)")):
        load_records(path, normalize_conversations=True)


def test_normalised_record_that_is_still_bad_is_skipped_and_not_counted_as_normalised(tmp_path: Path):
    # the leading gpt turn is dropped, then gpt follows gpt: messages number turns as in the file
    path = write_records(tmp_path, [radvlm(0, conversations=[ANSWER, PROMPT, ANSWER, ANSWER]), radvlm(1),
                                    radvlm(2, conversations=[ANSWER])])
    report = LoadReport()
    assert [r.index for r in load_records(path, bad_records="skip", normalize_conversations=True, report=report)] == [1]
    assert report.reasons() == {"consecutive_assistant_turns": 1, "bad_conversations": 1}
    assert "turn 3 is from 'gpt'" in report.skipped[0].message
    assert "no turn is left after LLaVA normalisation" in report.skipped[1].message
    assert not report.normalised


# ---------------------------------------------------------------------------------------- the limit


def test_max_bad_fraction_allows_up_to_the_limit_and_lists_counts_per_reason_past_it(tmp_path: Path):
    recs = [radvlm(i) for i in range(10)]
    recs[3]["conversations"] = [PROMPT, ANSWER, ANSWER]
    recs[7]["id"] = None
    report = LoadReport()
    assert len(load_records(write_records(tmp_path, recs), bad_records="skip", report=report)) == 8
    report.check_limit(0.2)  # 2 / 10 = 0.2: allowed
    with pytest.raises(RecordError) as err:
        report.check_limit(0.1, "train", "data.json", "run/bad_records.jsonl")
    text = str(err.value)
    assert text.startswith("data.json: 2 of 10 train records are malformed, more than max_bad_fraction=0.1 (20.0% lost)")
    assert "skipped per reason: {'consecutive_assistant_turns': 1, 'missing_id': 1}" in text
    assert "all listed in run/bad_records.jsonl" in text
    assert "[3] id='mimic-train_3' (consecutive_assistant_turns)" in text and "[7] id=None (missing_id)" in text


def test_bad_fraction_combines_malformed_records_and_bad_images():
    # 2 malformed of 10 read (0.2), then 2 bad images of the 4 records checked (0.5):
    # 0.2 + 0.5 − 0.2·0.5 = 0.6 lost; without a filter in between (8 checked): (2 + 2) / 10 = 0.4
    skipped = [SkippedRecord("f", i, None, "empty_answer", "") for i in range(2)]
    skipped += [SkippedRecord("f", i, None, "image_missing", "") for i in range(2)]
    assert LoadReport(records=10, checked=4, skipped=skipped).bad_fraction == pytest.approx(0.6)
    assert LoadReport(records=10, checked=8, skipped=skipped).bad_fraction == pytest.approx(0.4)
    with pytest.raises(RecordError, match=r"2 of 10 records are malformed and 2 of 8 checked have a bad image"):
        LoadReport(records=10, checked=8, skipped=skipped).check_limit(0.3)


# ---------------------------------------------------------------------------------------- data module


def real_like_file(folder: Path) -> Path:
    """Ten RadVLM-style records: two malformed, two needing LLaVA normalisation, one with a missing image."""
    recs = [radvlm(i, "mimic-train") for i in range(5)] + [radvlm(i, "vindr-cxr-mono-train1") for i in range(5, 10)]
    recs[1]["conversations"] = [ANSWER, PROMPT, ANSWER]  # normalised
    recs[2]["conversations"] = [PROMPT, ANSWER, FOLLOW_UP]  # normalised
    recs[4]["conversations"] = [PROMPT, {"from": "gpt", "value": ""}]  # empty answer
    recs[6]["id"] = None  # null id
    path = write_records(folder, recs)
    (folder / "img" / "8.png").unlink()
    return path


def setup_data(tiny_ckpt, path: Path, **kw) -> RadVLMDataModule:
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(path)], **kw)
    data.setup("fit")
    return data


def read_report(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_datamodule_skip_writes_one_report_with_records_and_images(tiny_ckpt, tmp_path: Path, caplog):
    path = real_like_file(tmp_path)
    report_file = tmp_path / "out" / "bad.jsonl"
    with caplog.at_level(logging.INFO, logger="datamodules.datamodule"):
        data = setup_data(tiny_ckpt, path, bad_records="skip", normalize_conversations=True, max_bad_fraction=0.3,
                          bad_records_report=str(report_file))
    assert [r.id for r in data.splits["train"]] == ["mimic-train_0", "mimic-train_1", "mimic-train_2", "mimic-train_3",
                                                    "vindr-cxr-mono-train1_5", "vindr-cxr-mono-train1_7",
                                                    "vindr-cxr-mono-train1_9"]
    report = data.load_reports["train"]
    assert report.reasons() == {"empty_answer": 1, "missing_id": 1, "image_missing": 1}
    assert report.normalised == {"dropped_leading_assistant_turn": 1, "dropped_trailing_user_turn": 1}
    assert data.n_bad == 3 and report.bad_fraction == pytest.approx(0.3)  # 2/10 + 1/8 − 2/80 = 3/10
    rows = read_report(report_file)
    assert [(r["split"], r["file"], r["index"], r["id"], r["reason"]) for r in rows] == [
        ("train", str(path), 4, "mimic-train_4", "empty_answer"),
        ("train", str(path), 6, None, "missing_id"),
        ("train", str(path), 8, "vindr-cxr-mono-train1_8", "image_missing"),
    ]
    assert rows[2]["image"] == str((tmp_path / "img" / "8.png").resolve()) and rows[2]["message"] == "file not found"
    assert "train: skipped 3 of 10 records" in caplog.text and "'image_missing': 1" in caplog.text
    assert "id='mimic-train_4'" in caplog.text and str(report_file) in caplog.text
    assert "'dropped_leading_assistant_turn': 1" in caplog.text


def test_datamodule_past_max_bad_fraction_fails_listing_reasons_and_keeps_the_report(tiny_ckpt, tmp_path: Path):
    path = real_like_file(tmp_path)
    report_file = tmp_path / "bad.jsonl"
    with pytest.raises(RecordError) as err:
        setup_data(tiny_ckpt, path, bad_records="skip", normalize_conversations=True, max_bad_fraction=0.25,
                   bad_records_report=str(report_file))
    text = str(err.value)
    assert "2 of 10 train records are malformed and 1 of 8 checked have a bad image, more than max_bad_fraction=0.25" \
        in text
    assert "{'empty_answer': 1, 'missing_id': 1, 'image_missing': 1}" in text and str(report_file) in text
    assert len(read_report(report_file)) == 3


def test_datamodule_stops_before_decoding_images_when_reading_passes_the_limit(tiny_ckpt, tmp_path: Path):
    path = real_like_file(tmp_path)
    with pytest.raises(RecordError, match=r"2 of 10 train records are malformed, more than max_bad_fraction=0\.1"):
        setup_data(tiny_ckpt, path, bad_records="skip", normalize_conversations=True, max_bad_fraction=0.1,
                   bad_records_report=str(tmp_path / "bad.jsonl"))
    assert [r["reason"] for r in read_report(tmp_path / "bad.jsonl")] == ["empty_answer", "missing_id"]


def test_datamodule_default_is_strict(tiny_ckpt, tmp_path: Path):
    path = real_like_file(tmp_path)
    with pytest.raises(RecordError, match=r"record 1 \(id 'mimic-train_1'\): turn 0 is from 'gpt'"):
        setup_data(tiny_ckpt, path)
    with pytest.raises(RecordError, match=r"record 4 \(id 'mimic-train_4'\): turn 1 \(assistant\) is empty"):
        setup_data(tiny_ckpt, path, normalize_conversations=True)
    with pytest.raises(ValueError, match="bad_records must be 'error' or 'skip'"):
        RadVLMDataModule(str(tiny_ckpt), train_files=[str(path)], bad_records="drop")  # type: ignore[arg-type]


def test_datamodule_report_defaults_to_the_trainer_root_and_without_trainer_to_the_log(tiny_ckpt, tmp_path: Path,
                                                                                      monkeypatch, caplog):
    path = write_records(tmp_path, [radvlm(i) for i in range(4)])
    (tmp_path / "img" / "2.png").unlink()
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="datamodules.datamodule"):
        data = setup_data(tiny_ckpt, path, bad_records="skip", max_bad_fraction=0.5)
    assert data.load_reports["train"].reasons() == {"image_missing": 1}
    assert not (tmp_path / "bad_records.jsonl").exists() and "no report file" in caplog.text
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(path)], val_files=[str(path)], bad_records="skip",
                            max_bad_fraction=0.5)
    data.trainer = L.Trainer(default_root_dir=tmp_path / "run", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
    data.setup("fit")
    rows = read_report(tmp_path / "run" / "bad_records.jsonl")
    assert [(r["split"], r["id"]) for r in rows] == [("train", "mimic-train_2"), ("val", "mimic-train_2")]


def test_datamodule_clean_skip_run_writes_an_empty_report(tiny_ckpt, tmp_path: Path):
    path = write_records(tmp_path, [radvlm(i) for i in range(3)])
    (tmp_path / "bad.jsonl").write_text('{"stale": true}\n')
    data = setup_data(tiny_ckpt, path, bad_records="skip", bad_records_report=str(tmp_path / "bad.jsonl"))
    assert data.n_bad == 0 and len(data.splits["train"]) == 3
    assert (tmp_path / "bad.jsonl").read_text() == ""
