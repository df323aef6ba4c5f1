"""``FastHFEngine``: Hugging Face rollouts with LoRA merged, memory-budgeted decode chunks, optional static cache.

The same ``Policy.generate`` loop as ``radvlm.rollout.HFEngine`` (shared prefill by default), with three
changes, each described in ``FastHFEngine``. What they change in the samples: merged LoRA weights round
differently (samples equal the unmerged path's up to near-ties of the logits), and a chunked rollout draws
other samples than an unchunked one for the same seed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from radvlm.batch import pad_right, select_rows
from radvlm.rollout import HFEngine, Rollout, Sampling
from radvlm.sharding import whole_weights


@contextlib.contextmanager
def merged_lora(model: nn.Module, adapter: str = "default") -> Iterator[int]:
    """Inside the block the LoRA deltas of ``model`` (a peft model) are folded into its base weights and the
    adapters are disabled; after it the base weights are copied back from a saved copy (bit-exact).

    Yields the number of merged layers (0 when ``model`` has no LoRA or its weights are sharded)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in getattr(m, "lora_A", {})]
    if not layers or not hasattr(model, "disable_adapter") or any(_is_sharded(m.get_base_layer().weight)
                                                                   for m in layers):
        yield 0
        return
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                delta = layer.get_delta_weight(adapter)  # s · B @ A in the weight's layout
                saved.append((weight, weight.detach().clone()))
                weight.add_(delta.to(weight.dtype))
        with model.disable_adapter():
            yield len(layers)
    finally:
        with torch.no_grad():
            for weight, copy in saved:
                weight.copy_(copy)


def _is_sharded(weight: torch.Tensor) -> bool:
    return type(weight).__name__ == "DTensor" or type(getattr(weight, "data", None)).__name__ == "DTensor"


def kv_bytes_per_row(hf_model: nn.Module, positions: int, dtype: torch.dtype | None = None) -> int:
    """Bytes of the KV cache of one row holding ``positions`` positions (all layers, keys and values), in
    ``dtype`` (the compute dtype; default: the weights' own)."""
    cfg = hf_model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = torch.empty((), dtype=dtype).element_size() if dtype is not None else next(hf_model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem * positions


def prompt_chunks(num_prompts: int, g: int, row_bytes: int, budget_bytes: float | None) -> list[list[int]]:
    """Consecutive prompt indices in chunks whose ``G`` rows each fit ``budget_bytes`` of KV cache (≥ 1 prompt).

    Example: 5 prompts, G = 2, 10 bytes a row, budget 45 → 2 prompts (40 bytes) a chunk: [[0, 1], [2, 3], [4]].
    """
    if budget_bytes is None:
        return [list(range(num_prompts))]
    per_chunk = max(1, int(budget_bytes // max(g * row_bytes, 1)))
    return [list(range(i, min(num_prompts, i + per_chunk))) for i in range(0, num_prompts, per_chunk)]


class FastHFEngine(HFEngine):
    """Hugging Face rollouts made faster.

    1. **LoRA merged for the rollout** (``merge_lora``): every LoRA layer's base weight becomes
       ``W + s · (B @ A)`` and the adapters are switched off, so a decode step runs one matmul per layer
       instead of three. A copy of the base weights of the merged layers is kept and copied back afterwards,
       so the weights are bit-identical after the rollout (peft's ``merge_adapter``/``unmerge_adapter``
       subtract the delta again, which is not exact in floating point). Cost: one copy of those weights while
       generating. Merged weights round differently from ``W x + s·B(A x)``: samples equal the unmerged path's
       up to near-ties of the logits, not bit for bit. FSDP2 weights are merged in their gathered copy
       (freed after the rollout; the shards never change); FSDP1 shards are never merged.
    2. **Decode chunked by a memory budget** (``decode_memory_gib``): prompts are decoded in chunks as large as
       the KV cache of their ``G`` rows, ``P + max_new_tokens`` positions each, allows, instead of one fixed
       batch: the most rows decode together that fit. ``None`` decodes all prompts at once. Chunks draw their
       samples in turn, so a chunked rollout differs from an unchunked one for the same seed. Under
       ``synced_gpus`` (FSDP) there is one chunk, so every process steps the same number of times.
    3. **Static KV cache** (``static_cache``, off by default, only with ``shared_prefill=False``): a
       preallocated cache whose decode step Hugging Face compiles (``torch.compile``) on GPU; ``compile=True``
       compiles on any device. On CPU (transformers 5.24, torch 2.13) the static cache gives the same greedy
       ids as the dynamic one at the same speed, and compiling the decode step had not finished after 5
       minutes on 2 cores (tiny model), hence off by default; the compiled path is unmeasured.

    Args:
        shared_prefill: encode each image and prefill each prompt once (as ``HFEngine``); default on.
        merge_lora: fold the LoRA adapters into the weights for the rollout (restored bit-exactly after).
        decode_memory_gib: KV-cache budget of one decode chunk in GiB (``None``: all prompts at once).
        static_cache: a static KV cache (needs ``shared_prefill=False``); compiled decode on GPU.
        compile: with ``static_cache``: ``True`` compiles on any device, ``False`` never, ``None`` HF's choice.
    """

    def __init__(self, shared_prefill: bool = True, merge_lora: bool = True, decode_memory_gib: float | None = None,
                 static_cache: bool = False, compile: bool | None = None) -> None:
        super().__init__(shared_prefill=shared_prefill)
        if static_cache and shared_prefill:
            raise ValueError("FastHFEngine: static_cache needs shared_prefill=False")
        self.merge_lora = bool(merge_lora)
        self.decode_memory_gib = decode_memory_gib
        self.static_cache = bool(static_cache)
        self.compile = compile

    def generate(self, policy: Any, prompt_batch: dict[str, Any], sampling: Sampling,
                 synced_gpus: bool = False) -> Rollout:
        g = sampling.num_generations
        inputs = policy.model_inputs(prompt_batch)
        n, width = inputs["input_ids"].shape
        budget = None if (self.decode_memory_gib is None or synced_gpus) else self.decode_memory_gib * 2**30
        row_bytes = kv_bytes_per_row(policy.hf_model, width + sampling.max_new_tokens, policy.compute_dtype)
        chunks = prompt_chunks(n, g, row_bytes, budget)
        merge = merged_lora(policy.model) if (self.merge_lora and policy.is_lora) else contextlib.nullcontext()
        outs = []
        # FSDP2: the weights are gathered once for every chunk (and merged whole); no collective per token
        with whole_weights(policy), merge:
            for rows in chunks:
                sub = inputs if len(chunks) == 1 else select_rows(inputs, rows)
                outs.append(policy.generate(sub, shared_prefill=self.shared_prefill, synced_gpus=synced_gpus,
                                            static_cache=self.static_cache, compile=self.compile,
                                            **sampling.generate_kwargs()))
        pad = policy.pad_token_id
        return Rollout.from_completions(
            prompt_batch, g, pad_right([o.completion_ids for o in outs], pad),
            pad_right([o.completion_mask for o in outs], 0), torch.cat([o.truncated for o in outs]),
            [t for o in outs for t in o.texts])

    def __repr__(self) -> str:
        return (f"FastHFEngine(shared_prefill={self.shared_prefill}, merge_lora={self.merge_lora}, "
                f"decode_memory_gib={self.decode_memory_gib}, static_cache={self.static_cache}, "
                f"compile={self.compile})")
