"""One RadVLM / LLaVA record: its form in memory (``Record``, its ``Turn``s) and the parsing and validation of
one JSON object into it (``parse_record``: fields, ``parse_turns``: roles, turn order and the image tag,
``check_boxes``, ``check_thinking_block``); problems raise ``datamodules.record_checks.Invalid``, which
``datamodules.records.load_records`` turns into a ``RecordError`` naming the file, index and id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamodules.record_checks import Invalid as _Invalid
from datamodules.record_checks import check_boxes_in_text, check_text, check_tree
from datamodules.record_checks import finite as _finite
from datamodules.record_checks import image_path as _image_path
from datamodules.record_checks import show as _show
from radvlm.chat import THINK_CLOSE, THINK_CLOSE_RE, THINK_OPEN, THINK_OPEN_RE, is_thinking_prompt
from radvlm.tasks import canonical_task, task_from_id

IMAGE_TAG = "<image>"

USER, ASSISTANT = "user", "assistant"
ROLE_ALIASES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT}


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation, its role normalised (``ROLE_ALIASES``)."""

    role: str  # "user" | "assistant"
    text: str  # for the first user turn of an image record: without the leading "<image>\n"


@dataclass
class Record:
    """A validated record: id, resolved image path, turns, task, boxes, labels, where it came from and every other
    key of its JSON object (``extra``); ``to_dict`` gives the RadVLM JSON form back."""

    id: str
    image: Path | None  # resolved absolute path, None for text-only records
    conversations: list[Turn]
    task: str | None = None
    boxes: list[list[float]] | None = None
    labels: list[str] | None = None
    source: str = ""  # the file the record came from
    index: int = 0  # position in that file
    extra: dict[str, Any] = field(default_factory=dict)  # every other key of the JSON object
    #: a copy that evens out the ranks' evaluation shards (``datamodules.datamodule.EvalShardSampler``): run like
    #: every record, so all ranks make the same passes, and left out of every metric and loss
    padding: bool = False

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

def check_boxes(boxes: Any) -> list[list[float]]:
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


def parse_turns(conv: Any, has_image: bool, normalize: bool = False) -> tuple[list[Turn], list[str]]:
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
            check_thinking_block(t.text, first + k)
    return turns, fixes


def check_thinking_block(text: str, turn: int) -> None:
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


def parse_record(obj: Any, root: Path, normalize: bool = False, confine: bool = False) -> tuple[Record, list[str]]:
    """One JSON object → Record (source and index filled in by the caller) and the normalisations applied
    (`parse_turns`); _Invalid on problems. `confine`: image paths must stay inside `root`.

    `id` may be a JSON string or integer (kept as str); `load_records` checks that ids are unique within a
    file. `task`: a task name of `radvlm.tasks` (aliases accepted, stored canonical); without a `task` key the
    task comes from RadVLM's id prefix (`radvlm.tasks.task_from_id`: `vindr-cxr-mono-train1_17` → abnormality
    grounding) and stays `None` for an unknown prefix. `boxes`: `check_boxes`. `labels` is a list of strings.
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
    turns, fixes = parse_turns(obj["conversations"], image is not None, normalize)
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise _Invalid(f"'task' must be a string, got {_show(task)}", "bad_task")
    try:
        task = canonical_task(task) if task is not None else task_from_id(str(rid))
    except ValueError as e:
        raise _Invalid(str(e), "bad_task") from None
    boxes = check_boxes(obj["boxes"]) if obj.get("boxes") is not None else None
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
