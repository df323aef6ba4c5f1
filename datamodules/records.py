"""RadVLM / LLaVA conversation records: reading, validation, image checks and writing.

A record file is a JSON list or a JSONL file (one object per line) of

    {"id": str, "image": "relative/or/absolute.png",
     "conversations": [{"from": "human", "value": "<image>\\nPrompt"}, {"from": "gpt", "value": "Answer"}, ...],
     "task": "report_generation", "boxes": [[x1, y1, x2, y2], ...], "labels": ["..."], ...}

(docs/paper.md §8). `load_records` turns each object into a `Record` and rejects malformed input early with a
`RecordError` that names the file, the record index and the id (and the image path for image problems).

Beyond the RadVLM format, so that bad input fails at load time rather than mid-training: roles, turn order and
the image tag are checked (`datamodules.record_parsing.parse_turns`), so are the fields (`parse_record`,
`check_boxes`) and everything `datamodules.record_checks` checks; LLaVA's normalisation of conversations and the
skipping of bad records are opt-in (`load_records`).
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
from datamodules.record_checks import FOREIGN_BOMS, MAX_NESTING, UTF8_BOM
from datamodules.record_checks import Invalid as _Invalid
from datamodules.record_parsing import (  # noqa: F401  (re-exported: the record types were part of this module)
    ASSISTANT,
    IMAGE_TAG,
    ROLE_ALIASES,
    USER,
    Record,
    Turn,
    parse_record,
)
from radvlm.tasks import BOX_TASKS, TASKS  # noqa: F401  (TASKS re-exported)

log = logging.getLogger(__name__)

GROUNDING_TASKS = BOX_TASKS  # tasks answered with boxes (radvlm.tasks is the one table)

BadRecords = Literal["error", "skip"]


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
            rec, fixes = parse_record(obj, root, normalize_conversations,
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
