"""RadVLM / LLaVA conversation records: reading, validation, image checks and writing.

A record file is a JSON list or a JSONL file (one object per line) of

    {"id": str, "image": "relative/or/absolute.png",
     "conversations": [{"from": "human", "value": "<image>\\nPrompt"}, {"from": "gpt", "value": "Answer"}, ...],
     "task": "report_generation", "boxes": [[x1, y1, x2, y2], ...], "labels": ["..."], ...}

(REFERENCE.md §8). `load_records` turns each object into a `Record` and rejects malformed input early with a
`RecordError` that names the file, the record index and the id (and the image path for image problems).

Decisions beyond the RadVLM format:
- Roles: "human"/"user" map to "user", "gpt"/"assistant" to "assistant"; other roles ("system") are refused.
  Turns must alternate user, assistant, ... starting with user and ending with assistant.
- The image tag: a record with an image has exactly one `<image>` in all its turns, at the start of the first
  user turn (one newline after it is removed with it); a record without an image has none.
- `id` may be a JSON string or integer (kept as str); ids are unique within a file.
- `task`: a task name of `radvlm.tasks` (aliases accepted, stored canonical); without a `task` key the task
  comes from RadVLM's id prefix (`radvlm.tasks.task_from_id`: `vindr-cxr-mono-train1_17` → abnormality
  grounding) and stays `None` for an unknown prefix; `boxes`, when present, is a list of `[x1, y1, x2, y2]` of finite
  numbers in [0, 1] (normalised, REFERENCE.md §4) with x1 <= x2 and y1 <= y2; `labels` is a list of strings.
- Image checks (`check_image`): the file must open and pass PIL's `verify()`; sides of at least
  `MIN_IMAGE_SIDE` pixels and aspect ratio at most `MAX_ASPECT_RATIO`. `load_image` decodes fully.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from radvlm.chat import THINK_OPEN, is_thinking_prompt
from radvlm.tasks import BOX_TASKS, TASKS, canonical_task, task_from_id  # noqa: F401  (TASKS re-exported)

GROUNDING_TASKS = BOX_TASKS  # tasks answered with boxes (radvlm.tasks is the one table)

IMAGE_TAG = "<image>"

USER, ASSISTANT = "user", "assistant"
ROLE_ALIASES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}

# transformers' Qwen2-VL `smart_resize` (models/qwen2_vl/image_processing_qwen2_vl.py, used by Qwen3-VL's
# processor too) raises "absolute aspect ratio must be smaller than 200" when max(h, w) / min(h, w) > 200.
MAX_ASPECT_RATIO = 200.0
# `smart_resize` does not refuse small images: it upsamples them to `min_pixels` (56*56 by default). A side
# under 28 px (the Qwen2-VL resize factor: patch 14 x merge 2; Qwen3-VL uses 16 x 2) is still never a real
# radiograph, so we treat it as a broken file (thumbnail, placeholder). Our limit, not the processor's.
MIN_IMAGE_SIDE = 28


class RecordError(ValueError):
    """A malformed record file or record. The message names the file, record index, id and image path."""

    def __init__(
        self,
        message: str,
        file: str | Path,
        index: int | None = None,
        record_id: str | None = None,
        image: str | Path | None = None,
    ) -> None:
        self.file, self.index, self.record_id, self.image = str(file), index, record_id, image
        where = str(file)
        if index is not None:
            where += f": record {index}"
        if record_id is not None:
            where += f" (id {record_id!r})"
        if image is not None:
            where += f", image {str(image)!r}"
        super().__init__(f"{where}: {message}")


class ImageError(ValueError):
    """A missing, undecodable or unusable image; the message names the path."""

    def __init__(self, message: str, path: str | Path) -> None:
        self.path, self.reason = str(path), message
        super().__init__(f"image {self.path!r}: {message}")


class _Invalid(ValueError):
    """A problem inside one record; `load_records` re-raises it as RecordError with file, index and id."""


@dataclass(frozen=True)
class Turn:
    role: str  # "user" | "assistant"
    text: str  # for the first user turn of an image record: without the leading "<image>\n"


@dataclass
class Record:
    id: str
    image: Path | None  # resolved absolute path, None for text-only records
    conversations: list[Turn]
    task: str | None = None
    boxes: list[list[float]] | None = None
    labels: list[str] | None = None
    source: str = ""  # the file the record came from
    index: int = 0  # position in that file
    extra: dict[str, Any] = field(default_factory=dict)  # every other key of the JSON object

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def prompt(self) -> str:
        """Text of the first user turn (image tag removed)."""
        return self.conversations[0].text

    @property
    def answer(self) -> str:
        """Text of the last assistant turn."""
        return self.conversations[-1].text

    @property
    def is_thinking(self) -> bool:
        """A user turn ends with " /think" or an assistant turn holds a "<think>" block."""
        return any(
            (t.role == USER and is_thinking_prompt(t.text)) or (t.role == ASSISTANT and THINK_OPEN in t.text)
            for t in self.conversations
        )

    def to_dict(self, image_root: str | Path | None = None) -> dict[str, Any]:
        """Back to the RadVLM JSON form; the image path is made relative to `image_root` when given."""
        turns = []
        for i, t in enumerate(self.conversations):
            value = f"{IMAGE_TAG}\n{t.text}" if i == 0 and self.image is not None else t.text
            turns.append({"from": "human" if t.role == USER else "gpt", "value": value})
        out: dict[str, Any] = {"id": self.id}
        if self.image is not None:
            image = self.image
            if image_root is not None:
                image = Path(image).relative_to(Path(image_root).resolve())
            out["image"] = image.as_posix()
        out["conversations"] = turns
        for key in ("task", "boxes", "labels"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        return out


# ----------------------------------------------------------------------------------------------- images


def check_image(path: str | Path, min_side: int = MIN_IMAGE_SIDE, max_aspect: float = MAX_ASPECT_RATIO) -> tuple[int, int]:
    """Open the header and verify the file without a full decode; return (width, height) or raise ImageError."""
    path = Path(path)
    if not path.is_file():
        raise ImageError("file not found" if not path.exists() else "not a regular file", path)
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # checks structure / PNG CRCs; does not catch every truncated JPEG (load_image does)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError, ...)
        raise ImageError(f"cannot be decoded ({type(e).__name__}: {e})", path) from e
    check_image_size(size, path, min_side, max_aspect)
    return size


def check_image_size(size: tuple[int, int], path: str | Path, min_side: int = MIN_IMAGE_SIDE,
                     max_aspect: float = MAX_ASPECT_RATIO) -> None:
    """Refuse sizes the Qwen image processor rejects (aspect ratio) or that cannot be a radiograph (tiny)."""
    w, h = size
    if min(w, h) < min_side:
        raise ImageError(f"size {w}x{h} is below the minimum side of {min_side} px", path)
    if max(w, h) / min(w, h) > max_aspect:
        raise ImageError(
            f"aspect ratio {max(w, h) / min(w, h):.1f} of size {w}x{h} exceeds {max_aspect:g} "
            "(the Qwen-VL image processor refuses it)", path)


def load_image(path: str | Path, min_side: int = MIN_IMAGE_SIDE, max_aspect: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Decode fully and return an RGB image. 16-bit / integer / float images are min-max scaled to 8 bit
    (PIL's own conversion clips them at 255, which would turn most 16-bit radiographs white)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError("file not found" if not path.exists() else "not a regular file", path)
    try:
        with Image.open(path) as im:
            im.load()
            check_image_size(im.size, path, min_side, max_aspect)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                a = np.asarray(im, dtype=np.float64)  # (H, W)
                lo, hi = float(a.min()), float(a.max())
                a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
                im = Image.fromarray(np.round(a).astype(np.uint8), mode="L")
            return im.convert("RGB")
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"cannot be decoded ({type(e).__name__}: {e})", path) from e


# ---------------------------------------------------------------------------------------------- reading


def _read_objects(path: Path) -> list[tuple[int, Any, str]]:
    """Parse a .json list or .jsonl file into (index, object, location) triples; location (" (line N)" for
    JSONL, "" for JSON) is appended to error messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise RecordError("file not found", path) from e
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"cannot be read ({type(e).__name__}: {e})", path) from e
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"invalid JSON on line {lineno}, column {e.colno}: {e.msg}", path, len(out)) from e
            out.append((len(out), obj, f" (line {lineno})"))
        return out
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(
                f"invalid or truncated JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg}", path
            ) from e
        if not isinstance(data, list):
            raise RecordError(f"top level must be a JSON list of records, got {type(data).__name__}", path)
        return [(i, obj, "") for i, obj in enumerate(data)]
    raise RecordError(f"unknown suffix {path.suffix!r}: expected .json (a list) or .jsonl (one object per line)", path)


