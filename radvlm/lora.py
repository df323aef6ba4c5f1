"""LoRA for the policy: the adapter settings, and folding trained adapters into plain Hugging Face weights.

``merge_lora_state_dict`` works on a state dict, not on the live model (peft's ``merge_and_unload`` would
strip the adapters of the model being trained): the single-process export and the full state dict gathered
from FSDP shards are merged by the same function. ``lora_scalings`` reads each layer's own scaling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn


@dataclass
class LoRASettings:
    """LoRA adapters through peft. By default only the language model's linear layers get adapters."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    language_only: bool = True

    def peft_config(self):
        from peft import LoraConfig

        names = "|".join(self.target_modules)
        # a regex is matched against full module names: restrict to the language model when asked
        target = rf".*language_model.*\.({names})$" if self.language_only else rf".*\.({names})$"
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=target,
                          bias="none")



#: name segments that FSDP, activation checkpointing and torch.compile insert into module names
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
_LORA_KEY = re.compile(r"(^|\.)lora_")


def lora_scalings(model: nn.Module, adapter: str = "default") -> dict[str, float]:
    """The scaling ``s`` of every LoRA layer of a peft ``model``, by module name (as in its state-dict keys).

    ``s`` is the layer's own ``scaling[adapter]``, which peft set from the config: ``lora_alpha / r`` (or
    ``lora_alpha / sqrt(r)`` with rsLoRA, rank and alpha patterns included). Segments that wrappers insert into
    module names (FSDP, activation checkpointing) are dropped, so the names match full-state-dict keys.
    """
    from peft.tuners.lora import LoraLayer

    scalings = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            for segment in _WRAPPER_SEGMENTS:
                name = name.replace(segment, "")
            scalings[name] = float(module.scaling[adapter])
    return scalings


def merge_lora_state_dict(
    state: Mapping[str, torch.Tensor],
    scaling: float | Mapping[str, float],
    adapter: str = "default",
    prefix: str = "base_model.model.",
) -> dict[str, torch.Tensor]:
    """Fold the LoRA adapters of a peft state dict into their base weights, under plain Hugging Face names.

    For every LoRA-wrapped linear ``m`` (keys ``m.base_layer.weight``, ``m.lora_A.<adapter>.weight``,
    ``m.lora_B.<adapter>.weight``): ``W = W_base + s · (B @ A)``, with ``s = scaling[m]`` (or ``scaling`` for
    all; peft: ``lora_alpha / r``), computed in float32 and cast back to ``W_base``'s dtype. The lora keys are
    dropped, ``.base_layer`` leaves the names and so does ``prefix`` (peft's ``base_model.model.``); other
    tensors are passed through, not copied. A LoRA key that cannot be merged this way (another adapter, DoRA
    magnitudes, LoRA biases, embedding adapters, ``A`` without ``B``) is an error, never silently dropped.
    """
    a_end, b_end = f".lora_A.{adapter}.weight", f".lora_B.{adapter}.weight"
    merged: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for a_key in [k for k in state if k.endswith(a_end)]:
        module = a_key[: -len(a_end)]
        base_key, b_key = f"{module}.base_layer.weight", module + b_end
        if base_key not in state or b_key not in state:
            raise ValueError(f"LoRA layer {module!r} lacks {base_key if base_key not in state else b_key!r}")
        if isinstance(scaling, Mapping):
            if module not in scaling:
                raise ValueError(f"no LoRA scaling given for {module!r}")
            s = float(scaling[module])
        else:
            s = float(scaling)
        w = state[base_key]  # (out, in)
        a = state[a_key].float()  # (r, in)
        b = state[b_key].float()  # (out, r)
        merged[base_key] = (w.float() + s * (b @ a)).to(w.dtype)  # (out, in)
        consumed.update((a_key, b_key))
    unmergeable = [k for k in state if k not in consumed and _LORA_KEY.search(k)]
    if unmergeable:
        raise ValueError(f"cannot merge LoRA keys {unmergeable[:3]} ({len(unmergeable)} in all): only plain LoRA "
                         f"linears of adapter {adapter!r} are supported")
    out = {}
    for key, value in state.items():
        if key in consumed:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        out[name.replace(".base_layer.", ".")] = merged.get(key, value)
    return out
