"""Conversations → Qwen3-VL chat-template token ids with assistant-only labels; the thinking convention.

Rendering follows the checkpoint's own chat template (``render_conversation``; without one, the built-in
Qwen3-VL Instruct layout of ``render_segments``); labels cover the content of every assistant turn and its
closing ``<|im_end|>`` (``encode_conversation``).

Thinking convention (one place for the whole code base): the user prompt ends with `` /think``; the
assistant answer is ``<think>\\nTRACE\\n</think>\\n\\nANSWER``. Whether a prompt is a thinking prompt is a
setting (:func:`resolve_thinking`: ``"on"``, ``"off"`` or ``"auto"`` = by the `` /think`` suffix); where the
answer is cut from the trace is another (``split_thinking(..., split="first"|"last")``: after the first or the
last ``</think>``, case-insensitive; each reward metric names its own, see ``radvlm.rewards.RewardTerm``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
THINK_SUFFIX = " /think"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
#: what follows the image in the first user turn (RadVLM's ``<image>\\n`` prefix)
IMAGE_SEPARATOR = "\n"

ThinkingMode = Literal["on", "off", "auto"]
ThinkSplit = Literal["first", "last"]
THINKING_MODES: tuple[str, ...] = ("on", "off", "auto")
THINK_SPLITS: tuple[str, ...] = ("first", "last")
_THINK_OPEN_RE = re.compile(re.escape(THINK_OPEN), re.IGNORECASE)
_THINK_CLOSE_RE = re.compile(re.escape(THINK_CLOSE), re.IGNORECASE)
THINK_OPEN_RE, THINK_CLOSE_RE = _THINK_OPEN_RE, _THINK_CLOSE_RE  # public: record checks use them


def make_thinking_prompt(prompt: str, suffix: str = THINK_SUFFIX) -> str:
    """``"Write a report."`` → ``"Write a report. /think"`` (idempotent)."""
    return prompt if prompt.endswith(suffix) else prompt + suffix


def make_thinking_answer(trace: str, answer: str) -> str:
    """``<think>\\nTRACE\\n</think>\\n\\nANSWER``."""
    return f"{THINK_OPEN}\n{trace.strip()}\n{THINK_CLOSE}\n\n{answer.strip()}"


def is_thinking_prompt(prompt: str, suffix: str = THINK_SUFFIX) -> bool:
    return prompt.rstrip().endswith(suffix.strip())


def check_thinking_mode(mode: str) -> str:
    if mode not in THINKING_MODES:
        raise ValueError(f"thinking mode must be one of {THINKING_MODES}, got {mode!r}")
    return mode


def check_think_split(split: str) -> str:
    if split not in THINK_SPLITS:
        raise ValueError(f"think_split must be one of {THINK_SPLITS}, got {split!r}")
    return split


def resolve_thinking(prompt: str, mode: str = "auto") -> bool:
    """Whether the completion of ``prompt`` is a thinking completion: always (``"on"``, e.g. a Qwen3-VL
    Thinking checkpoint, whose prompts carry no suffix), never (``"off"``), or when the prompt ends with
    `` /think`` (``"auto"``)."""
    if check_thinking_mode(mode) == "auto":
        return is_thinking_prompt(prompt)
    return mode == "on"


def split_thinking(text: str, split: str = "last") -> tuple[str, str, bool]:
    """Split a completion into ``(thoughts, answer, closed)``.

    The answer is the text after the LAST (``split="last"``) or FIRST (``"first"``) ``</think>``, stripped;
    thoughts are what precedes it without the opening tag (a completion of a Thinking template, whose prompt
    ends with ``<think>\\n``, has none). Tags match case-insensitively (``</THINK>`` closes too). Without any
    ``</think>`` the block is unclosed: ``(text without <think>, "", False)``.
    """
    closes = list(_THINK_CLOSE_RE.finditer(text))
    if not closes:
        parts = _THINK_OPEN_RE.split(text, maxsplit=1)
        return parts[-1].strip(), "", False
    cut = closes[0] if check_think_split(split) == "first" else closes[-1]
    thoughts = _THINK_OPEN_RE.split(text[: cut.start()], maxsplit=1)[-1]
    return thoughts.strip(), text[cut.end() :].strip(), True


def answer_of(text: str, thinking: bool, split: str = "last") -> tuple[str, bool]:
    """The part of a completion that is scored: the whole text, or for thinking completions the answer after
    the first or last ``</think>`` (``split``) together with whether the thinking block was closed."""
    if not thinking:
        return text.strip(), True
    _, answer, closed = split_thinking(text, split)
    return answer, closed


# ----------------------------------------------------------------------------------------------- rendering
def _check_role(role: str) -> None:
    if role not in ("user", "assistant", "system"):
        raise ValueError(f"unknown role {role!r}; expected user, assistant or system")


def chat_messages(turns: Sequence[tuple[str, str]], image: bool = False) -> list[dict[str, Any]]:
    """Hugging Face multimodal messages of ``(role, text)`` turns. With ``image`` the first user turn is
    ``[{"type": "image"}, {"type": "text", "text": "\\n" + text}]`` (RadVLM's ``<image>\\nQuestion``); other
    turns have plain string content."""
    messages: list[dict[str, Any]] = []
    image_done = not image
    for role, text in turns:
        _check_role(role)
        if role == "user" and not image_done:
            content = [{"type": "image"}, {"type": "text", "text": IMAGE_SEPARATOR + text}]
            messages.append({"role": role, "content": content})
            image_done = True
        else:
            messages.append({"role": role, "content": text})
    return messages


def render_segments(
    turns: Sequence[tuple[str, str]], image_tokens: int = 0, add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """The built-in layout (for checkpoints without a chat template) as ``(piece, trained)`` segments: what
    the Qwen3-VL Instruct template renders for these turns. ``turns`` are ``(role, text)``, role in
    ``user``/``assistant``/``system``; the image (``image_tokens`` visual tokens; 0 = none) opens the first
    user turn, followed by ``IMAGE_SEPARATOR``."""
    segments: list[tuple[str, bool]] = []
    image_done = image_tokens <= 0
    for role, text in turns:
        _check_role(role)
        if role == "assistant":
            segments.append((f"{IM_START}assistant\n", False))
            segments.append((f"{text}{IM_END}", True))
            segments.append(("\n", False))
            continue
        vision = ""
        if role == "user" and not image_done:
            vision = VISION_START + IMAGE_PAD * image_tokens + VISION_END + IMAGE_SEPARATOR
            image_done = True
        segments.append((f"{IM_START}{role}\n{vision}{text}{IM_END}\n", False))
    if add_generation_prompt:
        segments.append((f"{IM_START}assistant\n", False))
    return segments


@dataclass
class Rendered:
    text: str  # the chat text, image pads expanded
    trained: list[tuple[int, int]]  # character spans [start, end) of the text that get labels


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


_warned_builtin = False


def _warn_builtin_once() -> None:
    global _warned_builtin
    if not _warned_builtin:
        _warned_builtin = True
        log.warning("the tokenizer has no chat template: conversations are rendered with radvlm's built-in "
                    "Qwen3-VL Instruct layout (radvlm.chat.render_segments)")


def _expand_image(text: str, image_tokens: int) -> str:
    """The template's single ``<|image_pad|>`` (inside the first vision block) → ``image_tokens`` pads."""
    if image_tokens <= 0:
        return text
    block = VISION_START + IMAGE_PAD + VISION_END
    at = text.find(block)
    if at < 0:
        raise ValueError(f"the chat template rendered no image placeholder {block!r} for an image turn")
    return text[:at] + VISION_START + IMAGE_PAD * image_tokens + VISION_END + text[at + len(block) :]


def render_conversation(tokenizer, turns: Sequence[tuple[str, str]], image_tokens: int = 0,
                        add_generation_prompt: bool = False) -> Rendered:
    """The chat text of ``turns`` and the character spans that are trained.

    Rendering follows the checkpoint's own chat template (``tokenizer.chat_template``, which
    ``radvlm.processor.load_processor`` fills from the folder's ``chat_template.jinja`` / ``chat_template.json``):
    the turns become Hugging Face multimodal messages (:func:`chat_messages`) and are rendered with
    ``tokenizer.apply_chat_template``. The image opens the first user turn and is followed by a newline, as
    RadVLM's ``<image>\\nQuestion`` is rendered by the authors' pipeline::

        <|im_start|>user\\n<|vision_start|><|image_pad|>×K<|vision_end|>\\nPROMPT<|im_end|>\\n
        <|im_start|>assistant\\nANSWER<|im_end|>\\n ...

    (a Qwen3-VL *Thinking* template opens the generated assistant turn with ``<think>\\n`` and drops the
    traces of assistant turns before the last user turn; both are the checkpoint's own choices and kept). K is
    the number of merged visual tokens of the image (``image_grid_thw.prod() / merge_size²``): the template's
    single ``<|image_pad|>`` is expanded to K. Trained spans: the content of every assistant turn and its
    closing ``<|im_end|>`` (the model must learn to stop); the header (what the template's generation prompt
    adds: ``<|im_start|>assistant\\n``, plus ``<think>\\n`` for Thinking templates) and the newline after
    ``<|im_end|>`` are not trained. Turns are located by rendering the conversation prefix by prefix. A
    checkpoint without a chat template gets the built-in layout above (:func:`render_segments`, the Qwen3-VL
    Instruct output; logged once).
    """
    if not has_chat_template(tokenizer):
        _warn_builtin_once()
        text, trained = "", []
        for piece, is_trained in render_segments(turns, image_tokens, add_generation_prompt):
            if is_trained:
                trained.append((len(text), len(text) + len(piece)))
            text += piece
        return Rendered(text, trained)

    messages = chat_messages(turns, image=image_tokens > 0)

    def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        if not msgs:
            return f"{IM_START}assistant\n" if generation_prompt else ""
        out = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        return _expand_image(out, image_tokens if _has_image(msgs) else 0)

    text = render(messages, add_generation_prompt)
    trained = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(messages[:i], False)
        if not text.startswith(prefix):
            raise ValueError("the chat template does not render the conversation before assistant turn "
                             f"{i} as a prefix of the whole; cannot place assistant labels")
        turn = text[len(prefix) :]
        header = render(messages[:i], True)[len(prefix) :]  # the generation prompt: where the model starts
        if not turn.startswith(header):  # e.g. a Thinking template's earlier turn, rendered without <think>
            header = f"{IM_START}assistant\n"
            if not turn.startswith(header):
                raise ValueError(f"assistant turn {i} does not start with {header!r} in the rendered chat")
        start = len(prefix) + len(header)
        end = text.find(IM_END, start)
        if end < 0:
            raise ValueError(f"assistant turn {i} has no closing {IM_END!r} in the rendered chat")
        trained.append((start, end + len(IM_END)))
    return Rendered(text, trained)


def _has_image(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"])
               for m in messages)


@dataclass
class Encoded:
    input_ids: list[int]  # (T,)
    labels: list[int]  # (T,) IGNORE_INDEX outside assistant content


def encode_conversation(
    tokenizer, turns: Sequence[tuple[str, str]], image_tokens: int = 0, add_generation_prompt: bool = False
) -> Encoded:
    """Token ids and assistant-only labels of a conversation (layout: ``render_conversation``).

    The rendered text is tokenised as a whole, once (ids equal ``tokenizer(text)`` of the chat template's
    text); a token is labelled when its characters overlap a trained span (offsets of a fast tokenizer).
    Labels are -100 everywhere else. A token that straddles a span border (e.g. a ``\\n\\n`` token joining the
    header's last newline and the content's first) is trained.
    """
    rendered = render_conversation(tokenizer, turns, image_tokens, add_generation_prompt)
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    spans = rendered.trained
    j = 0
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        if j < len(spans) and start < spans[j][1] and end > spans[j][0]:
            labels[t] = ids[t]
    return Encoded(ids, labels)


def template_opens_thinking(tokenizer) -> bool:
    """Whether the chat template's generation prompt opens a ``<think>`` block (Qwen3-VL Thinking)."""
    if not has_chat_template(tokenizer):
        return False
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                           add_generation_prompt=True)
    return prompt.rstrip().endswith(THINK_OPEN)


def image_token_count(image_grid_thw, merge_size: int) -> int:
    """Visual tokens an image occupies in the text: t·h·w patches merged ``merge_size²`` at a time."""
    t, h, w = (int(x) for x in image_grid_thw)
    return t * h * w // (merge_size * merge_size)
