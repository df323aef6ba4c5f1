"""Rollouts: the ``Rollout`` container, the ``RolloutEngine`` seam and the plain Hugging Face engine.

A GRPO step samples ``G`` completions per prompt through a ``RolloutEngine``::

    engine.sync_weights(policy)                       # the engine sees the current training weights
    rollout = engine.generate(policy, prompt_batch, sampling)   # a Rollout of B·G rows

and everything after (rewards, advantages, log-probs, the update) reads the ``Rollout`` only, so engines are
interchangeable by ``class_path`` in the config (the engines: ``RolloutEngine``). Sampling settings are one
typed ``Sampling``.

Rewards live in ``radvlm.rewards``, row operations on batches in ``radvlm.batch``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from radvlm.batch import append_completions, distinct_blocks, pad_right, select_rows, share_images

#: per-row list fields a prompt batch carries into its rollout (repeated G times)
ROW_FIELDS = ("ids", "targets", "tasks", "thinking")


@dataclass(frozen=True)
class Sampling:
    """How rollouts are sampled (``GRPOModule`` builds it from its flat init arguments).

    Args:
        num_generations: rollouts per prompt (G).
        max_new_tokens: completion budget (a rollout without a stop token by then is truncated).
        temperature, top_p, top_k: the sampling distribution (``top_k=None``: no top-k); log-probs of the
            update use the same temperature.
        do_sample: ``False`` decodes greedily (checks and benchmarks; GRPO always samples).
    """

    num_generations: int = 8
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    do_sample: bool = True

    def generate_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``Policy.generate`` for these settings."""
        return {"num_return_sequences": self.num_generations, "max_new_tokens": self.max_new_tokens,
                "do_sample": self.do_sample, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k}


