"""Generation pieces of the policy: the ``GenerationConfig`` of a call, the M-RoPE positions HF ``generate``
builds, decoding G rollouts from one shared prefill, and the completion masks of the sampled tokens.

Rollouts: ``Policy.generate(..., shared_prefill=True)`` runs the vision tower and the prompt prefill once per
prompt and copies the KV cache G times (``shared_prefill_generate``) instead of repeating the whole prompt G
times; sampling is still Hugging Face's own loop on the same (N·G)-row batch, so the random draws are the same.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn


@dataclass
class GenerationOutput:
    """G completions per prompt, rows grouped contiguously (prompt i → rows i·G … i·G+G−1)."""

    prompt_ids: torch.Tensor  # (N*G, P) left-padded prompts
    prompt_mask: torch.Tensor  # (N*G, P)
    completion_ids: torch.Tensor  # (N*G, C) right-padded with the pad id
    completion_mask: torch.Tensor  # (N*G, C) 1 up to and including the first stop token
    truncated: torch.Tensor  # (N*G,) bool: no stop token within max_new_tokens
    texts: list[str]  # decoded completions (special tokens dropped, <think> kept)


def build_generation_config(stop_token_ids: Sequence[int], pad_token_id: int, suppress_token_ids: Sequence[int],
                            max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 1.0,
                            top_p: float = 1.0, top_k: int | None = None, static_cache: bool = False,
                            compile: bool | None = None) -> Any:
    """The ``GenerationConfig`` of one ``Policy.generate`` call: greedy or sampled (``temperature``, ``top_p``,
    ``top_k`` only when sampling), stopping at ``stop_token_ids``, never sampling ``suppress_token_ids``.

    ``static_cache``: a preallocated ``StaticCache`` (fixed shapes), whose decode step Hugging Face compiles on
    GPU; ``compile``: ``True`` compiles it on any device (CPU included), ``False`` never, ``None`` Hugging Face's
    choice.
    """
    from transformers import GenerationConfig
    from transformers.generation import CompileConfig

    compile_kw: dict[str, Any] = {}
    if static_cache:
        compile_kw["cache_implementation"] = "static"
        if compile is not None:
            compile_kw["disable_compile"] = not compile
        if compile:
            config = CompileConfig()
            config._compile_all_devices = True  # HF compiles on GPU only unless told (its testing flag)
            compile_kw["compile_config"] = config
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=(top_k or 0) if do_sample else None,
        eos_token_id=stop_token_ids,
        pad_token_id=pad_token_id,
        suppress_tokens=suppress_token_ids,
        use_cache=True,
        **compile_kw,
    )


def mrope_position_ids(hf_model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:  # (4, N, P)
    """The position ids Hugging Face ``generate`` builds for a Qwen3-VL prompt batch.

    Row 0: text positions (attention-mask cumsum − 1, 0 on left padding; used for the causal mask);
    rows 1–3: the M-RoPE (temporal, height, width) positions of ``get_rope_index`` (image tokens get 2-D grid
    positions; text after the image continues from the grid's largest position + 1). Without images all four
    rows are the text positions.
    """
    mask = inputs["attention_mask"]  # (N, P)
    text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (N, P)
    if inputs.get("image_grid_thw") is not None:
        vision, _ = hf_model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"], attention_mask=mask,
        )  # (3, N, P)
    else:
        vision = text.unsqueeze(0).expand(3, -1, -1)  # (3, N, P)
    return torch.cat([text.unsqueeze(0), vision.to(text.dtype)], dim=0)  # (4, N, P)


@torch.no_grad()
def shared_prefill_generate(hf_model: nn.Module, inputs: dict[str, Any], num_return_sequences: int,
                            generation_config: Any, synced_gpus: bool = False) -> torch.Tensor:  # (N*G, P+C)
    """G continuations per prompt from one prefill: Hugging Face ``generate`` resumed from a copied cache.

    1. The prompts but their last token, ``(N, P-1)``, go through the model once with their images (vision
       tower over N images, not N·G) into a ``DynamicCache``, with the M-RoPE positions HF itself would use
       (``mrope_position_ids``).
    2. The cache is repeated ``G`` times along the batch (rows ``i·G … i·G+G−1`` copy prompt ``i``).
    3. ``generate`` gets the full repeated prompts ``(N·G, P)``, their ``(4, N·G, P)`` positions and the
       cache: it runs only the last prompt token, then decodes as usual, appending position ``last + 1`` on all
       four rows each step (text tokens after an image have equal T/H/W positions, offset by the image's
       rope delta: the same positions as the plain path). Logits processors (temperature, top-k, top-p,
       suppressed tokens), stopping and the multinomial draws are HF's own, on an ``(N·G, V)`` batch at every
       step, as in the plain path, so one seed gives the same samples up to floating-point rounding of the
       logits (the prefill runs on N rows instead of N·G; bit-identical logits are not guaranteed).
    """
    from transformers import DynamicCache

    ids, mask = inputs["input_ids"], inputs["attention_mask"]  # (N, P)
    if ids.shape[1] < 2:
        raise ValueError(f"shared_prefill_generate needs prompts of at least 2 tokens, got width {ids.shape[1]}")
    if not bool(mask[:, -1].all()):
        raise ValueError("shared_prefill_generate needs left-padded prompts (every row must end with a token)")
    g = int(num_return_sequences)
    positions = mrope_position_ids(hf_model, inputs)  # (4, N, P)
    cache_kw = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=hf_model.config.get_text_config(decoder=True))
    images = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if inputs.get(k) is not None}
    was_training = hf_model.training
    hf_model.eval()  # gradient checkpointing (train mode only) would refuse to fill the cache
    try:
        hf_model.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[..., :-1],
                       use_cache=True, **{cache_kw: cache}, **images)  # fills the cache with P-1 positions
        cache.batch_repeat_interleave(g)  # (N*G, heads, P-1, d) per layer
        return hf_model.generate(
            input_ids=ids.repeat_interleave(g, dim=0),  # (N*G, P)
            attention_mask=mask.repeat_interleave(g, dim=0),  # (N*G, P)
            position_ids=positions.repeat_interleave(g, dim=1),  # (4, N*G, P)
            generation_config=generation_config,
            synced_gpus=synced_gpus,
            **{cache_kw: cache},
        )
    finally:
        hf_model.train(was_training)


def completion_mask_from_ids(completion: torch.Tensor, stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask (N, C) that is 1 up to and including the first stop token, and whether no stop token came.

    Example: stop 9, completion [5, 9, 7] → mask [1, 1, 0], truncated False; [5, 6, 7] → [1, 1, 1], True.
    """
    is_stop = torch.isin(completion, torch.tensor(list(stop_ids), device=completion.device))  # (N, C)
    seen_before = torch.cumsum(is_stop.long(), dim=1) - is_stop.long()  # (N, C): stops strictly before
    mask = (seen_before == 0).long()  # (N, C)
    truncated = ~is_stop.any(dim=1)  # (N,)
    return mask, truncated
