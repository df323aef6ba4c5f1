"""Teachers for ``radvlm_tools.synthesize_thinking``: what answers a ``TeacherRequest`` with a ``<think>`` response.

- ``EndpointTeacher``: an OpenAI-compatible ``/v1/chat/completions`` server (e.g. a 235B Qwen3-VL under vLLM)
  through ``metrics.judge.ChatClient`` (the project's one such client, shared with the GREEN judge), one
  request per call; the image goes as a base64 data URL (``image_data_url``); a server's
  separate ``reasoning_content`` (vLLM reasoning parser) becomes the think block.
- ``PolicyTeacher``: any checkpoint ``Policy.from_pretrained`` loads, batched ``generate`` (greedy when the
  temperature is 0); it ignores ``timeout`` (``generate`` cannot be interrupted).

Both return, per request, the response text or the exception it raised (``synthesize`` decides on retries):
``Truncated`` marks a response cut at the token limit, ``PermanentError`` an error retrying cannot fix (HTTP
4xx but 408/429, unreadable image, a prompt the collator drops). Not in the paper, which names no teacher
interface: images that are not 8-bit PNG/JPEG are decoded as training decodes them (``load_image`` rescales
16-bit radiographs) and sent as PNG.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from datamodules.records import Record, Turn, load_image
from metrics.judge import (  # the project's one OpenAI-compatible client; the error types are re-exported here
    ChatClient,
    PermanentError,
    Truncated,
    first_choice,
)
from radvlm.chat import THINK_CLOSE, THINK_OPEN


@dataclass(frozen=True)
class TeacherRequest:
    """One conversation for the teacher: earlier turns as they are, then the final instruction."""

    id: str
    image: Path | None  # opens the first user turn
    turns: tuple[tuple[str, str], ...]  # (role, text); ends with the user instruction


class Teacher(Protocol):
    name: str
    batch_size: int  # requests per ``complete`` call
    max_workers: int | None  # threads that may call ``complete`` at once (None: any number)

    def complete(self, requests: Sequence[TeacherRequest], timeout: float | None = None) -> list[str | Exception]:
        ...


def image_data_url(path: str | Path, loader: Callable[[Path], Any] | None = None) -> str:
    """``data:image/png;base64,...``: 8-bit PNG/JPEG files as they are, anything else decoded by ``loader``
    (default ``datamodules.records.load_image``, which rescales 16-bit images) and re-encoded as PNG."""
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
        if fmt in ("PNG", "JPEG") and mode in ("L", "RGB", "RGBA", "LA", "P"):
            data, mime = path.read_bytes(), f"image/{fmt.lower()}"
        else:
            buf = io.BytesIO()
            (loader or load_image)(path).save(buf, format="PNG")
            data, mime = buf.getvalue(), "image/png"
    except Exception as e:
        raise PermanentError(f"image {str(path)!r} cannot be read ({type(e).__name__}: {e})") from e
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


class EndpointTeacher:
    """An OpenAI-compatible ``/v1/chat/completions`` server (vLLM, SGLang, ...), through ``metrics.judge.ChatClient``.

    The image goes as a base64 data-URL ``image_url`` part before the text of the first user turn. HTTP 408,
    429 and 5xx, connection errors and timeouts are retried by ``synthesize``; other 4xx are permanent.
    """

    batch_size = 1
    max_workers = None

    def __init__(self, endpoint: str, model: str, api_key: str | None = None, max_tokens: int = 4096,
                 temperature: float = 0.0, extra_body: dict[str, Any] | None = None,
                 image_loader: Callable[[Path], Any] | None = None) -> None:
        # retries=0: ``synthesize`` retries (and logs) failed requests itself
        self.client = ChatClient(endpoint, model, api_key=api_key, max_tokens=max_tokens, temperature=temperature,
                                 extra_body=extra_body, timeout=None, retries=0)
        self.url, self.model, self.api_key = self.client.url, model, api_key
        self.max_tokens, self.temperature = max_tokens, temperature
        self.extra_body = self.client.extra_body
        self.image_loader = image_loader
        self.name = f"endpoint:{model}"

    def payload(self, request: TeacherRequest) -> dict[str, Any]:
        messages = []
        image_pending = request.image is not None
        for role, text in request.turns:
            if role == "user" and image_pending:
                url = image_data_url(request.image, self.image_loader)
                content: Any = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
                image_pending = False
            else:
                content = text
            messages.append({"role": role, "content": content})
        return self.client.payload(messages)

    def complete_one(self, request: TeacherRequest, timeout: float | None = None) -> str:
        return self.response_text(self.client.post(self.payload(request), timeout))

    @staticmethod
    def response_text(reply: dict[str, Any]) -> str:
        """``choices[0].message.content``, with a separate ``reasoning_content`` put back as a think block;
        ``Truncated`` when the server stopped at ``max_tokens``."""
        message, finish_reason = first_choice(reply)
        content = message.get("content") or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if reasoning and THINK_CLOSE not in content:
            content = f"{THINK_OPEN}\n{reasoning.strip()}\n{THINK_CLOSE}\n\n{content.strip()}"
        return Truncated(content) if finish_reason == "length" else content

    def complete(self, requests: Sequence[TeacherRequest], timeout: float | None = None) -> list[str | Exception]:
        out: list[str | Exception] = []
        for request in requests:
            try:
                out.append(self.complete_one(request, timeout))
            except Exception as e:  # every failure is reported per request; synthesize decides on retries
                out.append(e)
        return out


class PolicyTeacher:
    """A local checkpoint: ``PromptCollator`` batches → ``Policy.generate`` (greedy when temperature is 0)."""

    max_workers = 1

    def __init__(self, policy, batch_size: int = 8, max_new_tokens: int = 4096, temperature: float = 0.0,
                 device: str | None = None, collator: Callable[[list], dict] | None = None,
                 name: str = "policy") -> None:
        self.policy, self.batch_size = policy, batch_size
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.device = device
        if collator is None:
            from datamodules.collate import PromptCollator  # lazy: torch, only for a local-model teacher

            collator = PromptCollator(policy.processor)
        self.collator = collator
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str | None = None,
                        **kwargs) -> PolicyTeacher:
        from radvlm.policy import Policy

        policy = Policy.from_pretrained(path, dtype=dtype)
        if device is not None:
            policy.to(device)
        return cls(policy, device=device, name=f"policy:{Path(str(path)).name}", **kwargs)

    def _records(self, requests: Sequence[TeacherRequest]) -> list:
        # an empty assistant turn closes each conversation; the prompt collator drops it again
        return [Record(id=r.id, image=r.image, conversations=[Turn(role, text) for role, text in r.turns]
                       + [Turn("assistant", "")]) for r in requests]

    def _generate(self, requests: Sequence[TeacherRequest]) -> list[str]:
        import torch

        batch = self.collator(self._records(requests))
        if batch.get("empty") or list(batch["ids"]) != [r.id for r in requests]:
            raise PermanentError(f"the prompt collator dropped {batch.get('n_dropped')} of {len(requests)} prompts")
        if self.device is not None:
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = self.policy.generate(batch, num_return_sequences=1, max_new_tokens=self.max_new_tokens,
                                   do_sample=self.temperature > 0, temperature=self.temperature or 1.0)
        return [Truncated(t) if cut else t for t, cut in zip(out.texts, out.truncated.tolist())]

    def complete(self, requests: Sequence[TeacherRequest], timeout: float | None = None) -> list[str | Exception]:
        try:
            return list(self._generate(requests))
        except Exception as e:
            if len(requests) == 1:  # a bad record (ValueError: unreadable image ...) will not get better
                return [PermanentError(f"{type(e).__name__}: {e}") if isinstance(e, ValueError) else e]
        # one bad sample must not fail its whole batch: isolate it
        return [r for request in requests for r in self.complete([request], timeout)]
