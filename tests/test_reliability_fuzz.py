"""Fuzzing the record reader: mutated RadVLM record files are accepted or refused with a clear ``RecordError`` /
``ImageError``, never another exception; what is accepted can be written back and collated.

Seeded (a failure names its case number, reproducible with ``fuzz_case(seed)``). Mutations of valid records
(report, grounding with boxes, classification, multi-turn conversation, thinking, text-only): dropped keys, type
swaps, strange values (huge and non-finite numbers, empty and long strings, nested containers), deep nesting,
injected snippets (special and vision tokens, image tags, control characters, line separators, unpaired
surrogates, boxes), duplicated records and swapped roles; and mutations of the file's bytes: truncation, flipped
and inserted bytes, invalid UTF-8, byte-order marks, deep brackets, endless digits, other line ends. Files are
JSON or JSONL, read with and without ``image_root``, image checks, ``bad_records="skip"`` and normalisation.
Image files get their own mutations (truncated, flipped, float images with NaN/inf).
"""

from __future__ import annotations

import copy
import io
import json
import random
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.record_checks import SPECIAL_TOKEN
from datamodules.records import ImageError, LoadReport, Record, RecordError, check_image, load_image, load_records

N_CASES = 1000
PROMPT = "<image>\nWrite a radiology report for this Chest X-ray."
BOX = "[0.1, 0.2, 0.3, 0.4]"


def base_records() -> list[dict]:
    def turns(*texts):
        return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]

    return [
        {"id": "mimic-train_0", "image": "img/0.png", "conversations": turns(PROMPT, "The heart is normal.")},
        {"id": "vindr-cxr-mono-train1_1", "image": "img/1.png", "task": "abnormality_grounding",
         "boxes": [[0.1, 0.2, 0.3, 0.4]], "labels": ["Mass"],
         "conversations": turns("<image>\nWhere is the mass?", f"The mass is at {BOX} on the image.")},
        {"id": "chexpert-train_2", "image": "img/2.png", "labels": ["Cardiomegaly"], "pathologies": ["Cardiomegaly"],
         "conversations": turns("<image>\nAbnormalities?", "Cardiomegaly.")},
        {"id": "conv-grounded-train_3", "image": "img/3.png", "task": "grounded_conversation", "boxes": [[0, 0, 1, 1]],
         "conversations": turns("<image>\nIs there an effusion?", "Yes.", "Where?", "At [0.0, 0.0, 1.0, 1.0].")},
        {"id": "mscxr-train_4", "image": "img/0.png", "task": "phrase_grounding", "boxes": [[0.5, 0.5, 0.6, 0.6]],
         "conversations": turns("<image>\nLocate: small opacity /think",
                                "<think>\nlower lobe\n</think>\n\nAt [0.5, 0.5, 0.6, 0.6].")},
        {"id": 5, "conversations": turns("What is a pneumothorax?", "Air in the pleural space.")},
    ]


SNIPPETS = ["<|image_pad|>", "<|vision_start|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<image>\n",
            "</think>", "<think>", "\x00", "\x1b[31m", "\x7f", "\x9b", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\r",
            "\ud800", "\udfff", "\ufeff", "\U0001F600", BOX, "[1e999, 0, 1, 1]", "|>", "<|", "\\", '"', "é", "../"]
VALUES = [None, True, False, 0, -1, 7, 2**70, 10**400, 1.5, -0.0, 1e308, float("nan"), float("inf"), "", " ", "x",
          "x" * 3000, [], {}, [[]], [[[[]]]], {"a": {"b": {}}}, [0.1, 0.2, 0.3, 0.4], [[0.1, 0.2, 0.3, 0.4]],
          [[2, 0, 1, 1]], ["Mass"], [1, 2], "human", "gpt", "system", "abnormality_grounding", "no_such_task",
          "img/0.png", "img/missing.png", "/etc/hostname", "../outside.png", "img/" + "y" * 300 + ".png"]


