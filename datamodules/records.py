"""RadVLM / LLaVA conversation records: reading, validation, image checks and writing.

A record file is a JSON list or a JSONL file (one object per line) of

    {"id": str, "image": "relative/or/absolute.png",
     "conversations": [{"from": "human", "value": "<image>\\nPrompt"}, {"from": "gpt", "value": "Answer"}, ...],
     "task": "report_generation", "boxes": [[x1, y1, x2, y2], ...], "labels": ["..."], ...}

(docs/paper.md §8). `load_records` turns each object into a `Record` and rejects malformed input early with a
`RecordError` that names the file, the record index and the id (and the image path for image problems).

Beyond the RadVLM format, so that bad input fails at load time rather than mid-training: roles, turn order and
the image tag are checked (`_parse_turns`), so are the fields (`_parse_record`, `_check_boxes`) and everything
`datamodules.record_checks` checks; LLaVA's normalisation of conversations and the skipping of bad records are
opt-in (`load_records`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from datamodules.images import (  # noqa: F401  (re-exported: images were part of this module)
    MAX_ASPECT_RATIO,
    MIN_IMAGE_SIDE,
    ImageError,
    check_image,
    check_image_size,
    load_image,
)
from datamodules.record_checks import FOREIGN_BOMS, MAX_NESTING, UTF8_BOM, check_boxes_in_text, check_text, check_tree
from datamodules.record_checks import Invalid as _Invalid
from datamodules.record_checks import finite as _finite
from datamodules.record_checks import image_path as _image_path
from datamodules.record_checks import show as _show
from radvlm.chat import THINK_CLOSE, THINK_CLOSE_RE, THINK_OPEN, THINK_OPEN_RE, is_thinking_prompt
from radvlm.tasks import BOX_TASKS, TASKS, canonical_task, task_from_id  # noqa: F401  (TASKS re-exported)

log = logging.getLogger(__name__)

GROUNDING_TASKS = BOX_TASKS  # tasks answered with boxes (radvlm.tasks is the one table)

BadRecords = Literal["error", "skip"]

IMAGE_TAG = "<image>"

USER, ASSISTANT = "user", "assistant"
ROLE_ALIASES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}



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
        self.problem = message  # the message without the file / index / id / image prefix
        where = str(file)
        if index is not None:
            where += f": record {index}"
        if record_id is not None:
            where += f" (id {record_id!r})"
        if image is not None:
            where += f", image {str(image)!r}"
        super().__init__(f"{where}: {message}")


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


# ----------------------------------------------------------------------------------- skipped records


@dataclass(frozen=True)
class SkippedRecord:
    """A record left out under `bad_records="skip"`: one line of the bad-records report."""

    file: str
    index: int | None  # position in the file (JSONL: among its non-blank lines)
    id: str | None  # None when the id itself is missing or malformed
    reason: str  # the kind: leading_assistant_turn, empty_answer, invalid_json, image_missing, ...
    message: str  # what is wrong, as a RecordError would say it
    image: str | None = None  # the resolved image path, for image problems

    @property
    def is_image(self) -> bool:
        return self.reason.startswith("image_")

    def describe(self) -> str:
        image = f", image {self.image!r}" if self.image is not None else ""
        return f"{self.file}[{self.index}] id={self.id!r}{image} ({self.reason}): {self.message}"


@dataclass
class LoadReport:
    """What reading (and the image check) saw, skipped and normalised. Pass one to `load_records` (several
    calls accumulate: the data module keeps one per split) to receive the skipped records."""

    records: int = 0  # records read: JSON list items or non-blank JSONL lines, bad ones included
    checked: int = 0  # records that went through an image check
    skipped: list[SkippedRecord] = field(default_factory=list)
    normalised: Counter[str] = field(default_factory=Counter)  # kind → conversations changed

    def skip(self, error: RecordError, reason: str) -> None:
        image = str(error.image) if error.image is not None else None
        self.skipped.append(SkippedRecord(error.file, error.index, error.record_id, reason, error.problem, image))

    def reasons(self) -> dict[str, int]:
        """Skipped records per reason, most frequent first."""
        return dict(Counter(s.reason for s in self.skipped).most_common())

    @property
    def bad_fraction(self) -> float:
        """Fraction of the records lost: f_read + f_image − f_read·f_image with f_read = malformed / records read
        and f_image = bad images / records checked (without a task filter in between: skipped / read)."""
        n_images = sum(s.is_image for s in self.skipped)
        f_read = (len(self.skipped) - n_images) / self.records if self.records else 0.0
        f_image = n_images / self.checked if self.checked else 0.0
        return f_read + f_image - f_read * f_image

    def exceeds(self, max_bad_fraction: float) -> bool:
        return self.bad_fraction > max_bad_fraction + 1e-12  # float slack: exactly at the limit is allowed

    def check_limit(self, max_bad_fraction: float, split: str = "", files: str | Path = "",
                    report_path: str | Path | None = None) -> None:
        """Raise `RecordError` with the counts per reason and the first records once `bad_fraction` passes
        `max_bad_fraction`."""
        if not self.exceeds(max_bad_fraction):
            return
        what = f"{split} records" if split else "records"
        n_images = sum(s.is_image for s in self.skipped)
        n_malformed = len(self.skipped) - n_images
        parts = [f"{n_malformed} of {self.records} {what} are malformed"] if n_malformed else []
        if n_images:
            parts.append(f"{n_images} of {self.checked} {'checked' if parts else what} have a bad image")
        listing = "\n  ".join(s.describe() for s in self.skipped[:10])
        where = f"; all listed in {report_path}" if report_path is not None else ""
        raise RecordError(
            f"{' and '.join(parts)}, more than max_bad_fraction={max_bad_fraction} ({self.bad_fraction:.1%} lost); "
            f"skipped per reason: {self.reasons()}{where}:\n  {listing}", files)

    def summary(self, name: str = "", n_examples: int = 5) -> str:
        """Counts per reason, the first skipped records and the normalisations; "" when there is nothing."""
        lines = []
        prefix = f"{name}: " if name else ""
        if self.skipped:
            lines.append(f"{prefix}skipped {len(self.skipped)} of {self.records} records ({self.bad_fraction:.2%}), "
                         f"per reason: {self.reasons()}; first ones:")
            lines += [f"  {s.describe()}" for s in self.skipped[:n_examples]]
        if self.normalised:
            lines.append(f"{prefix}normalised conversations (LLaVA preprocessing): {dict(self.normalised)}")
        return "\n".join(lines)

    def rows(self, **extra: Any) -> list[dict[str, Any]]:
        """The skipped records as report rows (JSONL lines), each with `extra` keys (e.g. split) first."""
        return [{**extra, **asdict(s)} for s in self.skipped]


# ---------------------------------------------------------------------------------------------- reading


def _read_objects(path: Path) -> list[tuple[int, Any, str]]:
    """Parse a .json list or .jsonl file into (index, object, location) triples; location (" (line N)" for
    JSONL, "" for JSON) is appended to error messages. A JSONL line that is not JSON (or not UTF-8, or nested too
    deeply to parse) becomes an `_Invalid` object (a bad record, skippable); a .json file that does not parse
    raises.

    Encoding: UTF-8 only. A UTF-8 byte-order mark at the start of the file (or of a JSONL line: concatenated
    files) is accepted and dropped; a UTF-16/32 one refuses the file; invalid UTF-8 is a bad record (JSONL line)
    or a bad file (.json) with the byte offset. JSONL lines are split on "\\n" only, so strings holding U+2028,
    U+2029, NEL or (escaped) vertical tab / form feed load (``str.splitlines`` would cut them).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise RecordError("file not found", path) from e
    except OSError as e:
        raise RecordError(f"cannot be read ({type(e).__name__}: {e})", path) from e
    for bom, name in FOREIGN_BOMS:
        if data.startswith(bom):
            raise RecordError(f"is {name} encoded (byte-order mark {bom!r}); record files must be UTF-8", path)
    data = data.removeprefix(UTF8_BOM)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out: list[tuple[int, Any, str]] = []
        for lineno, raw in enumerate(data.split(b"\n"), start=1):
            raw = raw.removeprefix(UTF8_BOM)  # concatenated files keep their marks
            if not raw.strip(b" \t\r"):
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                obj = _Invalid(f"line {lineno} is not valid UTF-8 (byte {e.start} of the line: {raw[e.start:e.start + 4]!r})",
                               "bad_encoding")
            except json.JSONDecodeError as e:
                obj = _Invalid(f"invalid JSON on line {lineno}, column {e.colno}: {e.msg}", "invalid_json")
            except RecursionError:
                obj = _Invalid(f"line {lineno} is nested too deeply to parse (limit {MAX_NESTING} levels)", "too_deep")
            except ValueError as e:  # an integer of more than 4300 digits
                obj = _Invalid(f"invalid JSON on line {lineno}: {e}", "invalid_json")
            out.append((len(out), obj, "" if isinstance(obj, _Invalid) else f" (line {lineno})"))
        return out
    if suffix == ".json":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise RecordError(f"not valid UTF-8 at byte {e.start} (line {line}): {data[e.start:e.start + 4]!r}", path) from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(
                f"invalid or truncated JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg}", path
            ) from e
        except RecursionError as e:
            raise RecordError(f"JSON nested too deeply to parse (records may nest {MAX_NESTING} levels)", path) from e
        except ValueError as e:  # an integer of more than 4300 digits
            raise RecordError(f"invalid JSON: {e}", path) from e
        if not isinstance(data, list):
            raise RecordError(f"top level must be a JSON list of records, got {type(data).__name__}", path)
        return [(i, obj, "") for i, obj in enumerate(data)]
    raise RecordError(f"unknown suffix {path.suffix!r}: expected .json (a list) or .jsonl (one object per line)", path)


