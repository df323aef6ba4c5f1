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

Header: ``main.py predict`` starts each of its files with one line ``{"radvlm_prediction_header": {...}}`` naming
the model that wrote it (``model_identity``); readers skip it (``is_header``), files without one (older ones,
RadVLM's) read as before, and a file holding the headers of two models is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
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
#: the one key of a prediction file's header line (``header_line``)
HEADER_KEY = "radvlm_prediction_header"
#: what makes two headers the same model (``identity_differences``); ``settings`` is shown, not compared
IDENTITY_KEYS = ("module", "name_or_path", "weights", "checkpoint", "checkpoint_weights", "fingerprint")
#: the part of ``IDENTITY_KEYS`` that a ``--ckpt_path`` gives (known to a predict run only once it is loaded)
CHECKPOINT_KEYS = ("checkpoint", "checkpoint_weights")
#: weight files whose size and modification time identify a model folder (``weights_stamp``)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _resolved(path: str | None) -> str | None:
    """An existing local path made absolute (so ``runs/x`` and ``./runs/x`` agree); a hub id as given."""
    if path is None:
        return None
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else str(path)


def weights_stamp(path: str | None) -> str | None:
    """A short hash of the name, size and modification time of the weight files at ``path`` (a model folder's
    ``WEIGHT_SUFFIXES`` files and ``config.json``, or one checkpoint file); None when it is no local path (a hub
    id). A model retrained or re-exported at the same path gets another stamp (so does a copy whose times
    were not kept)."""
    p = Path(path).expanduser() if path else None
    if p is None or not p.exists():
        return None
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and (
        f.suffix in WEIGHT_SUFFIXES or f.name == "config.json"))
    entries = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def model_identity(module: str, name_or_path: str | None, checkpoint: str | None, settings: dict) -> dict:
    """The header of a prediction file: ``module`` (class path), ``name_or_path`` and ``checkpoint`` (absolute
    when local), ``weights`` / ``checkpoint_weights`` (``weights_stamp`` of each), ``fingerprint`` (sha256 of the
    module's settings as sorted JSON, 16 hex digits) and the ``settings`` themselves (plain values: the module's
    init arguments, ``policy.name_or_path`` left out as it is compared resolved, object addresses cut)."""
    # an object without its own repr reads "<… object at 0x7f…>": the address differs every run, the object not
    settings = json.loads(re.sub(r" at 0x[0-9a-fA-F]+", "", json.dumps(settings, sort_keys=True, default=str)))
    policy = settings.get("policy")
    if isinstance(policy, dict):
        policy.pop("name_or_path", None)
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {"module": module, "name_or_path": _resolved(name_or_path), "weights": weights_stamp(name_or_path),
            "checkpoint": _resolved(checkpoint), "checkpoint_weights": weights_stamp(checkpoint),
            "fingerprint": fingerprint, "settings": settings}


def header_line(identity: dict) -> str:
    """The header line (newline included) of a file written by the model of ``identity``."""
    return json.dumps({HEADER_KEY: identity}) + "\n"


def is_header(obj: Any) -> bool:
    """True for a parsed header line (``header_line``)."""
    return isinstance(obj, dict) and set(obj) == {HEADER_KEY}


def read_header(path: str | Path) -> dict | None:
    """The identity in the header of a prediction file; None when the file is missing, empty or has none."""
    p = Path(path)
    if not p.is_file():
        return None
    with p.open(encoding="utf-8") as f:
        first = f.readline()
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return None
    return obj[HEADER_KEY] if is_header(obj) else None


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.removesuffix("."): value}


def identity_differences(old: dict, new: dict, keys: tuple[str, ...] = IDENTITY_KEYS, limit: int = 4) -> list[str]:
    """``key: old → new`` for each of ``keys`` that differs, the fingerprint's changed settings (dotted, at most
    ``limit``) in its place; empty when ``old`` and ``new`` name the same model."""
    out = [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if k != "fingerprint" and old.get(k) != new.get(k)]
    if "fingerprint" in keys and old.get("fingerprint") != new.get("fingerprint"):
        a, b = _flat(old.get("settings") or {}), _flat(new.get("settings") or {})
        changed = [f"{k}: {a.get(k, '(absent)')!r:.60} → {b.get(k, '(absent)')!r:.60}" for k in sorted(set(a) | set(b))
                   if a.get(k, "(absent)") != b.get(k, "(absent)")]
        more = f" (+{len(changed) - limit} more)" if len(changed) > limit else ""
        out.append(f"settings (fingerprint {old.get('fingerprint')} → {new.get('fingerprint')}): "
                   + ("; ".join(changed[:limit]) + more if changed else "not recorded"))
    return out


@dataclass
class PredictionFile:
    """Rows of one prediction file in our shape, and how they were read."""

    path: Path
    format: str  # jsonl | radvlm | radvlm-jsonl
    rows: list[dict]
    duplicates: int
    keys: dict[str, str] = field(default_factory=dict)  # the mapping used (RadVLM formats)
    header: dict | None = None  # the model that wrote the file (``model_identity``); None: not recorded

    def describe(self) -> str:
        """One line for the report's notes."""
        if self.format == "jsonl":
            h = self.header
            model = (f" by {h.get('name_or_path')}" + (f" + {h['checkpoint']}" if h.get("checkpoint") else "")
                     + f" (settings {h.get('fingerprint')})") if h else " (model not recorded)"
            return f"{self.path.name}: our prediction JSONL{model}"
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


class PredictionFileMismatch(ValueError):
    """A predict resume into a file another model (or the same model with other settings) wrote."""


def resume_problem(path: Path, identity: dict, keys: tuple[str, ...] = IDENTITY_KEYS) -> str | None:
    """Why rows of ``path`` may not be continued by the model of ``identity`` (None: they may, or the file
    holds no rows): its header differs in one of ``keys`` (another model, checkpoint or settings), or the file
    names no model (written before radvlm recorded it)."""
    if not path.is_file() or not any(line.strip() for line in path.read_text(encoding="utf-8").splitlines()):
        return None
    old = read_header(path)
    if old is None:
        return f"{path} does not name the model that wrote it (written before radvlm recorded it)"
    diff = identity_differences(old, identity, keys)
    return f"{path} was written by another model or other settings: {'; '.join(diff)}" if diff else None


def _first_object(text: str) -> Any:
    """The first object of a JSONL text that is not a header; None when the first such line does not parse."""
    for line in text.splitlines():
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return None
            if not is_header(obj):
                return obj
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
    header: tuple[str, dict] | None = None
    objects = _objects(path, text, fmt)
    for where, obj in objects:
        if not is_header(obj):
            continue
        if header is not None and identity_differences(header[1], obj[HEADER_KEY]):
            raise ValueError(f"{where}: this file holds the predictions of two models (headers at {header[0]} and "
                             f"here differ: {'; '.join(identity_differences(header[1], obj[HEADER_KEY]))}); "
                             f"score each model's file on its own")
        header = header or (where, obj[HEADER_KEY])
    objects = [(where, obj) for where, obj in objects if not is_header(obj)]
    for position, (where, obj) in enumerate(objects):
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
    return PredictionFile(path, fmt, [rows[k] for k in sorted(rows)], duplicates, used,
                          header[1] if header else None)


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