def nodes(value, path=()):
    """Every (container, key) position inside ``value``."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield value, k
            yield from nodes(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield value, i
            yield from nodes(v, path + (i,))


def mutate_records(rng: random.Random, records: list[dict]) -> str:
    kind = rng.choice(["drop_key", "set_value", "type_swap", "nest", "inject", "inject", "duplicate", "swap_roles"])
    target = rng.choice(records)
    positions = list(nodes(target))
    if kind == "drop_key":
        dicts = [c for c, _ in positions if isinstance(c, dict)] + [target]
        d = rng.choice(dicts)
        if d:
            del d[rng.choice(list(d))]
    elif kind in ("set_value", "type_swap", "nest") and positions:
        container, key = rng.choice(positions)
        old = container[key]
        if kind == "set_value":
            container[key] = copy.deepcopy(rng.choice(VALUES))
        elif kind == "type_swap":
            container[key] = {str: lambda v: len(v), int: str, float: str, list: lambda v: dict(enumerate(v)),
                              dict: lambda v: list(v.values()), bool: int}.get(type(old), lambda v: [v])(old)
            if isinstance(container[key], dict):
                container[key] = {str(k): v for k, v in container[key].items()}
        else:
            for _ in range(rng.choice([2, 20, 40, 200])):
                old = [old] if rng.random() < 0.5 else {"k": old}
            container[key] = old
    elif kind == "inject":
        strings = [(c, k) for c, k in positions if isinstance(c[k], str)]
        if strings:
            container, key = rng.choice(strings)
            text, at = container[key], rng.randint(0, len(container[key]))
            container[key] = text[:at] + rng.choice(SNIPPETS) + text[at:]
    elif kind == "duplicate":
        records.append(copy.deepcopy(target))
    else:
        conv = target.get("conversations")
        if isinstance(conv, list) and len(conv) > 1:
            i = rng.randrange(len(conv) - 1)
            conv[i], conv[i + 1] = conv[i + 1], conv[i]
    return kind


def mutate_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    kind = rng.choice(["truncate", "flip", "insert", "bom", "brackets", "digits", "line_ends", "none"])
    at = rng.randint(0, len(data))
    if kind == "truncate":
        data = data[:at]
    elif kind == "flip":
        raw = bytearray(data)
        for _ in range(rng.randint(1, 5)):
            if raw:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        data = bytes(raw)
    elif kind == "insert":
        data = data[:at] + rng.choice([b"\xff", b"\xc3", b"\x00", b"\r", b"\n", b'"', b"}", b",", b"\xe2\x80\xa8",
                                       bytes(rng.randrange(256) for _ in range(8))]) + data[at:]
    elif kind == "bom":
        data = rng.choice([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\xff\xfe\x00\x00"]) + data
    elif kind == "brackets":
        n = rng.choice([50, 5000, 200_000])
        data = data[:at] + b"[" * n + b"]" * n + data[at:]
    elif kind == "digits":
        data = data[:at] + b"9" * rng.choice([400, 5000]) + data[at:]
    elif kind == "line_ends":
        data = data.replace(b"\n", rng.choice([b"\r\n", b"\r", b"\n\n", "\u2028".encode()]))
    return data, kind


def fuzz_case(seed: int, folder: Path) -> tuple[dict, object]:
    """One mutated file read once: (what was done, the records or the exception)."""
    rng = random.Random(seed)
    records = [copy.deepcopy(r) for r in rng.sample(base_records(), rng.randint(1, 4))]
    done = [mutate_records(rng, records) for _ in range(rng.choice([0, 1, 1, 2, 3]))]
    suffix = rng.choice([".json", ".jsonl"])
    ascii_only = rng.random() < 0.5
    if suffix == ".json":
        data = json.dumps(records, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    else:
        data = "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in records).encode("utf-8", "surrogatepass")
    if rng.random() < 0.6:
        data, byte_kind = mutate_bytes(rng, data)
        done.append(byte_kind)
    path = folder / f"case{seed}{suffix}"
    path.write_bytes(data)
    kwargs = dict(image_root=rng.choice([None, folder]), check_images=rng.random() < 0.5,
                  bad_records=rng.choice(["error", "skip"]), normalize_conversations=rng.random() < 0.3)
    info = {"seed": seed, "mutations": done, "suffix": suffix, **{k: str(v) for k, v in kwargs.items()}}
    try:
        return info, load_records(path, report=LoadReport(), **kwargs)
    except Exception as e:  # judged by the caller
        return info, e


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    (folder / "img").mkdir()
    for i in range(4):
        Image.fromarray((rng.random((48, 64)) * 255).astype(np.uint8)).save(folder / "img" / f"{i}.png")
    return folder


def check_accepted(records: list[Record]) -> None:
    """What a later stage relies on: plain types, writable as UTF-8 JSON, no special tokens."""
    for r in records:
        assert isinstance(r.id, str) and r.id and r.conversations and r.conversations[-1].role == "assistant"
        assert all(isinstance(t.text, str) and not SPECIAL_TOKEN.search(t.text) for t in r.conversations)
        json.dumps(r.to_dict(), ensure_ascii=False).encode("utf-8")  # predictions and reports are written so
        for box in r.boxes or []:
            assert len(box) == 4 and all(0.0 <= v <= 1.0 for v in box)


def test_fuzzed_record_files_give_records_or_clear_errors(image_folder):
    failures, outcomes = [], {"accepted": 0, "RecordError": 0, "ImageError": 0}
    for seed in range(N_CASES):
        info, result = fuzz_case(seed, image_folder)
        if isinstance(result, (RecordError, ImageError)):
            outcomes[type(result).__name__] += 1
            assert str(result)  # a message; RecordError names the file
            if isinstance(result, RecordError):
                assert result.file.endswith(info["suffix"])
            continue
        if isinstance(result, Exception):
            failures.append(f"{info}: {''.join(traceback.format_exception(result))[-1500:]}")
            continue
        try:
            check_accepted(result)
            outcomes["accepted"] += 1
        except Exception as e:
            failures.append(f"{info}: accepted but {type(e).__name__}: {e}")
    assert not failures, f"{len(failures)} of {N_CASES} cases failed otherwise:\n" + "\n".join(failures[:5])
    assert outcomes["accepted"] > N_CASES // 10 and outcomes["RecordError"] > N_CASES // 4, outcomes  # both sides


def test_accepted_fuzzed_records_decode_and_collate(image_folder, tiny_ckpt):
    """Records accepted with image checks go through the data module's full decode and both collators."""
    from datamodules.collate import PromptCollator, SFTCollator
    from radvlm.processor import load_processor

    processor = load_processor(str(tiny_ckpt))
    collators = [SFTCollator(processor, max_length=None).for_evaluation(), PromptCollator(processor, max_length=None)]
    n = 0
    for seed in range(0, N_CASES, 3):
        info, result = fuzz_case(seed, image_folder)
        if not isinstance(result, list) or info["check_images"] != "True" or not result:
            continue
        for r in result:
            if r.image is not None:
                load_image(r.image)
        for collate in collators:
            try:
                collate(result)
            except Exception as e:
                pytest.fail(f"{info}: accepted records fail in {type(collate).__name__}: {type(e).__name__}: {e}")
        n += 1
    assert n >= 10


