"""``VLLMEngine``: rollouts from vLLM colocated with training (optional: ``pip install radvlm[vllm]``).

Unmeasured on hardware: the plumbing below is tested on CPU against a stand-in for vLLM's ``LLM``; no GPU run
has checked its speed or its samples yet. One ``vllm.LLM`` per training process (``VLLMEngine.build``) takes
the policy's weights before every rollout (``VLLMEngine.sync_weights``); prompts, sampling and outputs are made
to match ``Policy.generate`` (``VLLMEngine.requests``, ``VLLMEngine.sampling_kwargs``, ``rollout_from_outputs``).
Log-probs of the update are recomputed by the training model, as with every engine.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

import torch

from radvlm.batch import pad_right
from radvlm.lora import lora_scalings, merge_lora_state_dict
from radvlm.rollout import Rollout, Sampling

IMAGE_PAD = "<|image_pad|>"
#: logit bias of a suppressed token (vLLM clamps biases to ±100)
SUPPRESS_BIAS = -100.0


def require_vllm():
    """The ``vllm`` module, or an ImportError that says how to get it."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError("VLLMEngine needs vLLM: pip install 'radvlm[vllm]' (or pip install vllm) on a CUDA "
                          "machine; HFEngine and FastHFEngine need nothing extra") from err
    return vllm


def policy_weights(policy: Any) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the policy's full weights under Hugging Face checkpoint names, LoRA merged."""
    state = policy.model.state_dict()
    if policy.is_lora:
        state = merge_lora_state_dict(state, lora_scalings(policy.model))
    return state.items()


def prompt_texts(policy: Any, prompt_batch: dict[str, Any]) -> list[str]:
    """Each prompt's chat-template text without padding, its image placeholder collapsed to one pad token."""
    tok = policy.tokenizer
    texts = []
    for ids, mask in zip(prompt_batch["input_ids"], prompt_batch["attention_mask"]):
        text = tok.decode(ids[mask.bool()].tolist(), skip_special_tokens=False)
        texts.append(re.sub(f"(?:{re.escape(IMAGE_PAD)})+", IMAGE_PAD, text))
    return texts


