"""The Qwen3-VL policy shared by every training stage: load, LoRA, per-token log-probs, generation.

``Policy.from_pretrained`` loads any Qwen3-VL checkpoint folder or hub id (``Qwen/Qwen3-VL-8B-Instruct`` or
the tiny one written by ``radvlm.tiny``) through ``AutoModelForImageTextToText``; ``trust_remote_code`` is
never set. The processor comes from ``radvlm.processor.load_processor`` (no torchvision needed).

Batches are the dictionaries produced by ``datamodules.collate``: ``input_ids``, ``attention_mask`` (N, T),
``mm_token_type_ids`` (N, T; 1 on image tokens), ``pixel_values`` (patches, D) and ``image_grid_thw``
(images, 3). Prompts are left-padded so completions can be appended on the right.

Rollouts: ``generate(..., shared_prefill=True)`` runs the vision tower and the prompt prefill once per prompt
and copies the KV cache G times (``radvlm.generation.shared_prefill_generate``); same samples for one seed.
Log-probs and the SFT loss project to the vocabulary a chunk at a time (``radvlm.vocab_chunks``).

Export: ``save_pretrained(merge_lora=True)`` folds the adapters into the base weights of a state dict
(``merge_lora_state_dict``) instead of ``merge_and_unload``, so the live model keeps its adapters and a full
state dict gathered from FSDP shards is merged by the very same code.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from radvlm.batch import pack_rows, repeat_batch, select_rows, trim_padding  # noqa: F401  (repeat_batch re-exported)
from radvlm.generation import (
    GenerationOutput,
    build_generation_config,
    completion_mask_from_ids,
    mrope_position_ids,
    shared_prefill_generate,
)
from radvlm.lora import LoRASettings, lora_scalings, merge_lora_state_dict  # noqa: F401  (re-exported)
from radvlm.prefix import prefix_groups, row_image_ids
from radvlm.processor import load_processor
from radvlm.vocab_chunks import chunked_ce_sum, chunked_logprobs

#: tokens the policy must never sample: a sampled vision token breaks the next forward pass
VISION_SPECIAL_TOKENS = ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|vision_pad|>")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` → ``torch.bfloat16`` (clear error otherwise)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from None


@dataclass
class PolicyConfig:
    """What to load as the policy; LightningModules take this and build the model in ``configure_model``.

    Args:
        name_or_path: checkpoint folder or hub id (``Qwen/Qwen3-VL-8B-Instruct``, a tiny folder, an SFT export).
        dtype: the compute dtype of the forward passes: ``bfloat16`` on GPU; ``float32`` for CPU tests.
        master_dtype: the dtype of the trainable weights, i.e. of what the optimizer updates and of its state
            (``float32``, the default: bf16 compute over fp32 master weights). ``None`` trains the weights in
            ``dtype`` itself (pure bf16: an AdamW step at lr 1e-6 moves only a few % of bf16 weights; warned).
            Frozen weights (LoRA's base, a frozen vision tower, GRPO's reference) are kept in ``dtype``.
            Evaluation and prediction load everything in ``dtype``.
        lora: LoRA settings, or ``None`` for a full fine-tune.
        gradient_checkpointing: recompute activations in backward (on in real configs).
        freeze_vision: keep the vision tower fixed.
        attn_implementation: ``sdpa`` (default), ``flash_attention_2`` or ``eager``.
        min_pixels, max_pixels: image pixel budget (Qwen3-VL in the paper: 1024 … 451584).
    """

    name_or_path: str
    dtype: str = "bfloat16"
    master_dtype: str | None = "float32"
    lora: LoRASettings | None = None
    gradient_checkpointing: bool = False
    freeze_vision: bool = False
    attn_implementation: str = "sdpa"
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        path = Path(str(self.name_or_path))
        lightning = path.suffix == ".ckpt" or (path.is_dir() and (path / "meta.pt").is_file()
                                               and any(path.glob("*.distcp")))
        if lightning:
            raise ValueError(f"policy.name_or_path {str(path)!r} is a Lightning checkpoint (training state), not a "
                             f"Hugging Face model folder: start the next stage from the run's export (its "
                             f"export_dir, written when fit ends), e.g. --model.init_args.policy.name_or_path "
                             f"runs/sft/hf_export; to continue the same run, keep its config and pass --ckpt_path")

    def dtypes(self, train: bool = True) -> tuple[torch.dtype, torch.dtype]:
        """``(master, compute)``: the dtype of trainable weights and of the forward passes (equal when not
        training or when ``master_dtype`` is ``None``)."""
        compute = resolve_dtype(self.dtype)
        master = resolve_dtype(self.master_dtype) if (train and self.master_dtype is not None) else compute
        return master, compute

    def build(self, train: bool = True) -> "Policy":
        """The policy, trainable weights in the master dtype and the rest in the compute dtype (``train``);
        everything in the compute dtype otherwise."""
        from radvlm.sharding import apply_master_dtype

        master, compute = self.dtypes(train)
        # a full fine-tune trains (nearly) every weight: load it in the master dtype (no bf16 round trip of
        # a float32 checkpoint); LoRA trains only adapters: load the frozen base in the compute dtype
        load = master if self.lora is None else compute
        policy = Policy.from_pretrained(
            self.name_or_path, dtype=load, lora=self.lora, gradient_checkpointing=self.gradient_checkpointing,
            freeze_vision=self.freeze_vision, attn_implementation=self.attn_implementation,
            min_pixels=self.min_pixels, max_pixels=self.max_pixels,
        )
        if master != compute or load != compute:
            apply_master_dtype(policy.model, master, compute)
        policy.compute_dtype = compute
        return policy


class Policy(nn.Module):
    """A Qwen3-VL model and its processor. ``model`` may be a peft ``PeftModel`` (LoRA)."""

    def __init__(self, model: nn.Module, processor: Any, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        #: the dtype of the forward passes; ``None``: the weights' own. When weights are stored in another
        #: dtype (float32 master weights), unsharded passes run under autocast to it and ``shard_policy``
        #: gives FSDP2 a ``MixedPrecisionPolicy`` with it as ``param_dtype``.
        self.compute_dtype = compute_dtype
        tok = processor.tokenizer
        self.stop_token_ids = [i for i in (tok.convert_tokens_to_ids(t) for t in STOP_TOKENS) if i is not None]
        self.suppress_token_ids = [tok.convert_tokens_to_ids(t) for t in VISION_SPECIAL_TOKENS
                                   if t in tok.get_vocab()]
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.stop_token_ids[0]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        dtype: str | torch.dtype = "float32",
        lora: LoRASettings | None = None,
        gradient_checkpointing: bool = False,
        freeze_vision: bool = False,
        attn_implementation: str = "sdpa",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ) -> "Policy":
        """Load a Qwen3-VL checkpoint (local folder or hub id) and its processor, in train mode."""
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(
            str(name_or_path), dtype=resolve_dtype(dtype), attn_implementation=attn_implementation
        )
        processor = load_processor(name_or_path, min_pixels=min_pixels, max_pixels=max_pixels)
        if freeze_vision:
            for p in model.model.visual.parameters():
                p.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora.peft_config())
        model.train()  # from_pretrained returns eval mode
        return cls(model, processor)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def hf_model(self) -> nn.Module:
        """The underlying ``Qwen3VLForConditionalGeneration`` (LoRA layers, if any, are injected in it)."""
        return self.model.get_base_model() if self.is_lora else self.model

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Run as the reference policy: LoRA adapters disabled (only meaningful with LoRA)."""
        if not self.is_lora:
            raise RuntimeError("reference() needs LoRA; for a full fine-tune keep a frozen copy of the policy")
        with self.model.disable_adapter():
            yield

    def save_pretrained(self, path: str | Path, merge_lora: bool = False,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Save model and processor to ``path``: a full checkpoint, or with LoRA the adapters only, or with
        ``merge_lora`` a plain checkpoint of merged weights (the live model keeps its adapters).

        ``state_dict``: the full state dict of ``self.model`` to save instead of the live one (e.g. gathered
        from FSDP shards).
        """
        if self.is_lora and merge_lora:
            state = self.model.state_dict() if state_dict is None else state_dict
            weights = merge_lora_state_dict(state, lora_scalings(self.model))
            self.hf_model.save_pretrained(str(path), state_dict=weights)
        else:
            self.model.save_pretrained(str(path), state_dict=state_dict)
        self.processor.save_pretrained(str(path))

    # ------------------------------------------------------------------ forward passes
    def compute_context(self) -> contextlib.AbstractContextManager:
        """Autocast to ``compute_dtype`` when some weight is stored in another dtype (float32 master weights);
        a no-op otherwise. Under FSDP2 the gathered weights already are in the compute dtype and the autocast
        only keeps the few ops that read stored weights (none in Qwen3-VL) consistent."""
        from radvlm.sharding import local_dtype

        dtype = self.compute_dtype
        params = [p for p in self.model.parameters() if p.is_floating_point()]
        if dtype is None or not params or all(local_dtype(p) == dtype for p in params):
            return contextlib.nullcontext()
        return torch.autocast(params[0].device.type, dtype=dtype)

    @staticmethod
    def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}

    def _forward_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``model_inputs``; for rows that share images (``distinct_pixel_values``, ``image_index``: rollouts),
        the vision features computed once per distinct image instead of ``pixel_values``."""
        inputs = self.model_inputs(batch)
        if batch.get("distinct_pixel_values") is not None:
            inputs["mm_encoder_outputs"] = {"image": self.shared_image_features(batch)}
        return inputs

    def needs_idle_vision(self, batch: dict[str, Any]) -> bool:
        """Whether a forward of ``batch`` must run the vision tower on a stand-in image: this process is one of
        several (``torch.distributed``) and ``batch`` carries no image, while another rank's batch may. Under
        FSDP2 every vision block is a unit whose weights are gathered in forward and whose gradients are
        reduced in backward, collectives every rank must join in the same order; under DDP a tower without a
        gradient on one rank breaks the gradient reduction. Decided from this rank's batch alone, so no
        collective is needed to agree on it (a step where no rank has an image runs the stand-in everywhere)."""
        if batch.get("pixel_values") is not None or batch.get("distinct_pixel_values") is not None:
            return False
        if getattr(self.hf_model.model, "visual", None) is None:
            return False
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def idle_vision_zero(self) -> torch.Tensor:  # () float32
        """A zero that depends on every weight of the vision tower: the tower run on one black stand-in image of
        the smallest grid (one merged token, ``spatial_merge_size²`` patches), its pooled and deepstack outputs
        summed and multiplied by 0. Added to a text-only forward (``idle_vision``), it makes the tower gather
        its weights and, in backward, receive an all-zero gradient, as on the ranks that saw images."""
        vision = self.hf_model.config.vision_config
        merge = vision.spatial_merge_size
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        device = self.hf_model.get_input_embeddings().weight.device
        pixels = torch.zeros(merge * merge, width, device=device)  # (patches, D)
        grid = torch.tensor([[1, merge, merge]], device=device)  # (1, 3)
        out = self.hf_model.model.get_image_features(pixels, grid, return_dict=True)
        parts = list(out.pooler_output) + [t for layer in (out.deepstack_features or ())
                                           for t in (layer if isinstance(layer, (list, tuple)) else (layer,))]
        return sum(part.float().sum() for part in parts) * 0.0

    @contextlib.contextmanager
    def idle_vision(self, batch: dict[str, Any]) -> Iterator[None]:
        """Around one forward of ``batch``: when ``needs_idle_vision``, run the tower first on the stand-in
        (``idle_vision_zero``) and add its zero to the token embeddings, so the tower's collectives come where
        an image rank's come (its weights gathered before the decoder layers', its gradients reduced after
        theirs) and the values are unchanged. A no-op otherwise."""
        if not self.needs_idle_vision(batch):
            yield
            return
        zero = self.idle_vision_zero()
        handle = self.hf_model.get_input_embeddings().register_forward_hook(
            lambda _module, _inputs, embeds: embeds + zero.to(embeds.dtype))
        try:
            yield
        finally:
            handle.remove()

    def shared_image_features(self, batch: dict[str, Any]) -> Any:
        """Vision features of each distinct image once (``distinct_pixel_values``, ``distinct_image_grid_thw``),
        handed to every row that shows it (``image_index``): the tower runs once per image, and in backward the
        gradients of the rows of an image add up in its features, as over repeated copies. The model's own
        ``get_image_features`` output, the per-image tuples re-indexed by row (pooled and deepstack)."""
        out = self.hf_model.model.get_image_features(batch["distinct_pixel_values"], batch["distinct_image_grid_thw"],
                                                     return_dict=True)
        index = batch["image_index"].tolist()  # (N,) row → distinct image
        out.pooler_output = tuple(out.pooler_output[j] for j in index)
        out.deepstack_features = [tuple(layer[j] for j in index) for layer in out.deepstack_features]
        return out

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:  # (N, T, V) logits
        with self.compute_context(), self.idle_vision(batch):
            return self.hf_model(**self._forward_inputs(batch), use_cache=False).logits

    def hidden_states(self, batch: dict[str, Any]) -> torch.Tensor:  # (N, T, H)
        with self.compute_context(), self.idle_vision(batch):
            out = self.hf_model.model(**self._forward_inputs(batch), use_cache=False)
        return out.last_hidden_state

    def packed_hidden_states(self, batch: dict[str, Any], completion_mask: torch.Tensor) -> torch.Tensor:  # (N, C, H)
        """The hidden state before each completion token (the one that predicts it), from one forward of every
        row's real tokens packed into one sequence (``radvlm.batch.pack_rows``): no compute on padding.

        Each row keeps its own text and M-RoPE positions (``mrope_position_ids``: the positions the padded
        forward uses) and attends only to itself (the packed-sequence mask the model builds from the restarting
        text positions; varlen kernels under ``flash_attention_2``), so the values are those of the padded
        forward up to float rounding. Slots outside ``completion_mask`` read the first packed state (their
        log-probs are masked to 0 by the caller)."""
        n, c = completion_mask.shape
        rows = dict(batch)
        if rows.get("distinct_image_grid_thw") is not None and rows.get("image_grid_thw") is None:
            rows["image_grid_thw"] = rows["distinct_image_grid_thw"][rows["image_index"]]  # (N, 3): for the positions
        positions = mrope_position_ids(self.hf_model, rows)  # (4, N, T)
        packed, where = pack_rows(batch, positions)
        with self.compute_context(), self.idle_vision(packed):
            out = self.hf_model.model(**self._forward_inputs(packed), position_ids=packed["position_ids"],
                                      use_cache=False)
        hidden = out.last_hidden_state[0]  # (S, H)
        before = (where[:, -c:] - 1).clamp(min=0)  # (N, C): the packed index of the state before each token
        return hidden[before]  # (N, C, H)

    def shared_prefix_hidden_states(self, batch: dict[str, Any], completion_mask: torch.Tensor) -> torch.Tensor:
        """The hidden state before each completion token (N, C, H), with every distinct prompt (and its image)
        computed once: the prompts' columns ``(U, P)`` go through the model into a KV cache, the cache is
        copied to the rows of each prompt, and the completions ``(N, C - 1)`` attend to it (PrefixGrouper's
        idea, the way ``shared_prefill_generate`` decodes). Without gradients only (``token_logprobs``).

        Rows share a prompt when their prompt columns (tokens where attended, and the attention mask) and their
        image (``row_image_ids``) are equal (``prefix_groups``). Positions are the M-RoPE
        positions of the padded forward (``mrope_position_ids``), so the values are those of the padded forward
        up to float rounding."""
        from transformers import DynamicCache

        ids, mask = batch["input_ids"], batch["attention_mask"]  # (N, T)
        n, c = completion_mask.shape
        p = ids.shape[1] - c  # prompt columns
        rows = dict(batch)
        if rows.get("distinct_image_grid_thw") is not None and rows.get("image_grid_thw") is None:
            rows["image_grid_thw"] = rows["distinct_image_grid_thw"][rows["image_index"]]  # (N, 3): for the positions
        positions = mrope_position_ids(self.hf_model, rows)  # (4, N, T)
        first, inverse = prefix_groups(ids[:, :p], mask[:, :p], row_image_ids(batch))  # (U,), (N,)
        prefix = select_rows(batch, first.tolist())
        prefix = {k: v[:, :p] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == ids.shape[1] else v
                  for k, v in prefix.items()}
        model = self.hf_model.model
        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache = DynamicCache(config=self.hf_model.config.get_text_config(decoder=True))
        with self.compute_context():
            with self.idle_vision(prefix):  # the completions' forward below runs no tower on any rank
                out = model(**self._forward_inputs(prefix), position_ids=positions[:, first, :p], use_cache=True,
                            **{cache_kw: cache})
            last = out.last_hidden_state[:, -1:]  # (U, 1, H): predicts every row's first completion token
            if c == 1:
                return last[inverse]  # (N, 1, H)
            cache.batch_select_indices(inverse.to(ids.device))  # (N, heads, P, d) per layer
            tail = model(input_ids=ids[:, p:-1], attention_mask=mask[:, :-1], position_ids=positions[..., p:-1],
                         use_cache=True, **{cache_kw: cache}).last_hidden_state  # (N, C - 1, H)
        return torch.cat([last[inverse], tail], dim=1)  # (N, C, H)

    def token_logprobs(
        self,
        batch: dict[str, Any],
        completion_mask: torch.Tensor,
        temperature: float = 1.0,
        chunk_size: int = 256,
        return_entropy: bool = False,
        packed: bool = False,
        entropy_grad: bool = False,
        shared_prefix: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities of the last ``C`` tokens of ``batch["input_ids"]`` (the completions).

        ``completion_mask`` is (N, C); positions outside it get 0. Logits are formed ``chunk_size`` positions
        at a time for the completion positions only (never (N, T, V) at once), divided by ``temperature``
        (match the sampling temperature), and each chunk is recomputed in backward (checkpointed) so float32
        vocabulary-sized logits never pile up. ``return_entropy`` also gives the per-token entropy over the full
        vocabulary of the same tempered distribution, ``H = logsumexp(z) − Σ softmax(z)·z`` with ``z = logits / T``
        (N, C): detached, or with its gradient under ``entropy_grad`` (an entropy bonus); it is computed only when
        asked.
        ``packed``: one padding-free forward of all rows (``packed_hidden_states``) instead of the padded
        (N, T) one; the same values and gradients up to float rounding. ``shared_prefix`` (no-grad passes: π_old,
        reference): each distinct prompt once, the completions attending to its cached keys and values
        (``shared_prefix_hidden_states``); the same values up to float rounding. Both set: packed.
        """
        if shared_prefix and torch.is_grad_enabled():
            raise ValueError("token_logprobs(shared_prefix=True) is for the passes without gradient (π_old, "
                             "reference); the update pass uses the padded or packed forward")
        full_width = completion_mask.shape[1]
        if not packed:  # columns that are padding in every row: none of the padded pass's compute goes to them
            batch, completion_mask, _ = trim_padding(batch, completion_mask)
        ids = batch["input_ids"]  # (N, T)
        n, c = completion_mask.shape
        if packed:
            h = self.packed_hidden_states(batch, completion_mask)  # (N, C, H)
        elif shared_prefix:
            h = self.shared_prefix_hidden_states(batch, completion_mask)  # (N, C, H)
        else:
            hidden = self.hidden_states(batch)  # (N, T, H)
            h = hidden[:, -c - 1 : -1]  # (N, C, H): the state before each completion token predicts it
        targets = ids[:, -c:]  # (N, C)
        lp, ent = chunked_logprobs(self.hf_model.lm_head, h, targets, temperature, chunk_size, return_entropy,
                                   self.compute_context())  # (N, C) each
        right = full_width - c  # the trimmed completion columns, given back as zeros: (N, C) whatever the trim
        logp = torch.nn.functional.pad(lp * completion_mask, (0, right))  # (N, C)
        if return_entropy:
            ent = ent if entropy_grad else ent.detach()
            return logp, torch.nn.functional.pad(ent * completion_mask, (0, right))
        return logp

    def sft_loss(self, batch: dict[str, Any], chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over labelled positions and their count (mean = sum / count).

        Only the positions with a label are projected to the vocabulary, ``chunk_size`` at a time and
        checkpointed, so (N, T, V) logits are never materialised.
        """
        labels = batch["labels"][:, 1:]  # (N, T-1): token t+1 is predicted at position t
        hidden = self.hidden_states(batch)[:, :-1]  # (N, T-1, H)
        keep = labels != -100  # (N, T-1)
        h = hidden[keep]  # (K, H)
        y = labels[keep]  # (K,)
        total = chunked_ce_sum(self.hf_model.lm_head, h, y, chunk_size, self.compute_context())
        return total, int(y.numel())

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, Any],
        num_return_sequences: int = 1,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        shared_prefill: bool = False,
        synced_gpus: bool = False,
        static_cache: bool = False,
        compile: bool | None = None,
    ) -> GenerationOutput:
        """Greedy or sampled completions, ``num_return_sequences`` per prompt, grouped contiguously.

        FSDP2-sharded weights are gathered once for the whole call (``radvlm.sharding.whole_weights``: one
        all-gather per unit, none per token), so every process decodes on its own and stops at its own length;
        the call itself is a collective then (every process must make it). ``synced_gpus``: keep stepping
        until every process has finished, for FSDP1 (``FSDPStrategy``), which gathers per forward.

        ``shared_prefill``: encode each image and prefill each prompt once, then decode the G rollouts from
        copies of its KV cache (``shared_prefill_generate``); same samples for the same seed, less compute.

        ``static_cache``: a preallocated ``StaticCache`` (fixed shapes; not with ``shared_prefill``), whose decode
        step Hugging Face compiles on GPU; ``compile``: ``True`` compiles it on any device (CPU included),
        ``False`` never, ``None`` Hugging Face's choice.
        """
        if static_cache and shared_prefill:
            raise ValueError("static_cache needs shared_prefill=False (the shared prefill copies a dynamic cache)")
        config = build_generation_config(
            self.stop_token_ids, self.pad_token_id, self.suppress_token_ids, max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, static_cache=static_cache,
            compile=compile,
        )
        prompt_inputs = self.model_inputs(batch)
        from radvlm.sharding import whole_weights

        was_training = self.model.training
        self.model.eval()
        try:
            with whole_weights(self), self.compute_context():
                sequences = self._decode(prompt_inputs, num_return_sequences, config, shared_prefill, synced_gpus)
        finally:
            self.model.train(was_training)
        prompt_len = prompt_inputs["input_ids"].shape[1]
        completion = sequences[:, prompt_len:]  # (N*G, C)
        completion_mask, truncated = completion_mask_from_ids(completion, self.stop_token_ids)
        completion = completion.masked_fill(completion_mask == 0, self.pad_token_id)
        texts = self.tokenizer.batch_decode(completion, skip_special_tokens=True)
        return GenerationOutput(
            prompt_ids=prompt_inputs["input_ids"].repeat_interleave(num_return_sequences, dim=0),  # (N*G, P)
            prompt_mask=prompt_inputs["attention_mask"].repeat_interleave(num_return_sequences, dim=0),
            completion_ids=completion,
            completion_mask=completion_mask,
            truncated=truncated,
            texts=texts,
        )

    def _decode(self, prompt_inputs: dict[str, Any], g: int, config: Any, shared_prefill: bool,
                synced_gpus: bool) -> torch.Tensor:  # (N*G, P+C)
        if shared_prefill:
            return shared_prefill_generate(self.hf_model, prompt_inputs, g, config, synced_gpus=synced_gpus)
        # every prompt (and its image patches) repeated G times
        return self.hf_model.generate(**repeat_batch(prompt_inputs, g), generation_config=config,
                                      synced_gpus=synced_gpus)