def _check_boxes(boxes: Any) -> list[list[float]]:
    """Validate a list of [x1, y1, x2, y2]; raise _Invalid describing the first bad box.

    Each box is `[x1, y1, x2, y2]` of finite numbers in [0, 1] (normalised, docs/paper.md §4) with x1 <= x2
    and y1 <= y2.
    """
    if not isinstance(boxes, list):
        raise _Invalid(f"'boxes' must be a list of [x1, y1, x2, y2], got {type(boxes).__name__}", "bad_boxes")
    out = []
    for j, box in enumerate(boxes):
        ok = isinstance(box, list) and len(box) == 4 and all(_finite(v) for v in box)
        if not ok:
            raise _Invalid(f"box {j} must be 4 finite numbers [x1, y1, x2, y2], got {_show(box)}", "bad_boxes")
        x1, y1, x2, y2 = (float(v) for v in box)
        if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
            raise _Invalid(f"box {j} {box!r} is not normalised to [0, 1]", "bad_boxes")
        if x1 > x2 or y1 > y2:
            raise _Invalid(f"box {j} {box!r} has x1 > x2 or y1 > y2", "bad_boxes")
        out.append([x1, y1, x2, y2])
    return out


def _parse_turns(conv: Any, has_image: bool, normalize: bool = False) -> tuple[list[Turn], list[str]]:
    """Validate the conversation list; raise _Invalid describing the first problem. With `normalize` a leading
    assistant turn and then a trailing user turn are dropped first (LLaVA); the list names those drops.
    Messages number turns as in the file.

    Roles: "human"/"user" map to "user", "gpt"/"assistant" to "assistant"; other roles ("system") are refused.
    Turns must alternate user, assistant, ... starting with user and ending with assistant. The image tag: a
    record with an image has exactly one `<image>` in all its turns, at the start of the first user turn (one
    newline after it is removed with it); a record without an image has none.
    """
    if not isinstance(conv, list) or not conv:
        raise _Invalid("'conversations' must be a non-empty list of {'from', 'value'} turns", "bad_conversations")
    turns, names = [], []
    for j, t in enumerate(conv):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise _Invalid(f"turn {j} must be an object with string 'from' and 'value', got {_show(t)}",
                           "bad_conversations")
        role = ROLE_ALIASES.get(t["from"])
        if role is None:
            raise _Invalid(f"turn {j} has role {_show(t['from'])}; expected one of {sorted(ROLE_ALIASES)}",
                           "unknown_role")
        check_text(f"turn {j} ({t['from']})", t["value"], tokens=True)
        turns.append(Turn(role, t["value"]))
        names.append(t["from"])
    first, fixes = 0, []  # first: file position of turns[0]
    if normalize and turns[0].role == ASSISTANT:
        turns, names, first = turns[1:], names[1:], 1
        fixes.append("dropped_leading_assistant_turn")
    if normalize and turns and turns[-1].role == USER:
        turns, names = turns[:-1], names[:-1]
        fixes.append("dropped_trailing_user_turn")
    if not turns:
        raise _Invalid(f"no turn is left after LLaVA normalisation ({', '.join(fixes)})", "bad_conversations")
    for k, t in enumerate(turns):
        if t.role != (USER if k % 2 == 0 else ASSISTANT):  # alternation held so far: turn k repeats turn k-1's role
            kind = ("leading_assistant_turn" if k == 0 else
                    "consecutive_assistant_turns" if t.role == ASSISTANT else "consecutive_user_turns")
            raise _Invalid(f"turn {first + k} is from {names[k]!r} but turns must alternate human, gpt, human, gpt, ...",
                           kind)
    if turns[-1].role != ASSISTANT:
        raise _Invalid("the conversation must end with a gpt (assistant) turn", "trailing_user_turn")
    n_tags = sum(t.text.count(IMAGE_TAG) for t in turns)
    if has_image:
        if n_tags != 1 or not turns[0].text.startswith(IMAGE_TAG):
            raise _Invalid(
                f"a record with an image needs exactly one {IMAGE_TAG!r}, at the start of the first human turn "
                f"(found {n_tags}{'' if turns[0].text.startswith(IMAGE_TAG) else ', not at the start'})",
                "bad_image_tag")
        turns[0] = Turn(USER, turns[0].text[len(IMAGE_TAG):].removeprefix("\n"))
    elif n_tags:
        raise _Invalid(f"a record without 'image' must not contain {IMAGE_TAG!r} (found {n_tags})", "bad_image_tag")
    for k, t in enumerate(turns):
        if not t.text.strip() and not (k == 0 and has_image):
            raise _Invalid(f"turn {first + k} ({t.role}) is empty", "empty_answer" if t.role == ASSISTANT else "empty_prompt")
        if t.role == ASSISTANT:
            _check_thinking_block(t.text, first + k)
    return turns, fixes


