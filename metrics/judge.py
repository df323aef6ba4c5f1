"""The one client of this project for OpenAI-compatible ``/v1/chat/completions`` servers (vLLM, SGLang, …).

Standard library only (urllib), so ``metrics`` stays usable alone. Users: the GREEN judge
(``metrics.green.EndpointJudge``) and the trace teacher of ``radvlm_tools.teachers`` (``EndpointTeacher`` builds
its image payloads on top of ``ChatClient`` and re-exports ``PermanentError`` and ``Truncated``).

``ChatClient.post(payload, timeout)`` sends one request; HTTP 408, 429 and 5xx, connection errors and
timeouts raise retryable errors (``RuntimeError`` / ``ConnectionError`` / ``TimeoutError``), any other 4xx
raises ``PermanentError``. ``chat(messages)`` adds the client's model, ``max_tokens`` (omitted when None: the
server's limit applies), ``temperature`` (0 = greedy) and ``extra_body``, retries retryable errors
``retries`` times after ``backoff · 2^k`` s (at most 60 s) and returns ``choices[0].message.content``, as
``Truncated`` when the server stopped at ``max_tokens`` (``finish_reason == "length"``).

Outbound data: the endpoint must be an ``http://`` or ``https://`` URL (``ValueError`` otherwise: urllib would
also open ``file://``); plain ``http://`` to a host that is not local (``localhost``, ``127.0.0.0/8``,
``::1``) warns once per client (``InsecureEndpointWarning``): prompts, images and the API key would cross the
network unencrypted. Redirects are never followed (a 3xx answer is a ``PermanentError`` naming the new
location): urllib would re-send the ``Authorization`` header to whatever host a redirect names, and turn the
POST into a GET. Set the endpoint to the final URL instead.
"""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from typing import Any

MAX_BACKOFF_S = 60.0


LOCAL_HOSTS = ("localhost", "localhost.localdomain")


class InsecureEndpointWarning(RuntimeWarning):
    """An endpoint reached by plain http on a host that is not this machine."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: the 3xx answer reaches ``post`` as an ``HTTPError``."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def is_local_host(host: str | None) -> bool:
    """Whether ``host`` names this machine: ``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower().rstrip(".") in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_endpoint(url: str, api_key: str | None = None) -> str:
    """``url`` if it is an http(s) URL with a host; warns on plain http to a non-local host (module doc)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"chat endpoint must be an http:// or https:// URL with a host, got {url!r}")
    if parts.scheme == "http" and not is_local_host(parts.hostname):
        what = "prompts and the API key" if api_key else "prompts"
        warnings.warn(f"chat endpoint {parts.scheme}://{parts.netloc} is plain http to a non-local host: {what} "
                      "cross the network unencrypted; use https (or an SSH tunnel to localhost)",
                      InsecureEndpointWarning, stacklevel=3)
    return url


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
        self.url = check_endpoint(endpoint.rstrip("/") + "/chat/completions", api_key)
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
            with _OPENER.open(request, timeout=timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            if 300 <= e.code < 400:
                raise PermanentError(f"HTTP {e.code} from {self.url}: redirect to {e.headers.get('Location')!r} not "
                                     "followed (credentials stay with the configured host); use the final URL") from e
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
