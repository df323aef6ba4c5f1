"""Total input validation (``datamodules/record_checks.py``): every malformed input is a ``RecordError`` naming file,
index and id (or an ``ImageError`` naming the path) when the file is read, never a failure mid-training. Encodings
and line separators, nesting, numbers, control characters and special tokens, image paths against ``image_root``,
boxes against the answer text, non-finite pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.datamodule import RadVLMDataModule
from datamodules.records import ImageError, LoadReport, RecordError, check_image, load_image, load_records
from tests.helpers import write_records

PROMPT = "<image>\nWrite a radiology report for this Chest X-ray."


def rec(i: int = 0, answer: str = "The lungs are clear.", prompt: str = PROMPT, **over) -> dict:
    out = {"id": f"r{i}", "image": f"img/{i}.png",
           "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}
    out.update(over)
    return out


def write(folder: Path, records: list[dict], suffix: str = ".json") -> Path:
    """Records as written by a UTF-8 tool (no ASCII escapes), with a PNG for every ordinary image path."""
    write_records(folder, [r for r in records if r.get("image") == f"img/{r['id'][1:]}.png"])  # the images
    path = folder / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def refused(path: Path, kind: str, match: str, index: int = 1, rid: str | None = "r1", **kw) -> RecordError:
    """The record is refused with ``kind`` (error mode: naming file, index and id; skip mode: reported)."""
    with pytest.raises(RecordError, match=match) as err:
        load_records(path, **kw)
    assert err.value.file == str(path) and err.value.index == index and err.value.record_id == rid
    report = LoadReport()
    kept = load_records(path, bad_records="skip", report=report, **kw)
    assert [s.reason for s in report.skipped] == [kind] and len(kept) == report.records - 1
    return err.value


# ---------------------------------------------------------------------------------- encodings, lines
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_text_with_unicode_line_separators_loads_intact(tmp_path, suffix):
    answer = "Heart\u2028normal.\u2029Lungs\x85clear.\x0bNo\x0ceffusion.\r\nEnd."
    path = write(tmp_path, [rec(0, answer), rec(1)], suffix)
    raw = path.read_text(encoding="utf-8")
    assert "\u2028" in raw and "\x85" in raw and "\\u000b" in raw  # raw separators in the file (escapes for C0)
    out = load_records(path)
    assert [r.answer for r in out] == [answer, "The lungs are clear."]


def test_jsonl_with_crlf_lines_and_byte_order_marks_loads(tmp_path):
    write_records(tmp_path, [rec(0), rec(1), rec(2)])
    lines = [json.dumps(rec(i)).encode() for i in range(3)]
    path = tmp_path / "data.jsonl"
    # a UTF-8 BOM at the start and one inside (files concatenated), Windows line ends, a blank line
    path.write_bytes(b"\xef\xbb\xbf" + lines[0] + b"\r\n\r\n\xef\xbb\xbf" + lines[1] + b"\r\n" + lines[2])
    assert [r.id for r in load_records(path)] == ["r0", "r1", "r2"]
    json_path = tmp_path / "data.json"
    json_path.write_bytes(b"\xef\xbb\xbf" + json.dumps([rec(0)]).encode())
    assert [r.id for r in load_records(json_path)] == ["r0"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_utf16_files_are_refused_by_name(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_bytes(json.dumps([rec(0)] if suffix == ".json" else rec(0)).encode("utf-16"))
    with pytest.raises(RecordError, match=r"data\.jsonl?: is UTF-16 encoded \(byte-order mark"):
        load_records(path)


def test_invalid_utf8_is_a_bad_record_in_jsonl_and_a_bad_file_in_json(tmp_path):
    write_records(tmp_path, [rec(0), rec(1)])
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(rec(0)).encode() + b"\n" + json.dumps(rec(1)).encode().replace(b"lungs", b"l\xffngs"))
    refused(path, "bad_encoding", r"record 1: line 2 is not valid UTF-8 \(byte \d+ of the line: b'\\xffngs", rid=None)
    json_path = tmp_path / "data.json"
    json_path.write_bytes(json.dumps([rec(0)]).encode().replace(b"lungs", b"l\xc3ngs"))
    with pytest.raises(RecordError, match=r"data\.json: not valid UTF-8 at byte \d+ \(line 1\)"):
        load_records(json_path)


# -------------------------------------------------------------------------------- structure and numbers
def test_deeply_nested_records_are_refused(tmp_path):
    write_records(tmp_path, [rec(0), rec(1), rec(2)])
    deep_value = "[" * 40 + "1" + "]" * 40  # parses, but nests deeper than MAX_NESTING
    parser_breaker = "[" * 100_000 + "]" * 100_000  # deeper than the JSON parser's recursion limit
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(rec(0)) + "\n" + json.dumps(rec(1))[:-1] + f', "meta": {deep_value}}}\n' +
                    json.dumps(rec(2))[:-1] + f', "meta": {parser_breaker}}}\n')
    report = LoadReport()
    assert [r.id for r in load_records(path, bad_records="skip", report=report)] == ["r0"]
    assert [(s.index, s.id, s.reason) for s in report.skipped] == [(1, "r1", "too_deep"), (2, None, "too_deep")]
    json_path = tmp_path / "deep.json"
    json_path.write_text("[" + parser_breaker + "]")
    with pytest.raises(RecordError, match=r"deep\.json: JSON nested too deeply to parse"):
        load_records(json_path)


@pytest.mark.parametrize("box, kind, match", [
    ("[" + "9" * 400 + ", 0, 1, 1]", "bad_boxes", "box 0 must be 4 finite numbers"),  # an int beyond float range
    ("[1e999, 0, 1, 1]", "bad_boxes", "box 0 must be 4 finite numbers"),  # parsed as inf
    ("[NaN, 0, 1, 1]", "bad_boxes", "box 0 must be 4 finite numbers"),
    ("[" + "9" * 5000 + ", 0, 1, 1]", "invalid_json", "Exceeds the limit"),  # beyond Python's int parsing limit
], ids=["huge_int", "overflow_float", "nan", "too_many_digits"])
def test_huge_and_non_finite_numbers_are_refused(tmp_path, box, kind, match):
    good = rec(0, "It is at [0.1, 0.2, 0.3, 0.4].", task="abnormality_grounding", boxes=[[0.1, 0.2, 0.3, 0.4]])
    path = write(tmp_path, [good, rec(1, "At [0.1, 0.2, 0.3, 0.4].", task="abnormality_grounding", boxes=[[0, 0, 1, 1]])],
                 ".jsonl")
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1].replace("[[0, 0, 1, 1]]", f"[{box}]") + "\n")
    refused(path, kind, match, rid="r1" if kind != "invalid_json" else None)


@pytest.mark.parametrize("where", ["answer", "extra"])
def test_unpaired_surrogates_are_refused(tmp_path, where):
    bad = rec(1, "Heart \ud800 normal.") if where == "answer" else rec(1, note="x\udfff")
    path = tmp_path / "data.jsonl"  # json.dumps escapes them (\\ud800): the only way they fit in a UTF-8 file
    write_records(tmp_path, [rec(0), rec(1)])
    path.write_text(json.dumps(rec(0)) + "\n" + json.dumps(bad) + "\n")
    refused(path, "bad_text", r"record 1 \(id 'r1'\): a string holds the unpaired surrogate U\+D[8F]")


# ---------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("text", ["\x1b[31mred\x1b[0m", "null\x00byte", "bell\x07", "del\x7f", "c1\x9b"])
def test_control_characters_in_text_are_refused(tmp_path, text):
    path = write(tmp_path, [rec(0), rec(1, f"The heart is normal. {text}")])
    refused(path, "control_character", r"record 1 \(id 'r1'\): turn 1 \(gpt\) holds the control character U\+00")


def test_control_characters_in_ids_labels_and_image_paths_are_refused(tmp_path):
    path = write(tmp_path, [rec(0), rec(1, labels=["Mass\x00"])])
    refused(path, "control_character", "a label holds the control character U\\+0000")
    path = write(tmp_path, [rec(0), {**rec(1), "id": "r1\x1b"}])
    refused(path, "control_character", "'id' holds the control character U\\+001B", rid="r1\x1b")
    path = write(tmp_path, [rec(0), {**rec(1), "image": "img/1\x00.png"}])
    refused(path, "control_character", "'image' holds the control character U\\+0000")


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>", "<|im_end|>",
                                   "<|endoftext|>", "<|video_pad|>", "<|box_start|>"])
@pytest.mark.parametrize("turn", ["prompt", "answer"])
def test_the_models_special_tokens_in_text_are_refused_at_load(tmp_path, token, turn):
    bad = rec(1, f"Normal heart. {token}") if turn == "answer" else rec(1, prompt=f"{PROMPT} {token}")
    path = write(tmp_path, [rec(0), bad])
    n = 1 if turn == "answer" else 0
    refused(path, "special_token", rf"turn {n} \((gpt|human)\) holds the model's special token '{token.replace('|', '[|]')}'")


def test_ordinary_angle_brackets_and_think_tags_are_text(tmp_path):
    answer = "<think>\nlook at the heart\n</think>\n\nSize <5 mm, ratio |a|>1, <image-like> and <|Not_A_Token|>."
    assert [r.answer for r in load_records(write(tmp_path, [rec(0, answer)]))] == [answer]


# ----------------------------------------------------------------------------------------- image paths
def test_image_paths_must_stay_inside_a_given_image_root(tmp_path):
    root = tmp_path / "images"
    write_records(root, [rec(0)])
    write_records(tmp_path / "elsewhere", [rec(1)])
    outside = str(tmp_path / "elsewhere" / "img" / "1.png")
    cases = {"relative_escape": "../elsewhere/img/1.png", "absolute_outside": outside}
    for image in cases.values():
        path = tmp_path / "data.json"
        path.write_text(json.dumps([rec(0), {**rec(1), "image": image}]))
        err = refused(path, "image_outside_root", r"record 1 \(id 'r1'\): image path .* lies outside image_root",
                      image_root=root)
        assert "allow_outside_image_root" in str(err)
        ok = load_records(path, image_root=root, allow_outside_image_root=True)
        assert ok[1].image == Path(outside).resolve()
    inside = tmp_path / "data.json"
    inside.write_text(json.dumps([{**rec(0), "image": str(root / "img" / "0.png")}, {**rec(1), "image": "img/../img/0.png"}]))
    assert len(load_records(inside, image_root=root)) == 2  # absolute inside, and `..` that stays inside


def test_an_image_root_given_through_a_symlink_keeps_its_absolute_paths_inside(tmp_path):
    write_records(tmp_path / "storage", [rec(0)])
    (tmp_path / "link").symlink_to(tmp_path / "storage")
    path = tmp_path / "data.json"  # records name the real location, the config the link (or the other way round)
    path.write_text(json.dumps([{**rec(0), "image": str(tmp_path / "storage" / "img" / "0.png")}]))
    assert len(load_records(path, image_root=tmp_path / "link")) == 1
    path.write_text(json.dumps([{**rec(0), "image": str(tmp_path / "link" / "img" / "0.png")}]))
    assert len(load_records(path, image_root=tmp_path / "storage")) == 1


def test_without_image_root_absolute_paths_are_taken_as_they_are(tmp_path):
    write_records(tmp_path / "elsewhere", [rec(1)])
    path = tmp_path / "data" / "data.json"
    path.parent.mkdir()
    path.write_text(json.dumps([{**rec(1), "image": str(tmp_path / "elsewhere" / "img" / "1.png")}]))
    assert load_records(path)[0].image == (tmp_path / "elsewhere" / "img" / "1.png").resolve()


def test_the_data_module_passes_image_root_confinement_through(tiny_ckpt, tmp_path):
    root = tmp_path / "images"
    write_records(root, [rec(0)])
    write_records(tmp_path / "elsewhere", [rec(1)])
    path = tmp_path / "data.json"
    path.write_text(json.dumps([rec(0), {**rec(1), "image": str(tmp_path / "elsewhere" / "img" / "1.png")}]))
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(path)], image_root=str(root))
    with pytest.raises(RecordError, match="lies outside image_root"):
        data.setup("fit")
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(path)], image_root=str(root), allow_outside_image_root=True)
    data.setup("fit")
    assert len(data.splits["train"]) == 2


def test_unusable_image_paths_are_image_errors_not_os_errors(tmp_path):
    with pytest.raises(ImageError, match="cannot be accessed .*File name too long"):
        check_image(tmp_path / ("x" * 300 + ".png"))
    with pytest.raises(ImageError, match="cannot be accessed"):
        load_image(tmp_path / ("x" * 300 + ".png"))
    path = write(tmp_path, [rec(0), {**rec(1), "image": "img/" + "x" * 300 + ".png"}])
    refused(path, "image_missing", "cannot be accessed", check_images=True)
    path.write_text(json.dumps([rec(0), {**rec(1), "image": "img/" + "x" * 5000}]))
    refused(path, "bad_image_field", "'image' is a path of 5004 characters")


# ------------------------------------------------------------------------------------------ boxes vs text
GROUND = dict(task="abnormality_grounding", boxes=[[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.6, 0.7]])


@pytest.mark.parametrize("answer, ok", [
    ("Mass at [0.1, 0.2, 0.3, 0.4] and [0.5, 0.5, 0.6, 0.7].", True),
    ("Mass at [0.1, 0.2, 0.3, 0.4].", False),
    ("No finding.", False),
    ("<think>\nMaybe [0.1, 0.2, 0.3, 0.4]?\n</think>\n\nAt [0.1, 0.2, 0.3, 0.4] and [0.5, 0.5, 0.6, 0.7].", True),
    ("<think>\n[0.1, 0.2, 0.3, 0.4] and [0.5, 0.5, 0.6, 0.7]\n</think>\n\nNo finding.", False),
], ids=["agree", "one_missing", "none", "thinking_agree", "boxes_only_in_thoughts"])
def test_a_box_tasks_boxes_must_agree_with_its_answer_text(tmp_path, answer, ok):
    path = write(tmp_path, [rec(0), rec(1, answer, **GROUND)])
    if ok:
        assert load_records(path)[1].boxes == GROUND["boxes"]
    else:
        refused(path, "boxes_text_mismatch", r"record 1 \(id 'r1'\): 'boxes' holds 2 box\(es\) but the answer text [01]")


def test_boxes_of_conversations_and_untasked_records_are_not_checked(tmp_path):
    conversation = rec(1, "No.", task="conversation", boxes=[[0.1, 0.2, 0.3, 0.4]])
    untasked = rec(2, "Somewhere.", boxes=[[0.1, 0.2, 0.3, 0.4]])
    assert len(load_records(write(tmp_path, [rec(0), conversation, untasked]))) == 3


# ---------------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_images_with_non_finite_pixels_are_image_errors(tmp_path, bad):
    pixels = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    Image.fromarray(pixels, mode="F").save(tmp_path / "fine.tif")
    assert load_image(tmp_path / "fine.tif").size == (64, 64)
    pixels[3, 5] = bad
    Image.fromarray(pixels, mode="F").save(tmp_path / "bad.tif")
    with pytest.raises(ImageError, match=r"bad\.tif'?: 1 pixel\(s\) are NaN or infinite \(mode F\)") as err:
        load_image(tmp_path / "bad.tif")
    assert err.value.kind == "image_nonfinite"


def test_the_data_module_finds_non_finite_pixels_at_setup(tiny_ckpt, tmp_path):
    pixels = np.ones((64, 64), dtype=np.float32)
    pixels[0, 0] = np.nan
    (tmp_path / "img").mkdir()
    Image.fromarray(pixels, mode="F").save(tmp_path / "img" / "1.tif")
    path = write(tmp_path, [rec(0), {**rec(1), "image": "img/1.tif"}])
    data = RadVLMDataModule(str(tiny_ckpt), train_files=[str(path)])
    with pytest.raises(RecordError, match=r"record 1 \(id 'r1'\), image .*1\.tif'?: 1 pixel\(s\) are NaN or infinite"):
        data.setup("fit")
