"""Record reader: RadVLM/LLaVA JSON and JSONL, validation errors naming file/index/id/path, image checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.records import (
    GROUNDING_TASKS,
    MAX_ASPECT_RATIO,
    MIN_IMAGE_SIDE,
    TASKS,
    ImageError,
    Record,
    RecordError,
    Turn,
    check_image,
    load_image,
    load_records,
    save_records,
)


def _png(path: Path, w: int = 64, h: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.arange(w * h).reshape(h, w) % 251).astype(np.uint8)).save(path)
    return path


def _rec(rid: str = "r0", image: str | None = "img/a.png", **extra) -> dict:
    turns = [{"from": "human", "value": ("<image>\n" if image else "") + "Write a radiology report for this Chest X-ray."},
             {"from": "gpt", "value": "The lungs are clear."}]
    out = {"id": rid, "conversations": turns, **extra}
    if image is not None:
        out["image"] = image
    return out


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", 30, 40)
    return tmp_path


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ reading


def test_json_list_loads_fields_and_strips_image_tag(folder: Path):
    recs = [_rec("r0", task="abnormality_grounding", boxes=[[0.1, 0.2, 0.3, 0.4]], labels=["Mass"], source_ds="vindr"),
            _rec("r1", "img/b.png")]
    recs[0]["conversations"][1]["value"] = "A mass at [0.1, 0.2, 0.3, 0.4]."  # boxes agree with the answer text
    out = load_records(_write_json(folder / "train.json", recs))
    assert [r.id for r in out] == ["r0", "r1"]
    r = out[0]
    assert r.image == (folder / "img" / "a.png").resolve() and r.image.is_absolute()
    assert r.conversations == [Turn("user", "Write a radiology report for this Chest X-ray."),
                               Turn("assistant", "A mass at [0.1, 0.2, 0.3, 0.4].")]
    assert r.prompt == "Write a radiology report for this Chest X-ray." and r.answer == "A mass at [0.1, 0.2, 0.3, 0.4]."
    assert r.has_image and r.task == "abnormality_grounding"
    assert r.boxes == [[0.1, 0.2, 0.3, 0.4]] and r.labels == ["Mass"]
    assert r.extra == {"source_ds": "vindr"}
    assert (r.source, r.index, out[1].index) == (str(folder / "train.json"), 0, 1)
    assert out[1].task is None and out[1].boxes is None and out[1].labels is None


def test_jsonl_loads_and_skips_blank_lines(folder: Path):
    path = folder / "train.jsonl"
    path.write_text(json.dumps(_rec("a")) + "\n\n" + json.dumps(_rec("b", "img/b.png")) + "\n", encoding="utf-8")
    out = load_records(path)
    assert [(r.id, r.index) for r in out] == [("a", 0), ("b", 1)]
    assert out[1].image == (folder / "img" / "b.png").resolve()


def test_multi_turn_with_user_assistant_aliases(folder: Path):
    conv = [{"from": "human", "value": "<image>\nIs there a pleural effusion?"}, {"from": "gpt", "value": "Yes."},
            {"from": "user", "value": "Where is it located?"},
            {"from": "assistant", "value": "It is located at [0.1, 0.5, 0.4, 0.7]."}]
    (r,) = load_records(_write_json(folder / "c.json", [{"id": 7, "image": "img/a.png", "conversations": conv}]))
    assert r.id == "7"  # integer ids are kept as strings
    assert [t.role for t in r.conversations] == ["user", "assistant", "user", "assistant"]
    assert r.prompt == "Is there a pleural effusion?" and r.answer == "It is located at [0.1, 0.5, 0.4, 0.7]."


def test_text_only_record_has_no_image(folder: Path):
    (r,) = load_records(_write_json(folder / "t.json", [_rec("t", image=None)]))
    assert r.image is None and not r.has_image and r.prompt.startswith("Write")


def test_image_root_overrides_the_file_folder(tmp_path: Path):
    _png(tmp_path / "images" / "x" / "a.png")
    (tmp_path / "json").mkdir()
    path = _write_json(tmp_path / "json" / "d.json", [_rec("r", "x/a.png")])
    (r,) = load_records(path, image_root=tmp_path / "images")
    assert r.image == (tmp_path / "images" / "x" / "a.png").resolve()
    with pytest.raises(RecordError, match="file not found"):  # default root: the JSON folder
        load_records(path)


def test_check_images_false_only_resolves_paths(tmp_path: Path):
    (r,) = load_records(_write_json(tmp_path / "d.json", [_rec("r", "missing.png")]), check_images=False)
    assert r.image == (tmp_path / "missing.png").resolve()


def test_is_thinking_from_prompt_suffix_or_think_block():
    base = {"id": "x", "image": None, "task": None}
    plain = Record(conversations=[Turn("user", "Write a report."), Turn("assistant", "Clear.")], **base)
    by_prompt = Record(conversations=[Turn("user", "Write a report. /think"), Turn("assistant", "Clear.")], **base)
    by_answer = Record(conversations=[Turn("user", "Write a report."),
                                      Turn("assistant", "<think>\nok\n</think>\n\nClear.")], **base)
    assert (plain.is_thinking, by_prompt.is_thinking, by_answer.is_thinking) == (False, True, True)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_save_then_load_round_trips_through_to_dict(folder: Path, suffix: str):
    conv = [{"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2 [0.1, 0.2, 0.3, 0.4]"}]
    recs = [{"id": "m", "image": "img/a.png", "conversations": conv, "task": "conversation",
             "boxes": [[0.1, 0.2, 0.3, 0.4]], "note": 1}, _rec("n", image=None, labels=["No Finding"])]
    first = load_records(save_records(recs, folder / f"a{suffix}"))
    dicts = [r.to_dict(image_root=folder) for r in first]
    assert dicts == recs  # relative image path, tag restored, keys kept
    second = load_records(save_records(dicts, folder / f"b{suffix}"))
    assert [(r.id, r.image, r.conversations, r.boxes, r.extra) for r in second] == \
        [(r.id, r.image, r.conversations, r.boxes, r.extra) for r in first]


def test_save_records_refuses_unknown_suffix(tmp_path: Path):
    with pytest.raises(ValueError, match=r"unknown suffix '\.txt'"):
        save_records([], tmp_path / "a.txt")


def test_task_constants():
    assert set(GROUNDING_TASKS) <= set(TASKS)
    assert GROUNDING_TASKS == ("abnormality_grounding", "abnormality_detection", "region_grounding",
                               "phrase_grounding")


# ------------------------------------------------------------------------------------------------- errors

TURN_H = {"from": "human", "value": "<image>\nQ"}
TURN_G = {"from": "gpt", "value": "A"}

# (name, second record (index 1) as JSON value, substring of the message, id named in the message)
BAD_RECORDS = [
    ("not_object", ["a list"], "must be a JSON object, got list", None),
    ("missing_id", {"image": "img/a.png", "conversations": [TURN_H, TURN_G]}, "missing 'id'", None),
    ("bad_id", {"id": 1.5, "conversations": [TURN_H, TURN_G]}, "'id' must be a non-empty string", None),
    ("missing_conversations", {"id": "x", "image": "img/a.png"}, "missing 'conversations'", "x"),
    ("empty_conversations", {"id": "x", "image": "img/a.png", "conversations": []}, "non-empty list", "x"),
    ("turn_not_object", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, "A"]},
     "turn 1 must be an object with string 'from' and 'value'", "x"),
    ("turn_missing_value", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, {"from": "gpt"}]},
     "turn 1 must be an object", "x"),
    ("unknown_role", {"id": "x", "image": "img/a.png",
                      "conversations": [{"from": "system", "value": "<image>\nS"}, TURN_G]},
     "turn 0 has role 'system'", "x"),
    ("gpt_first", {"id": "x", "image": "img/a.png", "conversations": [TURN_G, TURN_H]},
     "turn 0 is from 'gpt' but turns must alternate", "x"),
    ("two_humans", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, {"from": "human", "value": "B"}]},
     "turn 1 is from 'human'", "x"),
    ("ends_with_human", {"id": "x", "image": "img/a.png",
                         "conversations": [TURN_H, TURN_G, {"from": "human", "value": "B"}]},
     "must end with a gpt", "x"),
    ("empty_answer", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, {"from": "gpt", "value": " "}]},
     "turn 1 (assistant) is empty", "x"),
    ("image_without_tag", {"id": "x", "image": "img/a.png",
                           "conversations": [{"from": "human", "value": "Q"}, TURN_G]},
     "exactly one '<image>', at the start of the first human turn (found 0, not at the start)", "x"),
    ("tag_not_at_start", {"id": "x", "image": "img/a.png",
                          "conversations": [{"from": "human", "value": "Q <image>"}, TURN_G]},
     "(found 1, not at the start)", "x"),
    ("two_tags", {"id": "x", "image": "img/a.png",
                  "conversations": [TURN_H, TURN_G, {"from": "human", "value": "<image>\nB"}, TURN_G]},
     "(found 2)", "x"),
    ("tag_without_image", {"id": "x", "conversations": [TURN_H, TURN_G]},
     "without 'image' must not contain '<image>' (found 1)", "x"),
    ("image_list", {"id": "x", "image": ["img/a.png"], "conversations": [TURN_H, TURN_G]},
     "'image' must be one non-empty path string", "x"),
    ("unknown_task", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, TURN_G], "task": "vqa"},
     "unknown task 'vqa'", "x"),
    ("boxes_not_list", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, TURN_G], "boxes": "[0,0,1,1]"},
     "'boxes' must be a list", "x"),
    ("box_three_numbers", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, TURN_G],
                           "boxes": [[0.1, 0.2, 0.3]]}, "box 0 must be 4 finite numbers", "x"),
    ("box_nan", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, TURN_G],
                 "boxes": [[0.1, 0.2, 0.3, 0.4], [0.1, float("nan"), 0.3, 0.4]]}, "box 1 must be 4 finite numbers", "x"),
    ("box_string", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, TURN_G],
                    "boxes": [[0.1, "0.2", 0.3, 0.4]]}, "box 0 must be 4 finite numbers", "x"),
    ("box_bool", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, TURN_G],
                  "boxes": [[0, True, 0.3, 0.4]]}, "box 0 must be 4 finite numbers", "x"),
    ("box_pixels", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, TURN_G],
                    "boxes": [[10, 20, 300, 400]]}, "is not normalised to [0, 1]", "x"),
    ("box_swapped", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, TURN_G],
                     "boxes": [[0.5, 0.2, 0.3, 0.4]]}, "has x1 > x2 or y1 > y2", "x"),
    ("labels_not_strings", {"id": "x", "image": "img/a.png", "conversations": [TURN_H, TURN_G], "labels": [1]},
     "'labels' must be a list of strings", "x"),
    ("duplicate_id", _rec("r0"), "duplicate id, first used by record 0", "r0"),
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("name,bad,message,rid", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_bad_record_error_names_file_index_and_id(folder: Path, suffix, name, bad, message, rid):
    path = folder / f"bad{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps([_rec("r0"), bad]), encoding="utf-8")
    else:
        path.write_text(json.dumps(_rec("r0")) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(RecordError) as err:
        load_records(path)
    text = str(err.value)
    assert text.startswith(f"{path}: record 1")
    assert message in text
    assert (err.value.file, err.value.index, err.value.record_id) == (str(path), 1, rid)
    if rid is not None:
        assert f"(id {rid!r})" in text
    if suffix == ".jsonl" and name != "duplicate_id":
        assert "(line 2)" in text


def test_truncated_json_names_position(tmp_path: Path):
    path = tmp_path / "t.json"
    path.write_text('[{"id": "a", "conversations": [\n{"from": "human"', encoding="utf-8")
    # line 1 has 31 characters + "\n" (chars 0-31); line 2 '{"from": "human"' has 16, so the text ends at
    # char 32 + 16 = 48, which is line 2, column 17
    with pytest.raises(RecordError, match=r"t\.json: invalid or truncated JSON at line 2, column 17 \(char 48\)"):
        load_records(path)


def test_bad_jsonl_line_names_line_and_record_index(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(_rec("a", None)) + "\n\n{oops\n", encoding="utf-8")
    with pytest.raises(RecordError) as err:
        load_records(path)
    assert str(err.value).startswith(f"{path}: record 1: invalid JSON on line 3, column 2")


def test_top_level_object_is_refused(tmp_path: Path):
    with pytest.raises(RecordError, match=r"top level must be a JSON list of records, got dict"):
        load_records(_write_json(tmp_path / "o.json", {"data": []}))


def test_missing_unreadable_and_unknown_files(tmp_path: Path):
    with pytest.raises(RecordError, match=r"nope\.json: file not found"):
        load_records(tmp_path / "nope.json")
    (tmp_path / "latin.json").write_bytes(b'[{"id": "\xe9"}]')
    with pytest.raises(RecordError, match=r"latin\.json: not valid UTF-8 at byte 9 \(line 1\)"):
        load_records(tmp_path / "latin.json")
    (tmp_path / "a.csv").write_text("id\n")
    with pytest.raises(RecordError, match=r"unknown suffix '\.csv'"):
        load_records(tmp_path / "a.csv")


# ------------------------------------------------------------------------------------------------- images


def _image_error(folder: Path, image: str) -> RecordError:
    path = _write_json(folder / "i.json", [_rec("ok"), _rec("bad-img", image)])
    with pytest.raises(RecordError) as err:
        load_records(path)
    assert err.value.index == 1 and err.value.record_id == "bad-img"
    assert err.value.image == (folder / image).resolve()
    assert str(err.value).startswith(f"{path}: record 1 (id 'bad-img'), image '{(folder / image).resolve()}': ")
    return err.value


def test_missing_image_names_its_path(folder: Path):
    assert str(_image_error(folder, "img/none.png")).endswith(": file not found")


def test_corrupt_and_truncated_images_name_their_path(folder: Path):
    (folder / "img" / "noise.png").write_bytes(b"\x89PNG not really an image")
    assert "cannot be decoded (UnidentifiedImageError" in str(_image_error(folder, "img/noise.png"))
    data = (folder / "img" / "a.png").read_bytes()
    (folder / "img" / "half.png").write_bytes(data[: len(data) // 2])
    assert "cannot be decoded (OSError" in str(_image_error(folder, "img/half.png"))


def test_tiny_and_extreme_aspect_images_are_refused(folder: Path):
    _png(folder / "img" / "tiny.png", MIN_IMAGE_SIDE - 1, 100)
    assert f"size 27x100 is below the minimum side of {MIN_IMAGE_SIDE} px" in str(_image_error(folder, "img/tiny.png"))
    _png(folder / "img" / "strip.png", 28, 28 * 201)  # 5628 / 28 = 201 > 200
    msg = str(_image_error(folder, "img/strip.png"))
    assert "aspect ratio 201.0 of size 28x5628 exceeds 200" in msg
    _png(folder / "img" / "edge.png", 28, 28 * 200)  # exactly 200: the Qwen processor accepts it
    assert check_image(folder / "img" / "edge.png") == (28, 5600)
    assert MAX_ASPECT_RATIO == 200


def test_check_image_returns_size_and_raises_image_error(folder: Path):
    assert check_image(folder / "img" / "b.png") == (30, 40)
    with pytest.raises(ImageError) as err:
        check_image(folder / "img")
    assert err.value.path == str(folder / "img") and "not a regular file" in str(err.value)


def test_load_image_returns_rgb_and_catches_truncated_jpeg(tmp_path: Path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "a.jpg", quality=90)
    im = load_image(tmp_path / "a.jpg")
    assert im.mode == "RGB" and im.size == (64, 64)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(data[: len(data) // 2])
    check_image(tmp_path / "b.jpg")  # verify() does not decode JPEG data: only load_image finds the cut
    with pytest.raises(ImageError, match=r"b\.jpg': cannot be decoded \(OSError: image file is truncated"):
        load_image(tmp_path / "b.jpg")


def test_load_image_scales_16_bit_by_min_and_max(tmp_path: Path):
    # values 0, 100, 2048, 4095 (12-bit data in a 16-bit PNG): (v - 0) / 4095 * 255 →
    # 0 → 0; 100 → 6.23 → 6; 2048 → 127.53 → 128; 4095 → 255
    block = np.array([[0, 100], [2048, 4095]], dtype=np.uint16).repeat(16, 0).repeat(16, 1)  # (32, 32)
    Image.fromarray(block).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode == "I;16"
    out = np.asarray(load_image(tmp_path / "d.png"))  # (32, 32, 3)
    assert out.shape == (32, 32, 3)
    assert [out[0, 0, 0], out[0, 16, 1], out[16, 0, 2], out[16, 16, 0]] == [0, 6, 128, 255]
