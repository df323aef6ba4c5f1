"""Checks that make reading record files total (``datamodules.records.load_records``): whatever a file holds, a
record is accepted or refused with a reason (``Invalid``, re-raised as ``RecordError`` naming file, index and id,
or skipped), never let through to fail later, mid-training.

The checks, each described where it is made: encoding and line separators (UTF-8 only,
``datamodules.records._read_objects``), structure (``check_tree``), control characters and special tokens in
text (``check_text``), numbers (``finite``), image paths against ``image_root`` (``image_path``), boxes against
the answer text (``check_boxes_in_text``).
"""

from __future__ import annotations

import math
import os
import re
import reprlib
from pathlib import Path
from typing import Any

from metrics.boxes import parse_boxes
from radvlm.chat import answer_of
from radvlm.tasks import is_box_task, task_think_split

#: deepest nesting of lists and objects in a record (RadVLM's own records reach 3)
MAX_NESTING = 32
MAX_PATH_CHARS = 4096  # Linux PATH_MAX
UTF8_BOM = b"\xef\xbb\xbf"
FOREIGN_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
                 (b"\xfe\xff", "UTF-16"))
#: control characters refused in text: all but tab, newline, vertical tab, form feed, carriage return and NEL
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: the chat template's and vision special tokens of Qwen-VL (<|im_start|>, <|image_pad|>, <|vision_start|> …)
SPECIAL_TOKEN = re.compile(r"<\|[a-z0-9_]+\|>")
_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxlevel = 120, 120, 3


def show(value: Any) -> str:
    """A short, bounded repr for messages (deep or huge values cannot blow it up)."""
    return _repr.repr(value)


class Invalid(ValueError):
    """A problem inside one record; `datamodules.records.load_records` re-raises it as RecordError with file,
    index and id. `kind` is the reason of the bad-records report (leading_assistant_turn, empty_answer, missing_id, ...)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_tree(obj: Any) -> None:
    """Refuse nesting deeper than `MAX_NESTING` and unpaired surrogates in any string (keys included).

    Nesting deeper than ``MAX_NESTING`` levels (or too deep for the JSON parser), integers beyond Python's
    4300-digit limit and unpaired UTF-16 surrogates (``"\\ud800"``, which no tokenizer or UTF-8 writer accepts)
    anywhere in a record make it a bad record (``too_deep``, ``invalid_json``, ``bad_text``); the parser's own
    limits are met in ``datamodules.records._read_objects``.
    """
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_NESTING:
                raise Invalid(f"nested deeper than {MAX_NESTING} levels of lists and objects", "too_deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    stack.append((key, depth))
                stack.append((item, depth + 1))
        elif isinstance(value, str) and _SURROGATE.search(value):
            c = _SURROGATE.search(value).group()
            raise Invalid(f"a string holds the unpaired surrogate U+{ord(c):04X} (invalid Unicode: no tokenizer or "
                          f"UTF-8 writer accepts it): {show(value)}", "bad_text")


def check_text(what: str, text: str, tokens: bool = False) -> None:
    """Refuse control characters (and with `tokens` the model's special tokens) in `text`.

    Checked: ``id``, ``image``, ``labels`` and every turn. No control characters but tab, newline, carriage
    return, vertical tab, form feed and NEL (``control_character``); turns must not hold the model's special
    tokens (any ``<|name|>``: ``<|image_pad|>``, ``<|vision_start|>``, ``<|im_start|>`` …, ``special_token``),
    which would break the chat template or the image-token count (the collator checks ``<|image_pad|>`` again).
    """
    bad = _CONTROL.search(text)
    if bad:
        raise Invalid(f"{what} holds the control character U+{ord(bad.group()):04X} at character {bad.start()} (only "
                      "tab, newline, carriage return, vertical tab, form feed and NEL are allowed)", "control_character")
    token = SPECIAL_TOKEN.search(text) if tokens else None
    if token:
        raise Invalid(f"{what} holds the model's special token {token.group()!r} at character {token.start()}: "
                      "text must not carry chat-template or vision tokens (they break the template or the "
                      "image-token count)", "special_token")


def finite(value: Any) -> bool:
    """A JSON number (not a bool) that is finite as a float.

    Box coordinates must be finite numbers (an integer beyond float range is not), in [0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        return False


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([folder, path]) == folder


def image_path(image: str, root: Path, confine: bool) -> Path:
    """The resolved path of a record's `image`.

    With ``image_root`` given (``confine``), an image path (absolute, or relative with ``..``) must stay inside
    it: inside as written (after normalising ``..``; symlinks inside the root are the data owner's and are
    followed) or once symlinks are resolved on both sides (a root given through a symlink);
    ``allow_outside_image_root=True`` lifts this (``image_outside_root``). Without ``image_root`` paths are
    relative to the file's folder and absolute ones are taken as they are (RadVLM's own files use absolute
    paths). Paths with control characters, or longer than 4096 characters, are refused.
    """
    check_text("'image'", image)
    if len(image) > MAX_PATH_CHARS:
        raise Invalid(f"'image' is a path of {len(image)} characters (at most {MAX_PATH_CHARS})", "bad_image_field")
    base = os.path.abspath(root)
    if confine:
        lexical = os.path.normpath(os.path.join(base, image))
        real_base = os.path.realpath(base)
        if not (_inside(lexical, base) or _inside(os.path.realpath(lexical), real_base)):
            raise Invalid(f"image path {image!r} lies outside image_root {base!r} (resolves to {lexical!r}); set "
                          "allow_outside_image_root to allow it", "image_outside_root")
    try:
        return (root / image).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loops, embedded NUL
        raise Invalid(f"image path {image!r:.200} cannot be resolved ({type(e).__name__}: {e})",
                      "bad_image_field") from None


def check_boxes_in_text(text: str, task: str | None, boxes: list[list[float]] | None) -> None:
    """A box task's `boxes` and the boxes of its answer `text` (the last gpt turn) must agree in number.

    A record of a box task (``radvlm.tasks.is_box_task``) with a ``boxes`` key must have as many boxes in its
    answer (the last gpt turn; after a closed thinking block, cut as the rewards cut it) as ``boxes`` holds
    (``metrics.boxes.parse_boxes``, the reward's parser), else ``boxes_text_mismatch``: the SFT loss would learn
    one and the rewards score against the other. Other tasks (conversations, whose boxes belong to one of
    several turns) and untasked records are not checked.
    """
    if boxes is None or not is_box_task(task):
        return
    answer, closed = answer_of(text, True, task_think_split(task)) if "</think>" in text.lower() else (text, True)
    found = len(parse_boxes(answer if closed else text))
    if found != len(boxes):
        raise Invalid(f"'boxes' holds {len(boxes)} box(es) but the answer text {found} (the SFT loss learns the "
                      "text, rewards and metrics score against 'boxes')", "boxes_text_mismatch")