def _check_thinking_block(text: str, turn: int) -> None:
    """An answer with a thinking tag must be one well-formed block then the answer: ``<think>`` at the start,
    one ``</think>`` after it, a non-empty answer after that (cold-start traces, ``make_thinking_answer``);
    tags match case-insensitively. Answers without any tag are not thinking answers and pass."""
    opens, closes = list(THINK_OPEN_RE.finditer(text)), list(THINK_CLOSE_RE.finditer(text))
    if not opens and not closes:
        return
    where = f"turn {turn} (gpt)"
    if len(opens) != 1 or len(closes) != 1:
        raise _Invalid(f"{where} needs one {THINK_OPEN} … {THINK_CLOSE} block, found {len(opens)} {THINK_OPEN} and "
                       f"{len(closes)} {THINK_CLOSE}", "bad_thinking")
    if text[: opens[0].start()].strip() or closes[0].start() < opens[0].end():
        raise _Invalid(f"{where} must start with {THINK_OPEN} and close it with {THINK_CLOSE} before the answer",
                       "bad_thinking")
    if not text[closes[0].end():].strip():
        raise _Invalid(f"{where} has no answer after {THINK_CLOSE}", "bad_thinking")


def _parse_record(obj: Any, root: Path, normalize: bool = False, confine: bool = False) -> tuple[Record, list[str]]:
    """One JSON object → Record (source and index filled in by the caller) and the normalisations applied
    (`_parse_turns`); _Invalid on problems. `confine`: image paths must stay inside `root`.

    `id` may be a JSON string or integer (kept as str); `load_records` checks that ids are unique within a
    file. `task`: a task name of `radvlm.tasks` (aliases accepted, stored canonical); without a `task` key the
    task comes from RadVLM's id prefix (`radvlm.tasks.task_from_id`: `vindr-cxr-mono-train1_17` → abnormality
    grounding) and stays `None` for an unknown prefix. `boxes`: `_check_boxes`. `labels` is a list of strings.
    """
    if not isinstance(obj, dict):
        raise _Invalid(f"a record must be a JSON object, got {type(obj).__name__}", "not_an_object")
    check_tree(obj)
    if "id" not in obj:
        raise _Invalid("missing 'id'", "missing_id")
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        raise _Invalid(f"'id' must be a non-empty string or an integer, got {_show(rid)}",
                       "missing_id" if rid is None else "bad_id")
    if isinstance(rid, str):
        check_text("'id'", rid)
    image = obj.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise _Invalid(f"'image' must be one non-empty path string, got {_show(image)}", "bad_image_field")
    image_path = _image_path(image, root, confine) if image is not None else None
    if "conversations" not in obj:
        raise _Invalid("missing 'conversations'", "bad_conversations")
    turns, fixes = _parse_turns(obj["conversations"], image is not None, normalize)
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise _Invalid(f"'task' must be a string, got {_show(task)}", "bad_task")
    try:
        task = canonical_task(task) if task is not None else task_from_id(str(rid))
    except ValueError as e:
        raise _Invalid(str(e), "bad_task") from None
    boxes = _check_boxes(obj["boxes"]) if obj.get("boxes") is not None else None
    check_boxes_in_text(turns[-1].text, task, boxes)
    labels = obj.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise _Invalid(f"'labels' must be a list of strings, got {_show(labels)}", "bad_labels")
    for label in labels or []:
        check_text("a label", label)
    extra = {k: v for k, v in obj.items() if k not in ("id", "image", "conversations", "task", "boxes", "labels")}
    return Record(
        id=str(rid),
        image=image_path,
        conversations=turns,
        task=task,
        boxes=boxes,
        labels=labels,
        extra=extra,
    ), fixes