class VLLMEngine:
    """Rollouts from vLLM, colocated with training. Unmeasured on hardware.

    Args:
        gpu_memory_utilization: vLLM's share of the GPU memory (the rest is training's).
        enable_sleep_mode: let vLLM release its memory between rollouts (``llm.sleep`` / ``llm.wake_up``).
        max_model_len: longest prompt + completion (``None``: prompt width + ``max_new_tokens`` of the first call).
        llm_kwargs: more ``vllm.LLM`` arguments (``tensor_parallel_size``, ``enforce_eager`` …).
        llm: an already built ``vllm.LLM`` (or a stand-in with the same methods; tests).
        load_weights: a function ``(llm, weights)`` that loads ``(name, tensor)`` pairs into the engine; default:
            the model of vLLM's in-process driver worker (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
        sampling_params_class: what builds the sampling parameters from keywords (default
            ``vllm.SamplingParams``; tests pass ``dict``).
    """

    def __init__(self, gpu_memory_utilization: float = 0.3, enable_sleep_mode: bool = False,
                 max_model_len: int | None = None, llm_kwargs: dict[str, Any] | None = None, llm: Any = None,
                 load_weights: Callable[[Any, Iterable[tuple[str, torch.Tensor]]], None] | None = None,
                 sampling_params_class: Callable[..., Any] | None = None) -> None:
        self.gpu_memory_utilization = float(gpu_memory_utilization)
        self.enable_sleep_mode = bool(enable_sleep_mode)
        self.max_model_len = max_model_len
        self.llm_kwargs = dict(llm_kwargs or {})
        self.llm = llm
        self._load_weights = load_weights or _driver_load_weights
        self._params_class = sampling_params_class
        self.synced_steps = 0

    # ------------------------------------------------------------------ engine
    def build(self, policy: Any, max_model_len: int) -> Any:
        """The colocated ``vllm.LLM`` for the policy's checkpoint (built once).

        One ``vllm.LLM`` per training process, on the same GPU (``gpu_memory_utilization`` is its share;
        ``enable_sleep_mode`` lets it release that memory between rollouts), built lazily from the policy's
        checkpoint folder on the first rollout, or injected (``llm=``). Images are processed with the policy
        processor's ``min_pixels``/``max_pixels`` (``mm_processor_kwargs``): the same pixel budget.
        """
        if self.llm is None:
            vllm = require_vllm()
            image = policy.processor.image_processor
            pixels = {k: getattr(image, k) for k in ("min_pixels", "max_pixels") if getattr(image, k, None)}
            self.llm = vllm.LLM(model=str(policy.hf_model.config._name_or_path), dtype=_dtype_name(policy),
                                gpu_memory_utilization=self.gpu_memory_utilization,
                                enable_sleep_mode=self.enable_sleep_mode, limit_mm_per_prompt={"image": 1},
                                mm_processor_kwargs=pixels, max_model_len=self.max_model_len or max_model_len,
                                **self.llm_kwargs)
        return self.llm

    def sync_weights(self, policy: Any) -> None:
        """Load the policy's current weights (LoRA merged) into vLLM; done before every rollout.

        The training policy's weights, LoRA merged (``radvlm.lora.merge_lora_state_dict``: ``W + s·B@A``, peft
        prefixes and ``.base_layer`` dropped), under their Hugging Face checkpoint names
        (``model.language_model.*``, ``model.visual.*``, ``lm_head.*``), which vLLM's Qwen3-VL ``load_weights``
        maps onto its own layout. Then the prefix cache is reset. A frozen vision tower is sent too (a few
        hundred MB; simpler than tracking what changed).
        """
        if self.llm is None:  # built on the first rollout from the checkpoint: already the current weights
            return
        if self.enable_sleep_mode and hasattr(self.llm, "wake_up"):
            self.llm.wake_up()
        with torch.no_grad():
            self._load_weights(self.llm, policy_weights(policy))
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self.synced_steps += 1

    def sampling_params(self, policy: Any, sampling: Sampling) -> Any:
        make = self._params_class or require_vllm().SamplingParams
        return make(**self.sampling_kwargs(policy, sampling))

    @staticmethod
    def sampling_kwargs(policy: Any, sampling: Sampling) -> dict[str, Any]:
        """``SamplingParams(n=G, temperature, top_p, top_k (-1: off), max_tokens, stop_token_ids)``, vision
        special tokens suppressed by ``logit_bias`` −100 (vLLM's limit), special tokens skipped in texts."""
        greedy = not sampling.do_sample
        return {"n": sampling.num_generations, "temperature": 0.0 if greedy else sampling.temperature,
                "top_p": 1.0 if greedy else sampling.top_p, "top_k": -1 if greedy else (sampling.top_k or -1),
                "max_tokens": sampling.max_new_tokens, "stop_token_ids": list(policy.stop_token_ids),
                "logit_bias": {int(t): SUPPRESS_BIAS for t in policy.suppress_token_ids},
                "skip_special_tokens": True}

    def requests(self, policy: Any, prompt_batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Each prompt's own chat-template text (its ids decoded with special tokens kept, the run of
        ``<|image_pad|>`` collapsed to one, as vLLM expands it again: ``prompt_texts``) with its image."""
        from PIL import Image

        out = []
        for text, image in zip(prompt_texts(policy, prompt_batch), prompt_batch["images"]):
            request: dict[str, Any] = {"prompt": text}
            if image is not None:
                request["multi_modal_data"] = {"image": Image.open(image).convert("RGB")}
            out.append(request)
        return out

    def generate(self, policy: Any, prompt_batch: dict[str, Any], sampling: Sampling,
                 synced_gpus: bool = False) -> Rollout:
        width = int(prompt_batch["input_ids"].shape[1])
        llm = self.build(policy, width + sampling.max_new_tokens)
        outputs = llm.generate(self.requests(policy, prompt_batch), self.sampling_params(policy, sampling),
                               use_tqdm=False)
        rollout = rollout_from_outputs(policy, prompt_batch, sampling, outputs)
        if self.enable_sleep_mode and hasattr(llm, "sleep"):
            llm.sleep(level=1)  # give training the memory back until the next rollout
        return rollout

    def __repr__(self) -> str:
        return f"VLLMEngine(gpu_memory_utilization={self.gpu_memory_utilization})"


def rollout_from_outputs(policy: Any, prompt_batch: dict[str, Any], sampling: Sampling, outputs: list[Any]) -> Rollout:
    """vLLM ``RequestOutput`` s (one per prompt, ``n`` completions each) → a ``Rollout`` (rows grouped).

    The ``n`` completions of prompt ``i`` become rows ``i·G … i·G+G−1``; a completion that stopped gets its
    stop token back if vLLM left it out; mask, truncation and texts as ``Policy.generate`` makes them.
    """
    from radvlm.policy import completion_mask_from_ids

    g = sampling.num_generations
    stops = list(policy.stop_token_ids)
    rows: list[torch.Tensor] = []
    for request in outputs:
        if len(request.outputs) != g:
            raise ValueError(f"vLLM returned {len(request.outputs)} completions for a prompt, expected {g}")
        for completion in request.outputs:
            ids = list(completion.token_ids)
            if completion.finish_reason == "stop" and (not ids or ids[-1] not in stops):
                reason = getattr(completion, "stop_reason", None)
                ids.append(reason if isinstance(reason, int) else stops[0])  # the stop token vLLM left out
            rows.append(torch.tensor(ids or [policy.pad_token_id], dtype=torch.long).unsqueeze(0))
    device = prompt_batch["input_ids"].device
    completion = pad_right(rows, policy.pad_token_id).to(device)  # (B*G, C)
    mask, truncated = completion_mask_from_ids(completion, stops)
    completion = completion.masked_fill(mask == 0, policy.pad_token_id)
    texts = policy.tokenizer.batch_decode(completion, skip_special_tokens=True)
    return Rollout.from_completions(prompt_batch, g, completion, mask, truncated, texts)


def _driver_load_weights(llm: Any, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Weights into the model of vLLM's in-process driver worker (as TRL's colocate mode does)."""
    executor = llm.llm_engine.model_executor
    worker = executor.driver_worker
    model = getattr(worker, "worker", worker).model_runner.model
    model.load_weights(weights)


def _dtype_name(policy: Any) -> str:
    return str(next(policy.hf_model.parameters()).dtype).removeprefix("torch.")