@dataclass
class Rollout:
    """``B·G`` rollouts of ``B`` prompts, rows grouped contiguously (prompt i → rows i·G … i·G+G−1).

    ``prompt_inputs`` are the prompts' model inputs repeated G times (left-padded; one image per row), each
    prompt's image kept once (``radvlm.batch.share_images``: vision features computed once per prompt in every
    log-prob pass); ``model_batch()`` appends the completions, the input of every log-prob pass.
    """

    prompt_inputs: dict[str, Any]  # input_ids, attention_mask, mm_token_type_ids (N, P), pixel_values, grid
    completion_ids: torch.Tensor  # (N, C) right-padded with the pad id
    completion_mask: torch.Tensor  # (N, C) 1 up to and including the first stop token
    truncated: torch.Tensor  # (N,) bool: no stop token within max_new_tokens
    texts: list[str]  # decoded completions (special tokens dropped, <think> kept)
    num_generations: int
    ids: list[Any] = field(default_factory=list)  # (N,) record id of each row's prompt
    targets: list[str] = field(default_factory=list)  # (N,) reference answer of each row's prompt
    tasks: list[str | None] = field(default_factory=list)  # (N,)
    thinking: list[bool] = field(default_factory=list)  # (N,)
    #: (N, C) the engine's own log-probs of the sampled tokens (0 outside the mask), when it reports them
    #: (vLLM): compared with the trainer's π_old and used by the rollout correction; ``None`` for HF engines
    logprobs: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.completion_ids.shape[0])

    @classmethod
    def from_completions(cls, prompt_batch: dict[str, Any], g: int, completion_ids: torch.Tensor,
                         completion_mask: torch.Tensor, truncated: torch.Tensor, texts: list[str],
                         logprobs: torch.Tensor | None = None) -> "Rollout":
        """A rollout from a prompt batch (B rows) and its B·G completions (grouped contiguously)."""
        from radvlm.policy import Policy

        per_row = {k: [v for v in prompt_batch.get(k, []) for _ in range(g)] for k in ROW_FIELDS}
        if not per_row["thinking"]:
            per_row["thinking"] = [False] * completion_ids.shape[0]
        return cls(prompt_inputs=share_images(Policy.model_inputs(prompt_batch), g),
                   completion_ids=completion_ids, completion_mask=completion_mask, truncated=truncated,
                   texts=list(texts), num_generations=g, logprobs=logprobs, **per_row)

    def repeated_images(self) -> "Rollout":
        """This rollout with every row carrying its own copy of its image (``pixel_values`` repeated G times,
        as before vision features were shared): the log-prob passes then run the tower on every row."""
        inputs = dict(self.prompt_inputs)
        if inputs.get("distinct_pixel_values") is None:
            return self
        blocks = distinct_blocks(inputs)
        inputs["pixel_values"] = torch.cat([blocks[j] for j in inputs["image_index"].tolist()])  # (patches*G, D)
        for key in ("distinct_pixel_values", "distinct_image_grid_thw", "image_index"):
            inputs.pop(key)
        return dataclasses.replace(self, prompt_inputs=inputs)

    def model_batch(self) -> dict[str, Any]:
        """Prompt + completion as one model batch (N, P+C)."""
        return append_completions(self.prompt_inputs, self.completion_ids, self.completion_mask)

    def groups(self, indices: Sequence[int]) -> "Rollout":
        """The rollout of groups ``indices`` only (group ``i``: rows ``i·G … i·G+G−1``), in that order, each
        prompt's image kept once (``radvlm.batch.select_rows``)."""
        g = self.num_generations
        rows = [i * g + j for i in indices for j in range(g)]
        pick = lambda xs: [xs[r] for r in rows] if xs else list(xs)  # noqa: E731
        return Rollout(prompt_inputs=select_rows(self.prompt_inputs, rows), completion_ids=self.completion_ids[rows],
                       completion_mask=self.completion_mask[rows], truncated=self.truncated[rows],
                       texts=pick(self.texts), num_generations=g, ids=pick(self.ids), targets=pick(self.targets),
                       tasks=pick(self.tasks), thinking=pick(self.thinking),
                       logprobs=None if self.logprobs is None else self.logprobs[rows])

    @classmethod
    def concat(cls, parts: Sequence["Rollout"], pad_id: int) -> "Rollout":
        """Rollouts of the same G one after another (groups of different generation batches): prompts
        left-padded to the longest (``pad_id``, attention 0), completions right-padded (``pad_id``, mask 0; the
        engine's log-probs with 0), each part's distinct images appended and ``image_index`` shifted to them.
        Example: prompts [[a, b]] and [[c]] → input_ids [[a, b], [pad, c]], attention [[1, 1], [0, 1]]."""
        if not parts:
            raise ValueError("Rollout.concat needs at least one rollout")
        g = parts[0].num_generations
        if any(p.num_generations != g for p in parts):
            raise ValueError(f"Rollout.concat: rollouts of different G {[p.num_generations for p in parts]}")
        keys = set(parts[0].prompt_inputs)
        if any(set(p.prompt_inputs) != keys for p in parts):
            raise ValueError(f"Rollout.concat: prompt inputs with different keys {[sorted(p.prompt_inputs) for p in parts]}")
        inputs: dict[str, Any] = {}
        width = max(p.prompt_inputs["input_ids"].shape[1] for p in parts)
        for key in keys:
            values = [p.prompt_inputs[key] for p in parts]
            if key in ("input_ids", "attention_mask", "mm_token_type_ids"):  # (N, P) left-padded
                fill = pad_id if key == "input_ids" else 0
                inputs[key] = torch.cat([torch.nn.functional.pad(v, (width - v.shape[1], 0), value=fill)
                                         for v in values])  # (ΣN, P_max)
            elif key == "image_index":  # (N,) row → distinct image of its part: shifted past the earlier parts
                offsets = torch.tensor([0] + [p.prompt_inputs["distinct_image_grid_thw"].shape[0] for p in parts[:-1]])
                inputs[key] = torch.cat([v + int(o) for v, o in zip(values, offsets.cumsum(0))])  # (ΣN,)
            elif key in ("distinct_pixel_values", "distinct_image_grid_thw", "pixel_values", "image_grid_thw"):
                inputs[key] = torch.cat(values)  # images back to back, in row order
            else:
                raise ValueError(f"Rollout.concat: no rule for the prompt input {key!r}")
        logprobs = None
        if any(p.logprobs is not None for p in parts):
            logprobs = pad_right([p.logprobs if p.logprobs is not None
                                  else torch.full(p.completion_ids.shape, float("nan")) for p in parts], 0.0)
        cat = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        return cls(prompt_inputs=inputs, completion_ids=pad_right([p.completion_ids for p in parts], pad_id),
                   completion_mask=pad_right([p.completion_mask for p in parts], 0),
                   truncated=torch.cat([p.truncated for p in parts]), texts=cat("texts"), num_generations=g,
                   ids=cat("ids"), targets=cat("targets"), tasks=cat("tasks"), thinking=cat("thinking"),
                   logprobs=logprobs)

    def to(self, device: torch.device | str) -> "Rollout":
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        return Rollout(prompt_inputs={k: move(v) for k, v in self.prompt_inputs.items()},
                       completion_ids=move(self.completion_ids), completion_mask=move(self.completion_mask),
                       truncated=move(self.truncated), texts=self.texts, num_generations=self.num_generations,
                       ids=self.ids, targets=self.targets, tasks=self.tasks, thinking=self.thinking,
                       logprobs=None if self.logprobs is None else move(self.logprobs))