def test_fuzzed_image_files_give_images_or_image_errors(tmp_path):
    rng = random.Random(0)
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((48, 64)) * 255).astype(np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    failures = []
    for seed in range(120):
        path = tmp_path / f"{seed}.png"
        kind = rng.choice(["truncate", "flip", "float_nan", "float_inf", "empty", "text"])
        if kind == "truncate":
            path.write_bytes(png[: rng.randint(0, len(png))])
        elif kind == "flip":
            raw = bytearray(png)
            for _ in range(rng.randint(1, 6)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            path.write_bytes(bytes(raw))
        elif kind in ("float_nan", "float_inf"):
            path = path.with_suffix(".tif")
            pixels = np.random.default_rng(seed).random((40, 40)).astype(np.float32)
            pixels[rng.randrange(40), rng.randrange(40)] = np.nan if kind == "float_nan" else -np.inf
            Image.fromarray(pixels, mode="F").save(path)
        elif kind == "empty":
            path.write_bytes(b"")
        else:
            path.write_text("not an image")
        for fn in (check_image, load_image):
            try:
                fn(path)
            except ImageError:
                pass
            except Exception as e:
                failures.append(f"{seed} {kind} {fn.__name__}: {type(e).__name__}: {e}")
        if kind.startswith("float"):
            with pytest.raises(ImageError, match="NaN or infinite"):
                load_image(path)
    assert not failures, failures[:5]