def load_records(
    path: str | Path,
    image_root: str | Path | None = None,
    check_images: bool = True,
    *,
    bad_records: BadRecords = "error",
    normalize_conversations: bool = False,
    report: LoadReport | None = None,
    allow_outside_image_root: bool = False,
) -> list[Record]:
    """Read and validate a RadVLM/LLaVA .json or .jsonl file.

    Image paths are resolved against `image_root` (default: the file's folder); with `image_root` given they must
    stay inside it unless `allow_outside_image_root`. With `check_images` every image must exist and decode
    (`check_image`); without it, paths are only resolved.

    Image checks (`check_image`): the file must open and pass PIL's `verify()`; sides of at least
    `MIN_IMAGE_SIDE` pixels and aspect ratio at most `MAX_ASPECT_RATIO`. `load_image` (at collation) decodes
    fully; a float image (TIFF "F" mode) with NaN or infinite pixels is refused (`image_nonfinite`).

    `bad_records="error"` (default) raises `RecordError` (file, index, id) at the first bad record or image;
    `"skip"` leaves it out and adds a `SkippedRecord` (file, index, id, reason kind, message) to `report`, never
    silently. A JSONL line that is not JSON is a skippable record; a .json file that does not parse is
    unreadable and raises. No limit here: the limit (`LoadReport.check_limit(max_bad_fraction)`) is the
    caller's; the data module applies it per split.

    `normalize_conversations=True` (default False: strict) applies LLaVA's documented preprocessing first: a
    leading assistant turn is dropped (LLaVA's `preprocess` drops it) and a trailing user turn is dropped (LLaVA
    trains on it as masked context; it has no answer to learn). Each drop is counted per kind in
    `report.normalised`. Anything else (two gpt turns in a row, an empty answer, a null id) stays malformed.
    Without a `report`, what was skipped or normalised is logged as a warning.
    """
    if bad_records not in ("error", "skip"):
        raise ValueError(f"bad_records must be 'error' or 'skip', got {bad_records!r}")
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.resolve().parent
    mine = LoadReport() if report is None else report
    records: list[Record] = []
    seen: dict[str, int] = {}
    for index, obj, location in _read_objects(path):
        mine.records += 1
        rid = str(obj["id"]) if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)) else None
        try:
            if isinstance(obj, _Invalid):  # a JSONL line that is not JSON
                raise obj
            rec, fixes = _parse_record(obj, root, normalize_conversations,
                                       confine=image_root is not None and not allow_outside_image_root)
            if rec.id in seen:
                raise _Invalid(f"duplicate id, first used by record {seen[rec.id]}", "duplicate_id")
        except _Invalid as e:
            err = RecordError(f"{e}{location}", path, index, rid)
            if bad_records == "error":
                raise err from e
            mine.skip(err, e.kind)
            continue
        rec.source, rec.index = str(path), index
        seen[rec.id] = index
        if check_images:
            mine.checked += 1
            try:
                if rec.image is not None:
                    check_image(rec.image)
            except ImageError as e:
                err = RecordError(e.reason, path, index, rec.id, rec.image)
                if bad_records == "error":
                    raise err from e
                mine.skip(err, e.kind)
                continue
        mine.normalised.update(fixes)
        records.append(rec)
    if report is None and (mine.skipped or mine.normalised):
        log.warning("%s", mine.summary(str(path)))
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


