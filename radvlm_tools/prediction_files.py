"""Prediction files for ``radvlm_tools.evaluate``: our JSONL and RadVLM's evaluation outputs, read into one row shape.

Formats (``FORMATS``, ``--format``; ``detect_format`` for ``auto``): ``jsonl``, ours (``main.py predict``: one
object per line with ``id``, ``task``, ``answer``, ``reference``); ``radvlm``, RadVLM's evaluation output
(uzh-dqbm-cmi/RadVLM ``radvlm/evaluation/evaluate_instructions.py``: ``results/{model}_{task}_output.json``,
ONE JSON list of objects without a task, usually without an id, the ground truth under other keys);
``radvlm-jsonl``, the same objects one per line. RadVLM objects get our keys (``RADVLM_KEYS``,
``_radvlm_row``), stable ids and the task of ``--task`` or of the file name (``read_prediction_file``).

Every row then passes the checks of our format (``check_row``); rows come back sorted by id; duplicate ids keep
their first row and are counted. Not in RadVLM: ids ``{file stem}_{idx}`` for objects without one, so that the
same sample in two runs of one test set compares by id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radvlm import tasks
from radvlm.chat import answer_of
from radvlm.tasks import task_think_split

FORMATS = ("auto", "jsonl", "radvlm", "radvlm-jsonl")
#: our key ← RadVLM's key (``reference``: per task, ``RADVLM_REFERENCE_KEYS``), read from RadVLM's evaluation
#: code: each object holds ``output`` (the model's text), ``instr`` (the prompt), ``answer`` (the instruction's
#: ground-truth ANSWER, not the prediction as in ours) and, when the dataset sample has them, ``id``, ``idx``,
#: ``img_path``, ``labels``, ``label``, ``txt``, ``boxes``; its report metrics compare ``output`` with ``txt``,
#: its box metrics with the unrounded ``boxes``, its classification with ``labels``
RADVLM_KEYS: dict[str, str] = {"answer": "output", "gt_boxes": "boxes", "labels": "labels", "image": "img_path",
                               "prompt": "instr"}
#: RadVLM's ground-truth key per kind of task (``radvlm.tasks.task_kind``); ``answer`` for every other kind
RADVLM_REFERENCE_KEYS: dict[str, str] = {"report": "txt"}
MAPPABLE = ("id", "task", "answer", "reference", "gt_boxes", "labels", "image", "prompt")


@dataclass
class PredictionFile:
    """Rows of one prediction file in our shape, and how they were read."""

    path: Path
    format: str  # jsonl | radvlm | radvlm-jsonl
    rows: list[dict]
    duplicates: int
    keys: dict[str, str] = field(default_factory=dict)  # the mapping used (RadVLM formats)

    def describe(self) -> str:
        """One line for the report's notes."""
        if self.format == "jsonl":
            return f"{self.path.name}: our prediction JSONL"
        mapping = ", ".join(f"{ours} ← {theirs}" for ours, theirs in self.keys.items())
        return f"{self.path.name}: RadVLM evaluation output ({self.format}); keys {mapping}"


def parse_keys(spec: str | dict[str, str] | None) -> dict[str, str]:
    """``"answer=output,reference=gt"`` (or a dict) → ``{"answer": "output", "reference": "gt"}``."""
    if not spec:
        return {}
    pairs = spec.items() if isinstance(spec, dict) else (
        item.split("=", 1) if "=" in item else (item, "") for item in spec.split(",") if item.strip())
    out: dict[str, str] = {}
    for ours, theirs in pairs:
        ours, theirs = str(ours).strip(), str(theirs).strip()
        if ours not in MAPPABLE or not theirs:
            raise ValueError(f"bad key mapping {ours}={theirs!r}: expected OURS=THEIRS with OURS one of {MAPPABLE}")
        out[ours] = theirs
    return out


def task_from_filename(path: str | Path) -> str | None:
    """The one task of ``radvlm.tasks.TASKS`` named in the file name, None if none; ``ValueError`` if several."""
    name = Path(path).name
    found = [t for t in tasks.TASKS if t in name]
    found = [t for t in found if not any(t != u and t in u for u in found)]  # conversation ⊂ grounded_conversation
    if len(found) > 1:
        raise ValueError(f"{path}: the file name names several tasks {found}: pass --task")
    return found[0] if found else None


def _first_object(text: str) -> Any:
    for line in text.splitlines():
        if line.strip():
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def detect_format(path: str | Path, text: str | None = None, answer_key: str = "output") -> str:
    """``radvlm`` (a JSON list), ``radvlm-jsonl`` (JSONL of RadVLM objects) or ``jsonl`` (ours)."""
    text = Path(path).read_text(encoding="utf-8") if text is None else text
    if text.lstrip().startswith("["):
        return "radvlm"
    first = _first_object(text)
    if isinstance(first, dict) and answer_key in first and "reference" not in first:
        return "radvlm-jsonl"
    return "jsonl"


def _objects(path: Path, text: str, fmt: str) -> list[tuple[str, Any]]:
    """``(where, object)`` per record: ``path:line`` for JSONL, ``path[index]`` for a JSON list."""
    if fmt == "radvlm":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); a RadVLM output file is one JSON list") from None
        if not isinstance(data, list):
            raise TypeError(f"{path}: expected a JSON list of objects (RadVLM output), got {type(data).__name__}")
        return [(f"{path}[{i}]", obj) for i, obj in enumerate(data)]
    out = []
    lines = text.splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            hint = " (an interrupted write: rerun predict to resume)" if lineno == len(lines) else ""
            raise ValueError(f"{path}:{lineno}: not valid JSON{hint}: {exc}") from None
    return out


