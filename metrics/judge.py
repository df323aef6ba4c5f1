"""The one client of this project for OpenAI-compatible ``/v1/chat/completions`` servers (vLLM, SGLang, …).

Standard library only (urllib), so ``metrics`` stays usable alone. Users: the GREEN judge
(``metrics.green.EndpointJudge``) and the trace teacher of ``radvlm.teachers`` (``EndpointTeacher`` builds
its image payloads on top of ``ChatClient`` and re-exports ``PermanentError`` and ``Truncated``).

``ChatClient.post(payload, timeout)`` sends one request; HTTP 408, 429 and 5xx, connection errors and
timeouts raise retryable errors (``RuntimeError`` / ``ConnectionError`` / ``TimeoutError``), any other 4xx
raises ``PermanentError``. ``chat(messages)`` adds the client's model, ``max_tokens`` (omitted when None: the
server's limit applies), ``temperature`` (0 = greedy) and ``extra_body``, retries retryable errors
``retries`` times after ``backoff · 2^k`` s (at most 60 s) and returns ``choices[0].message.content``, as
``Truncated`` when the server stopped at ``max_tokens`` (``finish_reason == "length"``).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

MAX_BACKOFF_S = 60.0


class PermanentError(RuntimeError):
    """A request that retrying cannot fix (bad request, unreadable image); never retried."""


class Truncated(str):
    """A response cut at the token limit (``finish_reason == "length"``)."""


def first_choice(reply: Any) -> tuple[dict[str, Any], str | None]:
    """``(choices[0].message, choices[0].finish_reason)`` of a chat completion; ``ValueError`` if malformed."""
    try:
        choice = reply["choices"][0]
        message = choice["message"]
        if not isinstance(message, dict):
            raise TypeError
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"malformed chat completion: {json.dumps(reply)[:300]}") from None
    return message, choice.get("finish_reason")


class ChatClient:
    """An OpenAI-compatible chat endpoint: ``endpoint`` is the base URL (``http://host:8000/v1``)."""

    def __init__(self, endpoint: str, model: str, api_key: str | None = None, max_tokens: int | None = None,
                 temperature: float = 0.0, extra_body: dict[str, Any] | None = None, timeout: float | None = 120.0,
                 retries: int = 0, backoff: float = 1.0) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.max_tokens, self.temperature = max_tokens, temperature
        self.extra_body = dict(extra_body or {})
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def payload(self, messages: Sequence[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": list(messages), "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return {**body, **self.extra_body}

    def post(self, payload: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """One POST of ``payload``; the decoded JSON reply. Errors as in the module docstring."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(payload).encode("utf-8"), headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            error = RuntimeError if e.code in (408, 429) or e.code >= 500 else PermanentError
            raise error(f"HTTP {e.code} from {self.url}: {detail}") from e
        except urllib.error.URLError as e:
            raise ConnectionError(f"{self.url}: {e.reason}") from e

    def chat(self, messages: Sequence[dict[str, Any]], timeout: float | None = None) -> str:
        """The reply text to ``messages`` (retried as configured); ``Truncated`` when cut at ``max_tokens``."""
        payload = self.payload(messages)
        for attempt in range(self.retries + 1):
            try:
                message, finish = first_choice(self.post(payload, timeout if timeout is not None else self.timeout))
                content = message.get("content") or ""
                return Truncated(content) if finish == "length" else content
            except PermanentError:
                raise
            except Exception:  # noqa: BLE001  (HTTP 408/429/5xx, connection, timeout, malformed reply)
                if attempt == self.retries:
                    raise
                time.sleep(min(MAX_BACKOFF_S, self.backoff * 2**attempt))
        raise AssertionError("unreachable")