# ---------------------------------------------------------------------------------------------- checking


def check_files(paths: Iterable[str | Path], image_root: str | Path | None = None, check_images: bool = True,
                normalize_conversations: bool = False) -> tuple[dict[str, LoadReport], dict[str, Counter[str]]]:
    """Every record of ``paths`` read as training would (``load_records`` with ``bad_records="skip"``):
    ``({file: LoadReport}, {file: records kept per task})``; a task ``None`` (an unknown id prefix and no
    ``task`` key) is counted as ``"(no task)"``."""
    reports, tasks = {}, {}
    for path in paths:
        report = LoadReport()
        kept = load_records(path, image_root, check_images, bad_records="skip",
                            normalize_conversations=normalize_conversations, report=report)
        reports[str(path)] = report
        tasks[str(path)] = Counter(r.task or "(no task)" for r in kept)
    return reports, tasks


def main(argv: list[str] | None = None) -> int:
    """``python -m datamodules.records --check FILE…``: validate records and images, report per file and task.
    Exit status 1 when any record is bad (every bad record is listed), 0 when all are good."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m datamodules.records",
                                     description="Validate RadVLM/LLaVA record files (fields, turns, boxes, "
                                                 "thinking blocks, images) and count the records per task.")
    parser.add_argument("--check", nargs="+", required=True, metavar="FILE", help=".json or .jsonl record files")
    parser.add_argument("--image-root", default=None, help="folder the image paths are relative to "
                                                           "(default: each file's folder)")
    parser.add_argument("--no-images", action="store_true", help="do not open the images (paths only)")
    parser.add_argument("--normalize-conversations", action="store_true",
                        help="apply LLaVA's preprocessing first, as data.normalize_conversations does")
    parser.add_argument("--max-listed", type=int, default=20, help="bad records listed per file")
    args = parser.parse_args(argv)
    bad = 0
    for path in args.check:
        try:
            reports, tasks = check_files([path], args.image_root, not args.no_images, args.normalize_conversations)
        except (RecordError, OSError) as exc:
            print(f"{path}: unreadable: {exc}")
            bad += 1
            continue
        report, counts = reports[path], tasks[path]
        kept = sum(counts.values())
        print(f"{path}: {report.records} records, {kept} good, {len(report.skipped)} bad"
              f"{'' if args.no_images else f', {report.checked} images checked'}")
        for task, n in sorted(counts.items()):
            print(f"  {task}: {n}")
        if report.skipped:
            print(f"  bad per reason: {report.reasons()}")
            for s in report.skipped[: args.max_listed]:
                print(f"  {s.describe()}")
            if len(report.skipped) > args.max_listed:
                print(f"  … and {len(report.skipped) - args.max_listed} more")
        if report.normalised:
            print(f"  normalised conversations: {dict(report.normalised)}")
        bad += len(report.skipped)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
