"""Outbound data of the OpenAI-compatible client (metrics/judge.py ``ChatClient``, used by the GREEN endpoint judge
and ``radvlm_tools.teachers.EndpointTeacher``): no redirect is followed, so the API key never reaches another host;
plain http to a non-local host warns; only http(s) URLs are accepted."""

from __future__ import annotations

import json
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from metrics.judge import ChatClient, InsecureEndpointWarning, PermanentError, is_local_host

MESSAGES = [{"role": "user", "content": "Is there an effusion?"}]


class Recorder:
    """A 127.0.0.1 HTTP server: answers every request with ``reply(handler) -> (code, headers, body)`` and
    records the headers of every request it receives (``seen``)."""

    def __init__(self, reply) -> None:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                recorder.seen.append((self.command, dict(self.headers)))
                code, headers, body = recorder.reply(self)
                self.send_response(code)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET = _answer

        self.reply, self.seen = reply, []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(_handler) -> tuple[int, dict, bytes]:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "no"}, "finish_reason": "stop"}]}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_host_is_not_followed_and_the_key_stays_home(code):
    # B ("another host": the name localhost and another port) would answer properly; A redirects every request to it
    with Recorder(completion) as other:
        target = f"http://localhost:{other.port}/v1/chat/completions"
        with Recorder(lambda h: (code, {"Location": target}, b"moved")) as server:
            client = ChatClient(f"http://127.0.0.1:{server.port}/v1", "m", api_key="sekret", retries=2, backoff=0.0)
            with pytest.raises(PermanentError, match=rf"HTTP {code} .*redirect to '{target}' not followed"):
                client.chat(MESSAGES)
            assert len(server.seen) == 1  # permanent: not retried
            assert server.seen[0][1]["Authorization"] == "Bearer sekret"  # the configured host gets the key
        assert other.seen == []  # nothing at all reached the other host, so no Authorization header either


def test_the_trace_teacher_and_the_green_judge_do_not_follow_redirects_either(monkeypatch):
    from metrics import base
    from metrics.green import GREEN
    from radvlm_tools.teachers import EndpointTeacher, TeacherRequest

    monkeypatch.setattr(base, "_WARNED", set())  # its warn-once keys must not leak into other tests

    with Recorder(completion) as other:
        target = f"http://localhost:{other.port}/v1/chat/completions"
        with Recorder(lambda h: (302, {"Location": target}, b"")) as server:
            url = f"http://127.0.0.1:{server.port}/v1"
            teacher = EndpointTeacher(url, "teacher", api_key="sekret", max_tokens=8)
            (out,) = teacher.complete([TeacherRequest(id="a", image=None, turns=(("user", "Describe."),))])
            assert isinstance(out, PermanentError) and "not followed" in str(out)
            green = GREEN(endpoint=url, api_key="sekret", retries=0, workers=1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "the judge failed on a pair"
                value = green.score(["No effusion."], ["Small effusion."])
            assert value.isnan().all() and green.stats["failed"] == 1
        assert other.seen == []


@pytest.mark.parametrize("endpoint", ["http://10.1.2.3:8000/v1", "http://gpu-node-7:8000/v1",
                                      "http://example.org/v1", "http://[2001:db8::1]:8000/v1"])
def test_plain_http_to_a_non_local_host_warns_and_names_the_key(endpoint):
    with pytest.warns(InsecureEndpointWarning, match="prompts and the API key cross the network unencrypted"):
        ChatClient(endpoint, "m", api_key="sekret")
    with pytest.warns(InsecureEndpointWarning, match="prompts cross the network unencrypted"):
        ChatClient(endpoint, "m")


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://[::1]:8000/v1",
                                      "http://127.0.0.2/v1", "https://api.example.org/v1", "HTTPS://Example.org/v1"])
def test_https_and_local_http_endpoints_do_not_warn(endpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ChatClient(endpoint, "m", api_key="sekret")


@pytest.mark.parametrize("endpoint", ["file:///etc/passwd", "ftp://example.org/v1", "127.0.0.1:8000/v1", "http:///v1"])
def test_only_http_urls_with_a_host_are_accepted(endpoint):
    with pytest.raises(ValueError, match="must be an http:// or https:// URL with a host"):
        ChatClient(endpoint, "m")


def test_local_hosts():
    assert all(map(is_local_host, ["localhost", "LOCALHOST", "127.0.0.1", "127.8.9.10", "::1"]))
    assert not any(map(is_local_host, ["", None, "10.0.0.1", "localhost.example.org", "0.0.0.0", "::"]))


def test_a_normal_answer_still_arrives():
    with Recorder(completion) as server:
        assert ChatClient(f"http://127.0.0.1:{server.port}/v1", "m", api_key="k").chat(MESSAGES) == "no"
