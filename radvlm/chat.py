"""Conversations → Qwen3-VL chat-template token ids with assistant-only labels; the thinking convention.

Layout rendered (identical to the Qwen3-VL chat template, see ``radvlm.tiny.CHAT_TEMPLATE``)::

    <|im_start|>user\\n<|vision_start|><|image_pad|>×K<|vision_end|>PROMPT<|im_end|>\\n
    <|im_start|>assistant\\nANSWER<|im_end|>\\n ...

K is the number of merged visual tokens of the image (``image_grid_thw.prod() / merge_size²``). Labels are
-100 everywhere except on the content of every assistant turn and its closing ``<|im_end|>`` (the model must
learn to stop); the ``<|im_start|>assistant\\n`` header and the newline after ``<|im_end|>`` are not trained.

Thinking convention (one place for the whole code base): the user prompt ends with `` /think``; the
assistant answer is ``<think>\\nTRACE\\n</think>\\n\\nANSWER``; ``split_thinking`` returns the answer after the
last ``</think>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

IGNORE_INDEX = -100
THINK_SUFFIX = " /think"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def make_thinking_prompt(prompt: str, suffix: str = THINK_SUFFIX) -> str:
    """``"Write a report."`` → ``"Write a report. /think"`` (idempotent)."""
    return prompt if prompt.endswith(suffix) else prompt + suffix


def make_thinking_answer(trace: str, answer: str) -> str:
    """``<think>\\nTRACE\\n</think>\\n\\nANSWER``."""
    return f"{THINK_OPEN}\n{trace.strip()}\n{THINK_CLOSE}\n\n{answer.strip()}"


def is_thinking_prompt(prompt: str, suffix: str = THINK_SUFFIX) -> bool:
    return prompt.rstrip().endswith(suffix.strip())


def split_thinking(text: str) -> tuple[str, str, bool]:
    """Split a completion into ``(thoughts, answer, closed)``.

    The answer is the text after the LAST ``</think>`` (stripped); thoughts are what precedes it without the
    opening tag. Without any ``</think>`` the block is unclosed: ``(text without <think>, "", False)``.
    """
    cut = text.rfind(THINK_CLOSE)
    if cut < 0:
        body = text.split(THINK_OPEN, 1)[1] if THINK_OPEN in text else text
        return body.strip(), "", False
    thoughts = text[:cut]
    start = thoughts.find(THINK_OPEN)
    if start >= 0:
        thoughts = thoughts[start + len(THINK_OPEN) :]
    return thoughts.strip(), text[cut + len(THINK_CLOSE) :].strip(), True


def answer_of(text: str, thinking: bool) -> tuple[str, bool]:
    """The part of a completion that is scored: the whole text, or for thinking prompts the answer after
    ``</think>`` together with whether the thinking block was closed."""
    if not thinking:
        return text.strip(), True
    _, answer, closed = split_thinking(text)
    return answer, closed


def render_segments(
    turns: Sequence[tuple[str, str]], image_tokens: int = 0, add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """Chat-template text as ``(piece, trained)`` segments. ``turns`` are ``(role, text)``, role in
    ``user``/``assistant``/``system``; the image (``image_tokens`` visual tokens; 0 = none) opens the first
    user turn."""
    segments: list[tuple[str, bool]] = []
    image_done = image_tokens <= 0
    for role, text in turns:
        if role not in ("user", "assistant", "system"):
            raise ValueError(f"unknown role {role!r}; expected user, assistant or system")
        if role == "assistant":
            segments.append((f"{IM_START}assistant\n", False))
            segments.append((f"{text}{IM_END}", True))
            segments.append(("\n", False))
            continue
        vision = ""
        if role == "user" and not image_done:
            vision = VISION_START + IMAGE_PAD * image_tokens + VISION_END
            image_done = True
        segments.append((f"{IM_START}{role}\n{vision}{text}{IM_END}\n", False))
    if add_generation_prompt:
        segments.append((f"{IM_START}assistant\n", False))
    return segments


@dataclass
class Encoded:
    input_ids: list[int]  # (T,)
    labels: list[int]  # (T,) IGNORE_INDEX outside assistant content


def encode_conversation(
    tokenizer, turns: Sequence[tuple[str, str]], image_tokens: int = 0, add_generation_prompt: bool = False
) -> Encoded:
    """Token ids and assistant-only labels of a conversation (see module docstring for the layout).

    Segments are tokenised separately; every boundary sits next to a special token or a newline, where the
    Qwen pre-tokenizer splits anyway, so the ids equal those of tokenising the whole rendered text.
    """
    ids: list[int] = []
    labels: list[int] = []
    for piece, trained in render_segments(turns, image_tokens, add_generation_prompt):
        piece_ids = tokenizer.encode(piece, add_special_tokens=False)
        ids.extend(piece_ids)
        labels.extend(piece_ids if trained else [IGNORE_INDEX] * len(piece_ids))
    return Encoded(ids, labels)


def image_token_count(image_grid_thw, merge_size: int) -> int:
    """Visual tokens an image occupies in the text: t·h·w patches merged ``merge_size²`` at a time."""
    t, h, w = (int(x) for x in image_grid_thw)
    return t * h * w // (merge_size * merge_size)