def _check_boxes(boxes: Any) -> list[list[float]]:
    """Validate a list of [x1, y1, x2, y2]; raise _Invalid describing the first bad box."""
    if not isinstance(boxes, list):
        raise _Invalid(f"'boxes' must be a list of [x1, y1, x2, y2], got {type(boxes).__name__}")
    out = []
    for j, box in enumerate(boxes):
        ok = isinstance(box, list) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        if not ok:
            raise _Invalid(f"box {j} must be 4 finite numbers [x1, y1, x2, y2], got {box!r}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
            raise _Invalid(f"box {j} {box!r} is not normalised to [0, 1]")
        if x1 > x2 or y1 > y2:
            raise _Invalid(f"box {j} {box!r} has x1 > x2 or y1 > y2")
        out.append([x1, y1, x2, y2])
    return out


def _parse_turns(conv: Any, has_image: bool) -> list[Turn]:
    """Validate the conversation list; raise _Invalid describing the first problem."""
    if not isinstance(conv, list) or not conv:
        raise _Invalid("'conversations' must be a non-empty list of {'from', 'value'} turns")
    turns = []
    for j, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise _Invalid(f"turn {j} must be an object with string 'from' and 'value', got {t!r:.120}")
        role = ROLE_ALIASES.get(t["from"])
        if role is None:
            raise _Invalid(f"turn {j} has role {t['from']!r}; expected one of {sorted(ROLE_ALIASES)}")
        expected = USER if j % 2 == 0 else ASSISTANT
        if role != expected:
            raise _Invalid(f"turn {j} is from {t['from']!r} but turns must alternate human, gpt, human, gpt, ...")
        turns.append(Turn(role, t["value"]))
    if turns[-1].role != ASSISTANT:
        raise _Invalid("the conversation must end with a gpt (assistant) turn")
    n_tags = sum(t.text.count(IMAGE_TAG) for t in turns)
    if has_image:
        if n_tags != 1 or not turns[0].text.startswith(IMAGE_TAG):
            raise _Invalid(
                f"a record with an image needs exactly one {IMAGE_TAG!r}, at the start of the first human turn "
                f"(found {n_tags}{'' if turns[0].text.startswith(IMAGE_TAG) else ', not at the start'})")
        first = turns[0].text[len(IMAGE_TAG):]
        turns[0] = Turn(USER, first.removeprefix("\n"))
    elif n_tags:
        raise _Invalid(f"a record without 'image' must not contain {IMAGE_TAG!r} (found {n_tags})")
    for j, t in enumerate(turns):
        if not t.text.strip() and not (j == 0 and has_image):
            raise _Invalid(f"turn {j} ({t.role}) is empty")
    return turns


def _parse_record(obj: Any, root: Path) -> Record:
    """One JSON object → Record (source and index filled in by the caller); _Invalid on problems."""
    if not isinstance(obj, dict):
        raise _Invalid(f"a record must be a JSON object, got {type(obj).__name__}")
    if "id" not in obj:
        raise _Invalid("missing 'id'")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise _Invalid(f"'id' must be a non-empty string or an integer, got {rid!r}")
    image = obj.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise _Invalid(f"'image' must be one non-empty path string, got {image!r:.120}")
    if "conversations" not in obj:
        raise _Invalid("missing 'conversations'")
    turns = _parse_turns(obj["conversations"], image is not None)
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise _Invalid(f"'task' must be a string, got {task!r:.120}")
    try:
        task = canonical_task(task) if task is not None else task_from_id(str(rid))
    except ValueError as e:
        raise _Invalid(str(e)) from None
    boxes = _check_boxes(obj["boxes"]) if obj.get("boxes") is not None else None
    labels = obj.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise _Invalid(f"'labels' must be a list of strings, got {labels!r:.120}")
    extra = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations", "task", "boxes", "labels")}
    return Record(
        id=str(rid),
        image=(root / image).resolve() if image is not None else None,
        conversations=turns,
        task=task,
        boxes=boxes,
        labels=labels,
        extra=extra,
    )


def load_records(path: str | Path, image_root: str | Path | None = None, check_images: bool = True) -> list[Record]:
    """Read and validate a RadVLM/LLaVA .json or .jsonl file.

    Image paths are resolved against `image_root` (default: the file's folder). With `check_images` every
    image must exist and decode (`check_image`); without it, paths are only resolved.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.resolve().parent
    records: list[Record] = []
    seen: dict[str, int] = {}
    for index, obj, location in _read_objects(path):
        rid = str(obj["id"]) if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)) else None
        try:
            rec = _parse_record(obj, root)
        except _Invalid as e:
            raise RecordError(f"{e}{location}", path, index, rid) from e
        rec.source, rec.index = str(path), index
        if rec.id in seen:
            raise RecordError(f"duplicate id, first used by record {seen[rec.id]}", path, index, rec.id)
        seen[rec.id] = index
        if check_images and rec.image is not None:
            try:
                check_image(rec.image)
            except ImageError as e:
                raise RecordError(e.reason, path, index, rec.id, rec.image) from e
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------- writing


def save_records(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write record dicts as a JSON list (.json) or one object per line (.jsonl); return the path."""
    path = Path(path)
    records = list(records)
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
    elif suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    else:
        raise ValueError(f"{path}: unknown suffix {path.suffix!r}; expected .json or .jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