@runtime_checkable
class RolloutEngine(Protocol):
    """What produces rollouts. ``sync_weights`` is called before every ``generate`` of a training step.

    Engines, interchangeable by ``class_path`` in the config:

    - ``HFEngine`` (here, the default): ``Policy.generate`` — Hugging Face's own sampling loop; with
      ``shared_prefill`` each image is encoded and each prompt prefilled once and the G rows decode from copies
      of its KV cache (``radvlm.generation.shared_prefill_generate``).
    - ``radvlm.fast_engine.FastHFEngine``: the same loop with LoRA merged into the weights for the rollout
      (restored bit-exactly after), decoding chunked by a memory budget, optional static cache + compile.
    - ``radvlm.vllm_engine.VLLMEngine``: vLLM colocated with training (optional extra ``radvlm[vllm]``).

    Rows are grouped contiguously (prompt ``i`` → rows ``i·G … i·G+G−1``) in every engine; vision special
    tokens are always suppressed and generation stops at ``<|im_end|>``. An engine that samples from a model
    other than the trainer's reports its own log-probs (``Rollout.logprobs``) and may name the rollout
    correction runs get by default (an optional attribute ``default_correction``: a
    ``radvlm.rollout_correction.RolloutCorrection``; ``GRPOModule`` reads it).
    """

    def sync_weights(self, policy: Any) -> None: ...

    def generate(self, policy: Any, prompt_batch: dict[str, Any], sampling: Sampling,
                 synced_gpus: bool = False) -> Rollout: ...


class HFEngine:
    """Rollouts from ``Policy.generate`` (Hugging Face's sampling loop on the training model itself).

    Args:
        shared_prefill: encode each image and prefill each prompt once, then decode the G completions from
            copies of its KV cache: the same samples for the same seed (float32), without G-fold vision and
            prefill compute.
    """

    def __init__(self, shared_prefill: bool = False) -> None:
        self.shared_prefill = bool(shared_prefill)

    def sync_weights(self, policy: Any) -> None:
        """Nothing to do: the engine generates with the training weights themselves."""

    def generate(self, policy: Any, prompt_batch: dict[str, Any], sampling: Sampling,
                 synced_gpus: bool = False) -> Rollout:
        out = policy.generate(prompt_batch, shared_prefill=self.shared_prefill, synced_gpus=synced_gpus,
                              **sampling.generate_kwargs())
        return Rollout.from_completions(prompt_batch, sampling.num_generations, out.completion_ids,
                                        out.completion_mask, out.truncated, out.texts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shared_prefill={self.shared_prefill})"
