"""Synthesise ``<think>`` traces for RadVLM records with a teacher model (data for the thinking cold start).

``python -m radvlm_tools.synthesize_thinking IN.json OUT.jsonl --endpoint http://host:8000/v1 --model NAME`` (an
OpenAI-compatible server, e.g. a 235B Qwen3-VL under vLLM) or ``--teacher-model PATH`` (a local checkpoint;
``radvlm_tools.teachers``). A written record is the input record with ``" /think"`` appended to its final user
prompt and its final assistant turn = ``make_thinking_answer(trace, ORIGINAL answer)`` (``radvlm.chat``): it
loads with ``load_records`` and trains with the ordinary SFT collator.

The paper's two strategies: ``show_answer=True`` shows the ground-truth answer and the teacher writes the
reasoning leading to it; hidden, the teacher answers alone and the trace is kept only when its answer agrees
with the ground truth (``answers_agree``; boxes and IoU are ``metrics.boxes``'). Responses are checked
(``check_response``), written record by record and resumable (``synthesize``).

Not in the paper: only the FINAL user prompt gets ``" /think"`` (a ``/think`` prompt answered without thinking
would teach exactly that); records get a ``thinking_source`` key; image paths are written relative to the
output's folder; rejected and failed records go to ``OUT.failures.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol

from datamodules.records import load_records
from metrics.boxes import pairwise_iou
from metrics.boxes import parse_boxes as metric_boxes
from radvlm.chat import (
    THINK_CLOSE,
    THINK_OPEN,
    THINK_SUFFIX,
    make_thinking_answer,
    make_thinking_prompt,
    split_thinking,
)
from radvlm_tools.teachers import (  # re-exported: ``from radvlm_tools.synthesize_thinking import EndpointTeacher`` works
    EndpointTeacher,
    PermanentError,
    PolicyTeacher,
    Teacher,
    TeacherRequest,
    Truncated,
    image_data_url,  # noqa: F401 (re-exported)
)

SHOW_ANSWER_TEMPLATE = (
    "{prompt}\n\n"
    "The correct answer is:\n{answer}\n\n"
    "Write the reasoning a radiologist would follow, looking at this image, to arrive at exactly this answer. "
    "Reason from what is visible in the image and do not mention that the answer was given to you. "
    "Reply in this format:\n<think>\nyour step-by-step reasoning\n</think>\n\nthe answer above"
)
HIDDEN_TEMPLATE = (
    "{prompt}\n\n"
    "Think step by step about what is visible in the image before answering. Reply in this format:\n"
    "<think>\nyour step-by-step reasoning\n</think>\n\nyour final answer"
)
#: with the answer shown, a trace that refers to it would teach the student to cite an answer it never sees
LEAK_PHRASES = ("correct answer", "the answer above", "given answer", "provided answer", "answer was given",
                "answer provided", "answer given")
ACCEPT_MODES = ("any", "exact", "iou", "auto")
MAX_BACKOFF_S = 60.0


class RecordLike(Protocol):
    """What ``synthesize`` needs of a record (``datamodules.records.Record`` has it)."""

    id: str
    image: Path | None
    conversations: list  # of objects with .role ("user" | "assistant") and .text

    def to_dict(self) -> dict[str, Any]: ...


# ------------------------------------------------------------------------------------------ answer checks


def parse_boxes(text: str, scale: float = 1.0) -> list[list[float]]:
    """Every ``[a, b, c, d]`` of four numbers (``metrics.boxes.parse_boxes``, the reward's parser), divided
    by ``scale``. ``"at [0.1, 0.2, 0.3, 0.4] and [1e-1, 0, .5, 1]"`` → ``[[0.1, 0.2, 0.3, 0.4], [0.1, 0, 0.5, 1]]``."""
    return [[float(v) / scale for v in box] for box in metric_boxes(text)]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes (``metrics.boxes.pairwise_iou``)."""
    return float(pairwise_iou([a], [b])[0, 0])


def boxes_match(pred: Sequence[Sequence[float]], gt: Sequence[Sequence[float]], threshold: float) -> bool:
    """Equal counts and a one-to-one pairing with every pair's IoU >= ``threshold`` (augmenting paths)."""
    if len(pred) != len(gt):
        return False
    ok = [[box_iou(p, g) >= threshold for g in gt] for p in pred]  # (P, G)
    owner: list[int | None] = [None] * len(gt)  # gt j → pred index

    def place(i: int, seen: set[int]) -> bool:
        for j in range(len(gt)):
            if ok[i][j] and j not in seen:
                seen.add(j)
                if owner[j] is None or place(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return all(place(i, set()) for i in range(len(pred)))


def normalise_answer(text: str) -> str:
    """``"  The Heart\\n is enlarged. "`` → ``"the heart is enlarged"``."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def answers_agree(pred: str, gt: str, accept: str, iou_threshold: float = 0.5, box_scale: float = 1.0) -> bool:
    """Whether the teacher's answer ``pred`` agrees with the ground truth ``gt`` under ``accept``: ``any``
    (format only; the default when the answer is shown), ``exact`` (equal after lower-casing, collapsing spaces,
    dropping a final period), ``iou`` (the ``[a, b, c, d]`` boxes of both answers pair one-to-one with IoU >=
    ``iou_threshold``, equal counts; teacher boxes divided by ``box_scale``, 1000 for Qwen3-VL's native 0-1000
    grid), ``auto`` (``iou`` when the ground truth holds a box, else ``exact``; the default when hidden)."""
    if accept not in ACCEPT_MODES:
        raise ValueError(f"accept must be one of {ACCEPT_MODES}, got {accept!r}")
    if accept == "any":
        return True
    gt_boxes = parse_boxes(gt)
    if accept == "iou" or (accept == "auto" and gt_boxes):
        return boxes_match(parse_boxes(pred, box_scale), gt_boxes, iou_threshold)
    return normalise_answer(pred) == normalise_answer(gt)


def check_response(text: str, gt: str, accept: str = "any", iou_threshold: float = 0.5,
                   box_scale: float = 1.0, leak_phrases: Sequence[str] = ()) -> tuple[str | None, str]:
    """``(trace, "")`` for a usable response, ``(None, reason)`` otherwise. Usable: ``TRACE</think>ANSWER`` with a
    non-empty trace and answer and one think block (``split_thinking``; the opening ``<think>`` may be missing,
    as Qwen3 thinking templates put it in the prompt), not cut at the token limit (``Truncated``), an answer
    that agrees with ``gt`` (``answers_agree``) and no ``leak_phrases`` (lower case) in the trace."""
    if isinstance(text, Truncated):
        return None, "truncated at the token limit"
    thoughts, answer, closed = split_thinking(text)
    if not closed:
        return None, f"no {THINK_CLOSE}"
    if THINK_OPEN in thoughts or THINK_CLOSE in thoughts:
        return None, "several think blocks"
    if not thoughts:
        return None, "empty trace"
    if not answer:
        return None, f"no answer after {THINK_CLOSE}"
    if any(phrase in thoughts.lower() for phrase in leak_phrases):
        return None, "trace mentions the shown answer"
    if not answers_agree(answer, gt, accept, iou_threshold, box_scale):
        return None, f"answer disagrees ({accept})"
    return thoughts, ""


# ------------------------------------------------------------------------------------- records ↔ requests


def original_answer(record: RecordLike) -> str:
    """The record's final answer, without a think block it may already carry."""
    text = record.conversations[-1].text
    return split_thinking(text)[1] if THINK_CLOSE in text else text


def _strip_think_suffix(prompt: str) -> str:
    stripped = prompt.rstrip()
    return stripped[: -len(THINK_SUFFIX.strip())].rstrip() if stripped.endswith(THINK_SUFFIX.strip()) else prompt


def build_request(record: RecordLike, show_answer: bool, template: str | None = None) -> TeacherRequest:
    """The teacher's conversation: turns before the final exchange, then the final prompt (without
    ``/think``) wrapped in ``template`` (``{prompt}``, and ``{answer}`` when the answer is shown)."""
    turns = [(t.role, t.text) for t in record.conversations]
    if len(turns) < 2 or turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise ValueError(f"record {record.id!r}: the conversation must end with a user turn then an assistant turn")
    template = template or (SHOW_ANSWER_TEMPLATE if show_answer else HIDDEN_TEMPLATE)
    text = template.replace("{prompt}", _strip_think_suffix(turns[-2][1]))
    if show_answer:
        text = text.replace("{answer}", original_answer(record))
    return TeacherRequest(str(record.id), record.image, tuple(turns[:-2]) + (("user", text),))


def thinking_record(record: RecordLike, trace: str, out_dir: Path | None = None,
                    source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record as a RadVLM dict: final prompt + ``" /think"``, final answer = trace + original answer."""
    out = record.to_dict()
    conv = out["conversations"]
    last_user = max(i for i, t in enumerate(conv) if t["from"] in ("human", "user"))
    conv[last_user]["value"] = make_thinking_prompt(conv[last_user]["value"])
    conv[-1]["value"] = make_thinking_answer(trace, original_answer(record))
    if record.image is not None and out_dir is not None:
        out["image"] = Path(os.path.relpath(Path(record.image).resolve(), out_dir.resolve())).as_posix()
    if source is not None:
        out["thinking_source"] = source
    return out



# ------------------------------------------------------------------------------------------- the driver


def complete_with_retries(teacher: Teacher, requests: Sequence[TeacherRequest], retries: int,
                          timeout: float | None, backoff: float,
                          sleep: Callable[[float], None] = time.sleep) -> list[tuple[str | Exception, int]]:
    """``(response or last error, attempts)`` per request; exceptions other than ``PermanentError`` are
    retried after ``backoff · 2^(k-1)`` seconds (k = retry number, capped at ``MAX_BACKOFF_S``)."""
    results: dict[int, tuple[str | Exception, int]] = {}
    pending = list(range(len(requests)))
    for attempt in range(retries + 1):
        if attempt:
            sleep(min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_S))
        try:
            out = teacher.complete([requests[i] for i in pending], timeout=timeout)
            if len(out) != len(pending):
                raise RuntimeError(f"teacher returned {len(out)} responses for {len(pending)} requests")
        except Exception as e:
            out = [e] * len(pending)
        retry = []
        for i, res in zip(pending, out):
            results[i] = (res, attempt + 1)
            if isinstance(res, Exception) and not isinstance(res, PermanentError):
                retry.append(i)
        pending = retry
        if not pending:
            break
    return [results[i] for i in range(len(requests))]


def _bounded_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """``fn(item)`` on ``workers`` threads, at most ``2·workers`` in flight, results in completion order."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teacher")
    items = iter(items)
    inflight: set = set()
    try:
        while True:
            for item in items:
                inflight.add(pool.submit(fn, item))
                if len(inflight) >= 2 * workers:
                    break
            if not inflight:
                return
            done, inflight = wait(inflight, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def failures_path(out_path: str | Path) -> Path:
    """``thinking.jsonl`` → ``thinking.failures.jsonl``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".failures.jsonl")


def done_ids(out_path: str | Path) -> set[str]:
    """Ids already in a partial JSONL output. Text after the last newline (a line cut short when the previous
    run stopped) is removed from the file; a broken line elsewhere is an error naming the file and line."""
    path = Path(out_path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    ids: set[str] = set()
    for n, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: line {n} is not a record with an 'id' ({e}); fix or remove it") from e
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    return ids


def synthesize(records: Sequence[RecordLike], teacher: Teacher, out_path: str | Path, show_answer: bool = True,
               workers: int = 4, retries: int = 3, timeout: float = 60.0, backoff: float = 1.0,
               accept: str | None = None, iou_threshold: float = 0.5, box_scale: float = 1.0,
               template: str | None = None, reject_leaks: bool = True, max_consecutive_failures: int = 50,
               progress: bool = True) -> dict[str, Any]:
    """Write thinking versions of ``records`` to ``out_path`` (JSONL, appended; resumes); return counts
    ``{"total", "skipped", "written", "rejected", "failed", "reasons"}``.

    Batches of ``teacher.batch_size`` requests (1 for an endpoint) on ``workers`` threads (1 for a local
    model); a request that raises is retried ``retries`` times after ``backoff · 2^k`` s (at most 60) unless the
    error is a ``PermanentError`` (HTTP 4xx but 408/429, unreadable image). The output is appended and flushed
    record by record, in completion order; a rerun skips ids already written and retries the rest.
    ``failures_path(out_path)`` is rewritten by each run with its rejected and failed records (id, kind,
    reason, attempts). ``max_consecutive_failures`` failures in a row (a dead server) stop the run; what was
    written stays. With the answer shown, ``reject_leaks`` rejects traces citing it (``LEAK_PHRASES``)."""
    from tqdm.auto import tqdm

    out_path = Path(out_path)
    if out_path.suffix.lower() != ".jsonl":
        raise ValueError(f"{out_path}: the output must be .jsonl (written incrementally, resumable)")
    accept = accept or ("any" if show_answer else "auto")
    if accept not in ACCEPT_MODES:
        raise ValueError(f"accept must be one of {ACCEPT_MODES}, got {accept!r}")
    if template is not None and ("{prompt}" not in template or show_answer != ("{answer}" in template)):
        raise ValueError("template must contain {prompt}, and {answer} exactly when the answer is shown")
    seen: set[str] = set()
    for r in records:
        if str(r.id) in seen:
            raise ValueError(f"duplicate record id {r.id!r}: ids identify records when resuming")
        seen.add(str(r.id))

    done = done_ids(out_path)
    todo = [r for r in records if str(r.id) not in done]
    by_id = {str(r.id): r for r in todo}
    counts: dict[str, Any] = {"total": len(records), "skipped": len(records) - len(todo), "written": 0,
                              "rejected": 0, "failed": 0}
    reasons: Counter = Counter()
    leak_phrases = LEAK_PHRASES if show_answer and reject_leaks else ()
    source = {"teacher": teacher.name, "strategy": "show_answer" if show_answer else "hidden"}
    size = max(1, int(teacher.batch_size))
    threads = max(1, min(workers, teacher.max_workers or workers))
    batches = (todo[i : i + size] for i in range(0, len(todo), size))

    def run(batch: list) -> list[tuple[Any, str | Exception, int]]:
        requests, results = [], []
        for r in batch:
            try:
                requests.append(build_request(r, show_answer, template))
            except ValueError as e:
                results.append((r, PermanentError(str(e)), 0))
        answered = complete_with_retries(teacher, requests, retries, timeout, backoff)
        return results + [(by_id[q.id], res, n) for q, (res, n) in zip(requests, answered)]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    streak = 0
    with open(out_path, "a", encoding="utf-8") as out, \
            open(failures_path(out_path), "w", encoding="utf-8") as log, \
            closing(_bounded_map(run, batches, threads)) as stream, \
            tqdm(total=len(todo), desc="thinking traces", disable=not progress) as bar:
        for results in stream:
            for record, res, attempts in results:
                bar.update(1)
                if isinstance(res, Exception):
                    kind, reason, trace = "failed", f"{type(res).__name__}: {res}", None
                else:
                    trace, reason = check_response(res, original_answer(record), accept, iou_threshold, box_scale,
                                                   leak_phrases)
                    kind = "rejected"
                if trace is not None:
                    row = thinking_record(record, trace, out_path.parent, source)
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    out.flush()
                    counts["written"] += 1
                    streak = 0
                    continue
                counts[kind] += 1
                reasons[reason if kind == "rejected" else type(res).__name__] += 1
                entry = {"id": str(record.id), "kind": kind, "reason": reason, "attempts": attempts}
                if kind == "rejected":
                    entry["response"] = res[:1000]
                log.write(json.dumps(entry, ensure_ascii=False) + "\n")
                log.flush()
                streak = streak + 1 if kind == "failed" else 0
                if streak >= max_consecutive_failures:
                    raise RuntimeError(f"{streak} records in a row failed (last: {reason}); stopping. "
                                       f"{counts['written']} written to {out_path}; rerun to resume")
            bar.set_postfix(written=counts["written"], rejected=counts["rejected"], failed=counts["failed"])
    counts["reasons"] = dict(reasons)
    return counts


def format_summary(counts: dict[str, Any]) -> str:
    line = ("total {total}: written {written}, rejected {rejected}, failed {failed}, "
            "skipped (already written) {skipped}").format(**counts)
    top = sorted(counts.get("reasons", {}).items(), key=lambda kv: -kv[1])[:5]
    return line + "".join(f"\n  {n} × {reason}" for reason, n in top)


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m radvlm_tools.synthesize_thinking",
                                description=__doc__.splitlines()[0])
    p.add_argument("input", help="RadVLM records (.json list or .jsonl)")
    p.add_argument("output", help="output .jsonl (appended; a rerun resumes)")
    teacher = p.add_mutually_exclusive_group(required=True)
    teacher.add_argument("--teacher-model", help="checkpoint folder or hub id for Policy.from_pretrained")
    teacher.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    p.add_argument("--model", help="model name on the endpoint")
    p.add_argument("--api-key-env", help="environment variable holding the endpoint's API key")
    p.add_argument("--show-answer", action=argparse.BooleanOptionalAction, default=True,
                   help="show the ground-truth answer to the teacher (default) or hide it (--no-show-answer)")
    p.add_argument("--hidden", dest="show_answer", action="store_false", help="same as --no-show-answer")
    p.add_argument("--accept", choices=ACCEPT_MODES, help="answer check (default: any if shown, auto if hidden)")
    p.add_argument("--iou-threshold", type=float, default=0.5)
    p.add_argument("--box-scale", type=float, default=1.0, help="teacher box units per image side (1000: 0-1000)")
    p.add_argument("--template-file", help="teacher instruction with {prompt} (and {answer} when shown)")
    p.add_argument("--workers", type=int, default=8, help="concurrent endpoint requests")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (local model)")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per endpoint request")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="teacher response budget (paper: 4096)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default=None, help="local model dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--device", default=None, help="local model device (default cuda when available)")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the input's folder)")
    p.add_argument("--max-consecutive-failures", type=int, default=50)
    p.add_argument("--no-progress", action="store_true")
    return p


def make_teacher(args: argparse.Namespace) -> Teacher:
    if args.endpoint:
        if not args.model:
            raise SystemExit("--endpoint needs --model (the served model name)")
        key = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                raise SystemExit(f"--api-key-env {args.api_key_env}: that environment variable is not set")
        return EndpointTeacher(args.endpoint, args.model, api_key=key, max_tokens=args.max_new_tokens,
                               temperature=args.temperature)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return PolicyTeacher.from_pretrained(args.teacher_model, dtype=dtype, device=device,
                                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                         temperature=args.temperature)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    records = load_records(args.input, image_root=args.image_root)
    template = Path(args.template_file).read_text(encoding="utf-8") if args.template_file else None
    counts = synthesize(
        records, make_teacher(args), args.output, show_answer=args.show_answer, workers=args.workers,
        retries=args.retries, timeout=args.timeout, backoff=args.backoff, accept=args.accept,
        iou_threshold=args.iou_threshold, box_scale=args.box_scale, template=template,
        max_consecutive_failures=args.max_consecutive_failures, progress=not args.no_progress,
    )
    print(format_summary(counts))
    print(f"output: {args.output}; failures: {failures_path(args.output)}")
    return counts


if __name__ == "__main__":
    main()