def _our_row(row: dict, default_task: str | None) -> dict:
    if row.get("task") is None:  # RadVLM ids name their task; else the caller's default
        row["task"] = tasks.task_from_id(str(row.get("id"))) or default_task
    elif isinstance(row["task"], str) and row["task"] in tasks.TASK_ALIASES:
        row["task"] = tasks.TASK_ALIASES[row["task"]]
    return row


def _radvlm_row(obj: dict, where: str, position: int, stem: str, task: str | None, keys: dict[str, str]) -> dict:
    """One RadVLM object in our row shape: keys mapped by ``RADVLM_KEYS`` and ``keys`` (``--keys``, which
    overrides any of them; an overridden key must be present in every object). Other keys are kept unless they
    collide with ours (RadVLM's ``answer`` does: it is the reference, or dropped). Id: the object's ``id`` (or
    the ``id=`` key); without one ``{stem}_{idx}`` from RadVLM's dataset index ``idx`` (a sample a distributed
    run wrote twice is then a duplicate), else ``{stem}_{position}``."""
    task = obj.get(keys["task"]) if "task" in keys else task
    task = tasks.TASK_ALIASES.get(task, task) if isinstance(task, str) else task
    mapping = {**RADVLM_KEYS, "reference": RADVLM_REFERENCE_KEYS.get(tasks.task_kind(task) or "", "answer"),
               **keys}
    for ours, theirs in keys.items():
        if theirs not in obj:
            raise ValueError(f"{where}: no key {theirs!r} (mapped to {ours!r} by --keys); keys: {sorted(obj)}")
    if "id" in keys:
        row_id = str(obj[keys["id"]])
    elif obj.get("id") is not None:
        row_id = str(obj["id"])
    else:
        row_id = f"{stem}_{obj['idx'] if obj.get('idx') is not None else position}"
    used = set(mapping.values()) | {"answer"}  # RadVLM's ``answer`` is a ground truth: never our answer
    row = {k: v for k, v in obj.items() if k not in used and k not in MAPPABLE}
    row.update({ours: obj[theirs] for ours, theirs in mapping.items() if ours not in ("id", "task") and theirs in obj})
    row.update(id=row_id, task=task)
    return row


def read_prediction_file(path: str | Path, default_task: str | None = None, fmt: str = "auto",
                         keys: str | dict[str, str] | None = None) -> PredictionFile:
    """Rows of a prediction file in our shape, sorted by id. ``fmt``: ``FORMATS`` (``auto``: a file whose first
    character is ``[`` is ``radvlm``; a JSONL whose first object has the answer key of the mapping and no
    ``reference`` is ``radvlm-jsonl``; else ``jsonl``). ``keys``: ``parse_keys``. The task of a RadVLM row: the
    ``task=`` key when mapped, else ``default_task`` (``--task``), else the task named in the file name (e.g.
    ``radvlm_report_generation_output.json``); none, several, or a ``--task`` contradicting the file name is
    an error asking for ``--task``."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown prediction format {fmt!r}; expected one of {FORMATS}")
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    keys = parse_keys(keys)
    text = path.read_text(encoding="utf-8")
    if fmt == "auto":
        fmt = detect_format(path, text, keys.get("answer", RADVLM_KEYS["answer"]))
    elif fmt != "radvlm" and text.lstrip().startswith("["):
        raise ValueError(f"{path}: a JSON list, not JSONL: use --format radvlm (or auto)")
    default_task = tasks.canonical_task(default_task)
    stem = path.name.removesuffix(".jsonl").removesuffix(".json")
    if fmt != "jsonl" and "task" not in keys:
        named = task_from_filename(path)
        if default_task is not None and named is not None and named != default_task:
            raise ValueError(f"{path}: --task {default_task} contradicts the task in the file name ({named})")
        default_task = default_task or named
        if default_task is None:
            raise ValueError(f"{path}: RadVLM output rows have no task and the file name names none: pass --task "
                             f"(one of {tasks.TASKS})")
    rows: dict[str, dict] = {}
    duplicates = 0
    for position, (where, obj) in enumerate(_objects(path, text, fmt)):
        if not isinstance(obj, dict):
            raise TypeError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        row = (_our_row(obj, default_task) if fmt == "jsonl"
               else _radvlm_row(obj, where, position, stem, default_task, keys))
        check_row(row, where, fmt)
        if str(row["id"]) in rows:
            duplicates += 1
        else:
            rows[str(row["id"])] = row
    used = {} if fmt == "jsonl" else {**RADVLM_KEYS, "reference": _reference_label(default_task), **keys}
    return PredictionFile(path, fmt, [rows[k] for k in sorted(rows)], duplicates, used)


def _reference_label(task: str | None) -> str:
    return RADVLM_REFERENCE_KEYS.get(tasks.task_kind(task) or "", "answer")


def check_row(row: dict, where: str, fmt: str = "jsonl") -> None:
    """``id``, ``task``, ``answer`` and ``reference`` present; the last three strings; errors name the place."""
    for key in ("id", "task", "answer", "reference"):
        if row.get(key) is None:
            hint = ""
            if key == "task":
                hint = " (set PredictionWriter's default_task or --task)"
            elif fmt != "jsonl":
                hint = " (RadVLM key mapping: see --keys)"
            raise ValueError(f"{where}: id {row.get('id')!r} has no {key!r}{hint}")
        if key != "id" and not isinstance(row[key], str):
            raise TypeError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")


def scored_answer(row: dict) -> str:
    """The answer of a prediction row that is scored: a thinking completion cut where the rewards of its task
    cut it (``task_think_split``), else the row's ``answer``."""
    if row.get("thinking") and isinstance(row.get("completion"), str):
        return answer_of(row["completion"], True, task_think_split(row["task"]))[0]
    return row["answer"]
