"""Tests of radvlm_tools.synthesize_thinking: answer checks, written records, resume, the local-model teacher on the
tiny checkpoint, and the endpoint teacher against an OpenAI-compatible server on 127.0.0.1 (retries,
timeouts, failure log, rerun)."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.records import load_records, save_records
from radvlm.chat import split_thinking
from radvlm.tiny import write_tiny_checkpoint
from radvlm_tools.synthesize_thinking import (
    LEAK_PHRASES,
    EndpointTeacher,
    PermanentError,
    PolicyTeacher,
    TeacherRequest,
    Truncated,
    box_iou,
    boxes_match,
    build_request,
    check_response,
    complete_with_retries,
    done_ids,
    failures_path,
    image_data_url,
    main,
    parse_boxes,
    synthesize,
)

GT_BOX_ANSWER = "The nodule is located at the coordinates [0.10, 0.20, 0.30, 0.40] on the image."


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


def _png(path: Path, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((48, 64), value, dtype=np.uint8), mode="L").save(path)
    return path


def _record(rid: str, prompt: str, answer: str, image: str | None = "images/{id}.png", **extra) -> dict:
    first = f"<image>\n{prompt}" if image else prompt
    out = {"id": rid, "conversations": [{"from": "human", "value": first}, {"from": "gpt", "value": answer}]}
    if image:
        out["image"] = image.format(id=rid)
    return {**out, **extra}


@pytest.fixture
def records_file(tmp_path) -> Path:
    """Four records: report, grounding (with boxes), a two-exchange conversation, a text-only question."""
    for i, rid in enumerate(["rep", "box", "conv"]):
        _png(tmp_path / "images" / f"{rid}.png", 40 * (i + 1))
    conv = _record("conv", "Is there an effusion?", "Yes, on the left.")
    conv["conversations"] += [{"from": "human", "value": "How large is it? case conv /think"},
                              {"from": "gpt", "value": "<think>\nold trace\n</think>\n\nIt is small."}]
    rows = [
        _record("rep", "Write a radiology report for this Chest X-ray. case rep", "The heart is enlarged.",
                task="report_generation"),
        _record("box", "Locate the nodule. case box", GT_BOX_ANSWER, task="abnormality_grounding",
                boxes=[[0.1, 0.2, 0.3, 0.4]]),
        conv,
        _record("txt", "What does cardiomegaly mean? case txt", "An enlarged heart.", image=None),
    ]
    return save_records(rows, tmp_path / "records.json")


class ScriptedTeacher:
    """Replies from a script {id: [response or exception, ...]} (last entry repeats); records every call."""

    def __init__(self, script: dict, batch_size: int = 1, max_workers: int | None = None, delay: float = 0.0):
        self.script, self.batch_size, self.max_workers, self.delay = script, batch_size, max_workers, delay
        self.name = "scripted"
        self.calls: list[list] = []
        self.lock = threading.Lock()
        self.active = self.max_active = 0

    def complete(self, requests, timeout=None):
        with self.lock:
            self.calls.append(list(requests))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            tried = [sum(q.id == r.id for call in self.calls for q in call) for r in requests]
        time.sleep(self.delay)
        with self.lock:
            self.active -= 1
        return [self.script[r.id][min(n, len(self.script[r.id])) - 1] for r, n in zip(requests, tried)]


def _valid(rid: str, answer: str = "whatever the teacher says") -> str:
    return f"<think>\nReasoning about {rid}.\n</think>\n\n{answer}"


# --------------------------------------------------------------------------------------- pure answer checks


def test_box_iou_hand_values():
    # [0,0,2,2] ∩ [1,1,3,3] = 1·1 = 1; union 4 + 4 - 1 = 7
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7, abs=1e-12)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0  # disjoint
    assert box_iou([0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]) == 0.0  # union 0
    assert box_iou([1, 1, 0, 0], [0, 0, 1, 1]) == 0.0  # inverted box: area clamped to 0, intersection 0


def test_parse_boxes_reads_signs_exponents_scale_and_skips_bad_groups():
    text = "at [0.1, 2e-1, .3, 4E-1], [1, 2, 3], [1e999, 0, 0, 1] and [-0.5, +0.5, 1, 1]."
    assert parse_boxes(text) == [[0.1, 0.2, 0.3, 0.4], [-0.5, 0.5, 1.0, 1.0]]
    assert parse_boxes("[100, 200, 300, 400]", scale=1000) == [[0.1, 0.2, 0.3, 0.4]]


def test_boxes_match_needs_a_one_to_one_pairing():
    gt = [[0, 0, 0.5, 0.5], [0, 0, 0.6, 0.6]]
    # pred0 = [0,0,.55,.55]: IoU .25/.3025 = .826 with gt0, .3025/.36 = .840 with gt1
    # pred1 = [0,0,.45,.45]: IoU .2025/.25 = .81 with gt0, .2025/.36 = .5625 with gt1
    # at 0.7 pred1 only fits gt0, so pred0 must move from gt0 to gt1 (an augmenting path)
    pred = [[0, 0, 0.55, 0.55], [0, 0, 0.45, 0.45]]
    assert boxes_match(pred, gt, 0.7)
    assert not boxes_match(pred, gt, 0.83)  # pred1 then fits nothing (.81 < .83)
    assert not boxes_match([[0, 0, 0.45, 0.45], [0, 0, 0.46, 0.46]], gt, 0.7)  # both only fit gt0
    assert not boxes_match(pred[:1], gt, 0.1)  # counts differ
    assert boxes_match([], [], 0.5)


@pytest.mark.parametrize(
    "text, gt, accept, expected",
    [
        ("<think>\nlook\n</think>\n\nanswer", "x", "any", ("look", "")),
        ("look</think>answer", "x", "any", ("look", "")),  # opening tag in the template's prompt
        ("no tags at all", "x", "any", (None, "no </think>")),
        ("<think>\n</think>answer", "x", "any", (None, "empty trace")),
        ("<think>t</think>   ", "x", "any", (None, "no answer after </think>")),
        ("<think>a</think>b<think>c</think>d", "x", "any", (None, "several think blocks")),
        ("<think>t</think>The heart is  Enlarged", "The heart is enlarged.", "exact", ("t", "")),
        ("<think>t</think>Normal heart.", "The heart is enlarged.", "exact", (None, "answer disagrees (exact)")),
        # IoU with [.1,.2,.3,.4]: [.11,.2,.3,.4] → (.19·.2)/(.2·.2) = .95 ≥ .5
        ("<think>t</think>It is at [0.11, 0.20, 0.30, 0.40].", GT_BOX_ANSWER, "auto", ("t", "")),
        ("<think>t</think>It is at [0.50, 0.50, 0.70, 0.70].", GT_BOX_ANSWER, "auto", (None, "answer disagrees (auto)")),
        ("<think>t</think>No nodule.", GT_BOX_ANSWER, "iou", (None, "answer disagrees (iou)")),
        (Truncated("<think>t</think>The heart"), "x", "any", (None, "truncated at the token limit")),
    ],
)
def test_check_response_accepts_only_a_closed_trace_with_an_agreeing_answer(text, gt, accept, expected):
    assert check_response(text, gt, accept) == expected


def test_shown_answer_traces_that_cite_the_answer_are_rejected():
    text = "<think>The correct answer says effusion, so the angle is blunted.</think>Effusion."
    assert check_response(text, "x", leak_phrases=LEAK_PHRASES) == (None, "trace mentions the shown answer")
    assert check_response(text, "x")[0] is not None  # hidden strategy: no leak check


def test_retries_back_off_exponentially_up_to_the_cap():
    class Down:
        batch_size, max_workers, name = 1, None, "down"

        def complete(self, requests, timeout=None):
            return [ConnectionError("refused") for _ in requests]

    req = TeacherRequest("a", None, (("user", "q"),))
    for backoff, expected in [(1.0, [1.0, 2.0, 4.0]), (40.0, [40.0, 60.0, 60.0])]:  # 80, 160 capped at 60
        slept: list[float] = []
        [(error, attempts)] = complete_with_retries(Down(), [req], 3, None, backoff, sleep=slept.append)
        assert slept == expected and attempts == 4 and isinstance(error, ConnectionError)


def test_check_response_divides_teacher_boxes_by_box_scale():
    text = "<think>t</think>[110, 200, 300, 400]"  # /1000 → IoU .95 with the ground truth box
    assert check_response(text, GT_BOX_ANSWER, "auto", box_scale=1000.0) == ("t", "")
    assert check_response(text, GT_BOX_ANSWER, "auto")[0] is None


def test_build_request_shows_the_answer_only_when_asked(records_file):
    recs = {r.id: r for r in load_records(records_file)}
    shown = build_request(recs["rep"], show_answer=True)
    hidden = build_request(recs["rep"], show_answer=False)
    assert shown.turns[-1][0] == "user" and "The heart is enlarged." in shown.turns[-1][1]
    assert "The heart is enlarged." not in hidden.turns[-1][1]
    assert hidden.turns[-1][1].startswith("Write a radiology report for this Chest X-ray. case rep\n\n")
    conv = build_request(recs["conv"], show_answer=True)
    # earlier exchange kept verbatim; the final prompt loses " /think"; a think block in the answer is dropped
    assert conv.turns[:2] == (("user", "Is there an effusion?"), ("assistant", "Yes, on the left."))
    assert conv.turns[2][1].startswith("How large is it? case conv\n\n") and " /think" not in conv.turns[2][1]
    assert "It is small." in conv.turns[2][1] and "old trace" not in conv.turns[2][1]
    assert conv.image == recs["conv"].image


# ------------------------------------------------------------------------------------ synthesize (scripted)


def test_synthesize_writes_thinking_records_that_load(records_file, tmp_path):
    recs = load_records(records_file)
    teacher = ScriptedTeacher({r.id: [_valid(r.id)] for r in recs}, batch_size=3)
    out = tmp_path / "out" / "thinking.jsonl"
    counts = synthesize(recs, teacher, out, workers=2, progress=False)
    assert {k: counts[k] for k in ("total", "written", "rejected", "failed", "skipped")} == \
        {"total": 4, "written": 4, "rejected": 0, "failed": 0, "skipped": 0}
    assert failures_path(out).read_text() == ""
    written = {r.id: r for r in load_records(out)}  # relative image paths resolve from out/
    # the ORIGINAL answers are kept, not the teacher's ("conv" already had a trace: its answer part)
    answers = {"rep": "The heart is enlarged.", "box": GT_BOX_ANSWER, "conv": "It is small.",
               "txt": "An enlarged heart."}
    for orig in recs:
        new = written[orig.id]
        assert (new.image, new.task, new.boxes) == (orig.image, orig.task, orig.boxes)
        assert new.conversations[-2].text.endswith(" /think")
        assert split_thinking(new.answer) == (f"Reasoning about {orig.id}.", answers[orig.id], True)
        assert new.extra["thinking_source"] == {"teacher": "scripted", "strategy": "show_answer"}
    assert written["rep"].answer == "<think>\nReasoning about rep.\n</think>\n\nThe heart is enlarged."
    # only the final prompt of the conversation is marked; its earlier turns are unchanged
    assert [t.text for t in written["conv"].conversations[:3]] == [
        "Is there an effusion?", "Yes, on the left.", "How large is it? case conv /think"]
    assert written["conv"].answer.endswith("\n</think>\n\nIt is small.")
    # two workers write in completion order, and "txt" has no image: look the line up by id
    lines = {row["id"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert lines["rep"]["image"].startswith("../images/") and "image" not in lines["txt"]


def test_hidden_strategy_keeps_only_agreeing_answers_and_logs_the_rest(records_file, tmp_path):
    recs = load_records(records_file)
    teacher = ScriptedTeacher({
        "rep": [_valid("rep", "The heart is enlarged")],  # exact after normalisation
        "box": [_valid("box", "At [0.50, 0.50, 0.70, 0.70].")],  # IoU 0 → rejected
        "conv": ["I think it is small."],  # no </think> → rejected
        "txt": [PermanentError("HTTP 400: bad request")],  # failed, not retried
    })
    out = tmp_path / "hidden.jsonl"
    counts = synthesize(recs, teacher, out, show_answer=False, retries=3, backoff=0.0, progress=False)
    assert (counts["written"], counts["rejected"], counts["failed"]) == (1, 2, 1)
    assert counts["reasons"] == {"answer disagrees (auto)": 1, "no </think>": 1, "PermanentError": 1}
    log = {e["id"]: e for e in map(json.loads, failures_path(out).read_text().splitlines())}
    assert log["box"]["kind"] == "rejected" and log["box"]["response"].endswith("At [0.50, 0.50, 0.70, 0.70].")
    assert log["txt"] == {"id": "txt", "kind": "failed", "reason": "PermanentError: HTTP 400: bad request",
                          "attempts": 1}
    assert [r.id for r in load_records(out)] == ["rep"]
    assert all("The heart is enlarged" not in q.turns[-1][1] for call in teacher.calls for q in call)


def test_rerun_skips_written_ids_and_repairs_a_truncated_last_line(records_file, tmp_path):
    recs = load_records(records_file)
    out = tmp_path / "thinking.jsonl"
    synthesize(recs, ScriptedTeacher({r.id: [_valid(r.id)] for r in recs}), out, progress=False)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # crash while writing line 4
    lost = json.loads(lines[3])["id"]
    teacher = ScriptedTeacher({r.id: [_valid(r.id)] for r in recs})
    counts = synthesize(recs, teacher, out, progress=False)
    assert (counts["skipped"], counts["written"]) == (3, 1)
    assert [q.id for call in teacher.calls for q in call] == [lost]
    assert sorted(r.id for r in load_records(out)) == sorted(r.id for r in recs)


def test_done_ids_names_a_broken_line_in_the_middle(tmp_path):
    out = tmp_path / "x.jsonl"
    out.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl: line 2 is not a record"):
        done_ids(out)
    out.write_text('{"id": "a"}\n{"id": "b", "conv')  # cut short while writing: removed
    assert done_ids(out) == {"a"} and out.read_text() == '{"id": "a"}\n'


def test_workers_bound_concurrency_and_a_local_teacher_gets_one_thread(tmp_path):
    rows = [_record(f"r{i}", "question", "answer", image=None) for i in range(9)]
    recs = load_records(save_records(rows, tmp_path / "nine.jsonl"))
    threaded = ScriptedTeacher({r.id: [_valid(r.id)] for r in recs}, delay=0.1)
    synthesize(recs, threaded, tmp_path / "a.jsonl", workers=3, progress=False)
    single = ScriptedTeacher({r.id: [_valid(r.id)] for r in recs}, max_workers=1, delay=0.01)
    synthesize(recs, single, tmp_path / "b.jsonl", workers=3, progress=False)
    assert (threaded.max_active, single.max_active) == (3, 1)


def test_synthesize_refuses_bad_arguments(records_file, tmp_path):
    recs = load_records(records_file)
    teacher = ScriptedTeacher({})
    with pytest.raises(ValueError, match="must be .jsonl"):
        synthesize(recs, teacher, tmp_path / "out.json", progress=False)
    with pytest.raises(ValueError, match="accept must be one of"):
        synthesize(recs, teacher, tmp_path / "out.jsonl", accept="fuzzy", progress=False)
    with pytest.raises(ValueError, match="duplicate record id 'rep'"):
        synthesize(recs + recs[:1], teacher, tmp_path / "out.jsonl", progress=False)


# ---------------------------------------------------------------------------------- local model teacher


def test_policy_teacher_on_the_tiny_checkpoint_counts_every_record(tiny_checkpoint, records_file, tmp_path):
    recs = load_records(records_file)
    teacher = PolicyTeacher.from_pretrained(tiny_checkpoint, batch_size=3, max_new_tokens=12)
    texts = teacher.complete([build_request(r, True) for r in recs])
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    Path(recs[1].image).write_bytes(b"not a png")  # broken after loading: only this record may fail
    out = tmp_path / "tiny.jsonl"
    counts = synthesize(recs, teacher, out, workers=4, retries=2, backoff=0.0, progress=False)
    assert counts["failed"] == 1 and counts["written"] + counts["rejected"] == 3
    log = [json.loads(x) for x in failures_path(out).read_text().splitlines()]
    failed = [e for e in log if e["kind"] == "failed"]
    # an unreadable image is permanent: one attempt, no retries
    assert [(e["id"], e["attempts"]) for e in failed] == [("box", 1)] and "image" in failed[0]["reason"]
    assert sum(e["kind"] == "rejected" for e in log) == counts["rejected"]
    assert len(load_records(out, check_images=False)) == counts["written"]


def test_policy_teacher_maps_completions_to_their_records_and_rejects_truncated_ones(tiny_checkpoint,
                                                                                     records_file, tmp_path):
    recs = load_records(records_file)
    teacher = PolicyTeacher.from_pretrained(tiny_checkpoint, batch_size=4, max_new_tokens=4)
    real_generate = teacher.policy.generate

    def scripted_generate(batch, **kwargs):  # the real call on the real batch, then scripted texts
        out = real_generate(batch, **kwargs)
        assert out.completion_ids.shape == (4, 4) and kwargs["do_sample"] is False
        out.texts = [_valid(rid, "teacher answer") for rid in batch["ids"]]
        out.truncated = torch.tensor([rid == "conv" for rid in batch["ids"]])
        return out

    teacher.policy.generate = scripted_generate
    out = tmp_path / "mapped.jsonl"
    counts = synthesize(recs, teacher, out, progress=False)
    assert (counts["written"], counts["rejected"]) == (3, 1)
    assert counts["reasons"] == {"truncated at the token limit": 1}
    for rec in load_records(out):
        assert split_thinking(rec.answer)[0] == f"Reasoning about {rec.id}."


# ------------------------------------------------------------------------------------ endpoint teacher


class FakeOpenAI(ThreadingHTTPServer):
    """``/v1/chat/completions`` whose behaviour per case (the ``case ID`` in the last user text) follows
    ``plan[ID]``: "ok", "split" (vLLM reasoning_content), "500", "400" or "slow" (sleeps 1 s)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.plan: dict[str, list[str]] = {}
        self.seen: list[tuple[str, dict, dict]] = []  # (case, headers, payload)
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        last = payload["messages"][-1]["content"]
        text = last if isinstance(last, str) else last[-1]["text"]
        case = re.search(r"case (\w+)", text).group(1)
        with self.server.lock:
            n = sum(c == case for c, _, _ in self.server.seen)
            self.server.seen.append((case, dict(self.headers), payload))
            plan = self.server.plan.get(case, ["ok"])
            action = plan[min(n, len(plan) - 1)]
        try:
            if action == "slow":
                time.sleep(1.0)
            if action in ("500", "400"):
                return self._send(int(action), {"error": f"scripted {action}"})
            message = {"role": "assistant", "content": _valid(case, "teacher answer")}
            if action == "split":
                message = {"role": "assistant", "content": "teacher answer", "reasoning_content": f"Split {case}."}
            self._send(200, {"choices": [{"index": 0, "message": message}]})
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            pass

    def _send(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server():
    srv = FakeOpenAI()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_endpoint_retries_errors_logs_timeouts_and_a_rerun_resumes(server, records_file, tmp_path):
    recs = load_records(records_file)
    server.plan = {"rep": ["ok"], "box": ["500", "ok"], "conv": ["slow"], "txt": ["split"]}
    teacher = EndpointTeacher(server.url, "teacher-235b", api_key="sekret", max_tokens=64)
    out = tmp_path / "ep.jsonl"
    t0 = time.perf_counter()
    counts = synthesize(recs, teacher, out, workers=3, retries=2, timeout=0.3, backoff=0.01, progress=False)
    elapsed = time.perf_counter() - t0
    assert (counts["written"], counts["rejected"], counts["failed"], counts["skipped"]) == (3, 0, 1, 0)
    cases = [c for c, _, _ in server.seen]
    assert cases.count("rep") == 1 and cases.count("box") == 2 and cases.count("conv") == 3  # 1 + 2 retries
    assert elapsed < 3.0  # three 0.3 s timeouts, not three 1 s sleeps
    log = [json.loads(x) for x in failures_path(out).read_text().splitlines()]
    assert [(e["id"], e["kind"], e["attempts"]) for e in log] == [("conv", "failed", 3)]
    assert "timed out" in log[0]["reason"]
    written = {r.id: r for r in load_records(out)}
    assert set(written) == {"rep", "box", "txt"}
    assert split_thinking(written["txt"].answer) == ("Split txt.", "An enlarged heart.", True)
    assert split_thinking(written["box"].answer)[1] == GT_BOX_ANSWER

    # what went over the wire: model, bearer key, image as a data URL before the text, the answer shown
    _, headers, payload = next(s for s in server.seen if s[0] == "rep")
    assert payload["model"] == "teacher-235b" and payload["max_tokens"] == 64
    assert headers["Authorization"] == "Bearer sekret"
    image_part, text_part = payload["messages"][0]["content"]
    head, data = image_part["image_url"]["url"].split(",", 1)
    assert head == "data:image/png;base64"
    assert base64.b64decode(data) == Path(written["rep"].image).read_bytes()
    assert "The heart is enlarged." in text_part["text"]
    _, _, text_only = next(s for s in server.seen if s[0] == "txt")
    assert isinstance(text_only["messages"][0]["content"], str)  # no image, plain text

    # rerun with the server healthy: written ids skipped, the failed one retried and written
    server.plan["conv"] = ["ok"]
    server.seen.clear()
    counts = synthesize(recs, teacher, out, workers=3, retries=2, timeout=0.3, backoff=0.01, progress=False)
    assert (counts["skipped"], counts["written"], counts["failed"]) == (3, 1, 0)
    assert [c for c, _, _ in server.seen] == ["conv"]
    assert failures_path(out).read_text() == ""
    assert sorted(r.id for r in load_records(out)) == ["box", "conv", "rep", "txt"]


def test_endpoint_client_errors_are_not_retried_and_a_dead_server_stops_the_run(server, records_file, tmp_path):
    recs = load_records(records_file)
    server.plan = {r.id: ["400"] for r in recs}
    counts = synthesize(recs, EndpointTeacher(server.url, "m"), tmp_path / "a.jsonl", retries=3, backoff=0.0,
                        progress=False)
    assert counts["failed"] == 4 and len(server.seen) == 4  # one attempt each
    dead = EndpointTeacher("http://127.0.0.1:9/v1", "m")  # port 9 (discard): connection refused
    with pytest.raises(RuntimeError, match="2 records in a row failed"):
        synthesize(recs, dead, tmp_path / "b.jsonl", workers=1, retries=0, max_consecutive_failures=2,
                   progress=False)


def test_cli_runs_against_the_endpoint_and_prints_the_summary(server, records_file, tmp_path, monkeypatch,
                                                             capsys):
    out = tmp_path / "cli.jsonl"
    argv = [str(records_file), str(out), "--endpoint", server.url, "--model", "m", "--api-key-env",
            "SYNTH_TEST_KEY", "--hidden", "--accept", "any", "--workers", "2", "--timeout", "5", "--no-progress"]
    with pytest.raises(SystemExit, match="SYNTH_TEST_KEY"):
        main(argv)
    monkeypatch.setenv("SYNTH_TEST_KEY", "k")
    counts = main(argv)
    assert counts["written"] == 4
    assert "total 4: written 4, rejected 0, failed 0, skipped (already written) 0" in capsys.readouterr().out
    assert all("teacher answer" not in s[2]["messages"][-1]["content"][-1] for s in server.seen)
    assert {json.loads(x)["thinking_source"]["strategy"] for x in out.read_text().splitlines()} == {"hidden"}


def test_endpoint_reply_parsing_merges_reasoning_and_flags_truncation():
    def reply(finish="stop", **message):
        return {"choices": [{"message": {"role": "assistant", **message}, "finish_reason": finish}]}

    text = EndpointTeacher.response_text(reply(content="Enlarged heart.", reasoning_content="Wide heart."))
    assert text == "<think>\nWide heart.\n</think>\n\nEnlarged heart." and not isinstance(text, Truncated)
    inline = "<think>a</think>b"  # a trace already in the content is left alone
    assert EndpointTeacher.response_text(reply(content=inline, reasoning_content="x")) == inline
    assert isinstance(EndpointTeacher.response_text(reply("length", content=inline)), Truncated)
    with pytest.raises(ValueError, match="malformed chat completion"):
        EndpointTeacher.response_text({"error": "overloaded"})


def test_cli_with_a_local_teacher_model_counts_every_record(tiny_checkpoint, records_file, tmp_path, capsys):
    out = tmp_path / "local.jsonl"
    counts = main([str(records_file), str(out), "--teacher-model", str(tiny_checkpoint), "--batch-size", "4",
                   "--max-new-tokens", "8", "--device", "cpu", "--no-progress"])
    assert counts["total"] == 4 and counts["failed"] == 0 and counts["written"] + counts["rejected"] == 4
    assert "total 4: written" in capsys.readouterr().out
    assert len(failures_path(out).read_text().splitlines()) == counts["rejected"]


# --------------------------------------------------------------------------------------------- images


def test_image_data_url_sends_8bit_files_as_they_are_and_rescales_16bit(tmp_path):
    png8 = _png(tmp_path / "a.png", 90)
    assert base64.b64decode(image_data_url(png8).split(",", 1)[1]) == png8.read_bytes()
    arr = np.array([[1000, 3000]] * 32, dtype=np.uint16).repeat(16, axis=1)  # (32, 32): two 16-bit levels
    Image.fromarray(arr).save(tmp_path / "b.png")
    url = image_data_url(tmp_path / "b.png")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("L"))
    assert url.startswith("data:image/png;base64,")
    assert decoded.min() == 0 and decoded.max() == 255  # min-max scaled: 1000 → 0, 3000 → 255
    (tmp_path / "c.png").write_bytes(b"garbage")
    with pytest.raises(PermanentError, match="c.png"):
        image_data_url(tmp_path / "c.png")
