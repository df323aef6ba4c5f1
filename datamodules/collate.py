"""Collators: records → model batches, for SFT (labels on assistant tokens) and for RL prompts.

SFT batches (``SFTCollator``) are right-padded; prompt batches (``PromptCollator``) are left-padded so
completions can be appended. Text comes from the checkpoint's own chat template
(``radvlm.chat.encode_conversation``); image tokens, over-long samples and unusable images: ``Collator``.
The data module is given a ``CollatorFactory`` (a ``Collator`` class, or a config ``class_path``).
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from datamodules.records import ImageError, Record, RecordError, load_image
from radvlm.chat import (
    IGNORE_INDEX,
    THINK_CLOSE,
    ThinkingMode,
    check_thinking_mode,
    encode_conversation,
    image_token_count,
    resolve_thinking,
    split_thinking,
    template_opens_thinking,
)

log = logging.getLogger(__name__)

Overlong = Literal["drop", "error"]


class SampleTooLongError(ValueError):
    """A sample exceeds ``max_length`` tokens and ``overlong="error"`` was configured."""


@dataclass
class EncodedSample:
    id: str
    input_ids: list[int]  # (T,)
    labels: list[int]  # (T,)
    pixel_values: torch.Tensor | None  # (patches, D)
    image_grid_thw: torch.Tensor | None  # (1, 3)
    image: Any = None  # the decoded RGB image (prompts keep it for engines that process images themselves)


def _image_inputs(record: Record, image_processor) -> tuple[torch.Tensor | None, torch.Tensor | None, int, Any]:
    if record.image is None:
        return None, None, 0, None
    image = load_image(record.image)
    out = image_processor(images=[image], return_tensors="pt")
    grid = out["image_grid_thw"]  # (1, 3)
    return out["pixel_values"], grid, image_token_count(grid[0], image_processor.merge_size), image


def turns_of(record: Record) -> list[tuple[str, str]]:
    return [(t.role, t.text) for t in record.conversations]


def encode_sft(record: Record, processor) -> EncodedSample:
    """Whole conversation, labels on every assistant turn."""
    pixels, grid, k, _ = _image_inputs(record, processor.image_processor)
    enc = encode_conversation(processor.tokenizer, turns_of(record), image_tokens=k)
    return EncodedSample(record.id, enc.input_ids, enc.labels, pixels, grid)


def encode_prompt(record: Record, processor) -> EncodedSample:
    """Conversation up to the last user turn, followed by the assistant header (generation prompt)."""
    turns = turns_of(record)
    if turns and turns[-1][0] == "assistant":
        turns = turns[:-1]
    pixels, grid, k, image = _image_inputs(record, processor.image_processor)
    enc = encode_conversation(processor.tokenizer, turns, image_tokens=k, add_generation_prompt=True)
    return EncodedSample(record.id, enc.input_ids, enc.labels, pixels, grid, image)


def pad_stack(rows: Sequence[Sequence[int]], value: int, left: bool) -> torch.Tensor:  # (N, T_max)
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            if left:
                out[i, width - len(r) :] = torch.tensor(r)
            else:
                out[i, : len(r)] = torch.tensor(r)
    return out


def stack_samples(samples: Sequence[EncodedSample], pad_id: int, image_token_id: int, left: bool) -> dict:
    """Pad ids/labels, build attention and multimodal token-type masks, concatenate image patches."""
    input_ids = pad_stack([s.input_ids for s in samples], pad_id, left)  # (N, T)
    attention = pad_stack([[1] * len(s.input_ids) for s in samples], 0, left)  # (N, T)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": pad_stack([s.labels for s in samples], IGNORE_INDEX, left),  # (N, T)
        "mm_token_type_ids": ((input_ids == image_token_id) & (attention == 1)).int(),  # (N, T)
        "ids": [s.id for s in samples],
    }
    with_images = [s for s in samples if s.pixel_values is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([s.pixel_values for s in with_images])  # (patches, D)
        batch["image_grid_thw"] = torch.cat([s.image_grid_thw for s in with_images])  # (I, 3)
    batch["image_counts"] = torch.tensor([int(s.pixel_values is not None) for s in samples])  # (N,)
    return batch


class Collator(ABC):
    """Records → one model batch (``__call__``); the base of the collators a data module can be given.

    Each sample's image is loaded and run through the Qwen image processor; the chat text is rendered with as
    many ``<|image_pad|>`` tokens as the image has visual tokens (``radvlm.chat``), so the image-token count
    always equals the vision-feature count ("image features and image tokens do not match" cannot happen); a
    record whose own text holds ``<|image_pad|>`` would break that count and raises ``RecordError`` instead.
    A sample longer than ``max_length`` is never truncated (that could cut through its image tokens): it is
    dropped and counted in ``batch["n_dropped"]``, or raises ``SampleTooLongError`` with ``overlong="error"``.
    An image that cannot be used (missing, undecodable, too small, aspect ratio over 200; reached here only
    when the DataModule did not check images at setup) raises ``ImageError`` naming its path and the record.

    The data module calls its ``CollatorFactory`` with its processor and its data-level settings
    ``(processor, max_length, overlong, thinking_mode)``; a collator derives the ones of evaluation
    (``for_evaluation``) and prediction (``for_prediction``) itself.
    """

    left = False
    #: whether batches carry the decoded images (``batch["pil_images"]``) beside the model inputs
    keeps_images = False

    def __init__(self, processor, max_length: int | None = None, overlong: Overlong = "drop",
                 thinking_mode: ThinkingMode = "auto") -> None:
        """
        Args:
            processor: the checkpoint's processor (tokenizer and image processor).
            max_length: samples with more tokens are dropped and counted, or raise (``overlong``).
            overlong: ``"drop"`` or ``"error"``.
            thinking_mode: which prompts are thinking prompts (``radvlm.chat.resolve_thinking``).
        """
        if overlong not in ("drop", "error"):
            raise ValueError(f"overlong must be 'drop' or 'error', got {overlong!r}")
        self.processor = processor
        self.max_length = max_length
        self.overlong = overlong
        self.thinking_mode = check_thinking_mode(thinking_mode)
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id
        self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")

    def for_evaluation(self) -> Collator:
        """The collator of validation and test batches: this one unless a layout needs more there."""
        return self

    def for_prediction(self) -> PromptCollator:
        """The collator of ``main.py predict`` batches: prompts with the same settings."""
        return PromptCollator(self.processor, self.max_length, self.overlong, self.thinking_mode)

    @abstractmethod
    def encode(self, record: Record) -> EncodedSample:
        """One record → token ids, labels and image inputs."""

    def _keep(self, record: Record, sample: EncodedSample) -> bool:
        if self.max_length is None or len(sample.input_ids) <= self.max_length:
            return True
        if self.overlong == "error":
            raise SampleTooLongError(
                f"record {record.id!r} ({record.source}, index {record.index}) has {len(sample.input_ids)} "
                f"tokens > max_length={self.max_length}; raise max_length, lower max_pixels, or use "
                f"overlong='drop'"
            )
        return False

    def _encode(self, record: Record) -> EncodedSample:
        try:
            sample = self.encode(record)
        except ImageError as e:  # images not checked at setup (check_images=False): name the record too
            raise ImageError(f"{e.reason} (record {record.id!r}, {record.source}, index {record.index})",
                             e.path) from e
        grid = sample.image_grid_thw
        merge = self.processor.image_processor.merge_size
        expected = 0 if grid is None else image_token_count(grid[0], merge)
        found = sample.input_ids.count(self.image_token_id)
        if found != expected:  # the text itself holds "<|image_pad|>": the model would fail on the count
            raise RecordError(
                f"its text contains {found - expected} '<|image_pad|>' token(s) of its own (an image needs "
                f"exactly {expected}); remove vision special tokens from the text",
                record.source, record.index, record.id)
        return sample

    def __call__(self, records: Sequence[Record]) -> dict:
        kept = [(r, s) for r in records for s in [self._encode(r)] if self._keep(r, s)]
        n_dropped = len(records) - len(kept)
        if not kept:
            return {"n_dropped": n_dropped, "empty": True}
        batch = stack_samples([s for _, s in kept], self.pad_id, self.image_token_id, self.left)
        batch["n_dropped"] = n_dropped
        batch["tasks"] = [r.task for r, _ in kept]
        # evaluation copies that even out the ranks' shards: run, never counted (no label: no loss token)
        batch["padding"] = [r.padding for r, _ in kept]
        if any(batch["padding"]):
            batch["labels"][torch.tensor(batch["padding"])] = IGNORE_INDEX
        if self.keeps_images:
            batch["pil_images"] = [s.image for _, s in kept]
        self.extend(batch, [r for r, _ in kept])
        return batch

    def extend(self, batch: dict, records: list[Record]) -> None:  # noqa: B027  (optional hook)
        """Add layout-specific fields to a collated batch (nothing by default)."""


class SFTCollator(Collator):
    """Right-padded full conversations with assistant-only labels. Its ``for_evaluation`` copy adds the prompts:
    ``batch["prompt"]`` holds a ``PromptCollator`` batch of the same records, for greedy generation at
    validation."""

    def __init__(self, processor, max_length: int | None = None, overlong: Overlong = "drop",
                 thinking_mode: ThinkingMode = "auto") -> None:
        super().__init__(processor, max_length, overlong, thinking_mode)
        self.prompts: PromptCollator | None = None  # set in the for_evaluation copy

    def for_evaluation(self) -> SFTCollator:
        """The same layout with the prompts of the records added (greedy generation at validation)."""
        if self.prompts is not None:
            return self
        evaluation = copy.copy(self)
        evaluation.prompts = PromptCollator(self.processor, self.max_length, self.overlong, self.thinking_mode)
        return evaluation

    def encode(self, record: Record) -> EncodedSample:
        return encode_sft(record, self.processor)

    def extend(self, batch: dict, records: list[Record]) -> None:
        if self.prompts is not None:
            batch["prompt"] = self.prompts(records)


class PromptCollator(Collator):
    """Left-padded generation prompts plus what rewards and metrics need: ``targets`` (the reference
    answer), ``tasks``, ``thinking`` flags (``thinking_mode``), ``prompts`` (text), ``gt_boxes`` and the
    record's ``labels`` and ``pathologies`` (classification truth and label set; ``None`` when absent). The
    token ``labels`` of the base collator are dropped (prompts have no targets), so ``labels`` is the record's.

    ``thinking`` flags come from the ``thinking_mode`` setting (``radvlm.chat.resolve_thinking``: ``"on"``,
    ``"off"``, or ``"auto"`` = prompts ending in `` /think``); with ``"auto"`` and a template that opens
    ``<think>`` itself (Qwen3-VL Thinking) a warning says to set ``"on"``."""

    left = True
    keeps_images = True  # an engine that processes images itself (vLLM) gets the image decoded as here

    def __init__(self, processor, max_length: int | None = None, overlong: Overlong = "drop",
                 thinking_mode: ThinkingMode = "auto") -> None:
        super().__init__(processor, max_length, overlong, thinking_mode)
        if thinking_mode == "auto" and template_opens_thinking(processor.tokenizer):
            log.warning("the chat template opens a <think> block in every generation prompt (a Thinking "
                        "checkpoint) but thinking_mode='auto' treats only prompts ending in ' /think' as thinking; "
                        "set thinking_mode='on' to score the answers after </think>")

    def encode(self, record: Record) -> EncodedSample:
        return encode_prompt(record, self.processor)

    def for_prediction(self) -> PromptCollator:
        return self

    def extend(self, batch: dict, records: list[Record]) -> None:
        batch.pop("labels")
        users = [[t.text for t in r.conversations if t.role == "user"] for r in records]
        batch["prompts"] = [u[-1] if u else "" for u in users]
        # the reference is the final answer: a thinking trace in the record's answer is not scored
        batch["targets"] = [split_thinking(r.answer)[1] if THINK_CLOSE in r.answer else r.answer
                            for r in records]
        batch["thinking"] = [resolve_thinking(p, self.thinking_mode) for p in batch["prompts"]]
        batch["gt_boxes"] = [r.boxes or [] for r in records]
        batch["labels"] = [r.labels for r in records]  # classification truth (None when the record has none)
        batch["pathologies"] = [r.extra.get("pathologies") for r in records]  # the record's label set
        batch["images"] = [str(r.image) if r.image else None for r in records]


#: What a data module is given (``collator`` in its config): called as
#: ``collator(processor, max_length, overlong, thinking_mode)`` → a ``Collator``. A ``Collator`` class is one;
#: a config ``{class_path: <a Collator class>, init_args: {...}}`` makes one with the init arguments after
#: those four (jsonargparse's callable-class injection, as ``OptimizerCallable``).
CollatorFactory = Callable[[Any, Optional[int], Overlong, ThinkingMode], Collator]
