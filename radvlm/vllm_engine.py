"""``VLLMEngine``: rollouts from vLLM colocated with training, one engine per rank (``pip install radvlm[vllm]``).

Written against vLLM 0.28–0.30 (the releases that pin torch 2.13 and accept transformers 5.25; docs/vllm.md).
It is tested on CPU against a stand-in with vLLM's API (tests/fake_vllm.py); no GPU run has checked its speed or
samples yet. Per step: ``sync_weights`` wakes the weights, streams the training weights in (one parameter at a
time: FSDP2 shards gathered, LoRA merged, in buckets), wakes the KV cache; ``generate`` samples G completions per
prompt with their log-probs (``Rollout.logprobs``, compared with the trainer's and used by the rollout
correction, ``default_correction``) and puts the engine back to sleep (level 2: weights and KV cache freed).
Prompts are the trainer's own token ids (the image-pad run collapsed to one token: vLLM expands it again) with
the image as the data module decoded it; the pixel budget is the processor's ``size``.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any, Iterator

import torch

from radvlm.batch import pad_right
from radvlm.lora import lora_scalings, merge_lora_state_dict
from radvlm.rollout import Rollout, Sampling
from radvlm.rollout_correction import RolloutCorrection

IMAGE_PAD = "<|image_pad|>"
#: logit bias of a suppressed token (vLLM's ``SamplingParams.from_optional`` clamps biases to ±100)
SUPPRESS_BIAS = -100.0
#: the vLLM releases that install beside torch 2.13 and transformers 5.25 (docs/vllm.md)
VLLM_MIN, VLLM_BELOW = (0, 28), (0, 31)
VLLM_RANGE = "vllm>=0.28,<0.31"


def require_vllm():
    """The ``vllm`` module, or an ImportError that says which versions work and how to get one."""
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"VLLMEngine needs vLLM: pip install 'radvlm[vllm]' ({VLLM_RANGE}) on a CUDA machine; "
                          "HFEngine and FastHFEngine need nothing extra") from err
    version = tuple(int(x) for x in vllm.__version__.split(".")[:2] if x.isdigit())
    if not VLLM_MIN <= version < VLLM_BELOW:
        raise ImportError(f"vLLM {vllm.__version__} is installed; VLLMEngine is written for {VLLM_RANGE} (the releases "
                          "that pin torch 2.13 and accept transformers 5.25, docs/vllm.md)")
    return vllm


def engine_kwargs(policy: Any, max_model_len: int, gpu_memory_utilization: float, enable_sleep_mode: bool,
                  seed: int, world_size: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments of a rank's colocated engine.

    Several processes: ``distributed_executor_backend="external_launcher"`` (each rank's engine on its own GPU,
    in the rank's process: vLLM then also turns V1 multiprocessing off, which is what exposes
    ``llm.llm_engine.model_executor``). The checkpoint folder, the compute dtype, one image per prompt, the
    processor's pixel budget as ``mm_processor_kwargs={"size": ...}``, log-probs after temperature
    (``processed_logprobs``, as the trainer computes them), and vLLM's own generation defaults (not the
    checkpoint's ``generation_config``, which would change the sampling).
    """
    size = getattr(policy.processor.image_processor, "size", None)
    budget = {k: int(size[k]) for k in ("shortest_edge", "longest_edge") if size is not None and size.get(k)}
    dtype = policy.compute_dtype or next(policy.hf_model.parameters()).dtype
    kwargs = {"model": str(policy.hf_model.config._name_or_path), "dtype": str(dtype).removeprefix("torch."),
              "seed": int(seed), "gpu_memory_utilization": float(gpu_memory_utilization),
              "enable_sleep_mode": bool(enable_sleep_mode), "max_model_len": int(max_model_len),
              "limit_mm_per_prompt": {"image": 1}, "mm_processor_kwargs": {"size": budget} if budget else {},
              "logprobs_mode": "processed_logprobs", "generation_config": "vllm"}
    if world_size > 1:
        kwargs["distributed_executor_backend"] = "external_launcher"
    kwargs.update(extra or {})
    return kwargs


def streamed_weights(policy: Any, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(Hugging Face name, full tensor)`` of every weight of the policy, one at a time, LoRA merged.

    FSDP2 shards are gathered one parameter at a time (``full_tensor()``: a collective every rank must make
    in the same order); a LoRA linear's base weight, ``A`` and ``B`` are merged as soon as all three have come
    (``W + s·B@A``, ``radvlm.lora.merge_lora_state_dict``); tensors are cast to ``dtype`` (the engine's). At
    most one LoRA layer's tensors are held besides the one yielded.
    """
    model = policy.model
    scalings = lora_scalings(model) if policy.is_lora else {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        full = full.detach()
        if not scalings:
            yield name, full.to(dtype) if dtype is not None else full
            continue
        module = _lora_module(name)
        if module is None:
            for key, value in merge_lora_state_dict({name: full}, scalings).items():
                yield key, value.to(dtype) if dtype is not None else value
            continue
        group = pending.setdefault(module, {})
        group[name] = full
        if len(group) == 3:  # base weight, A and B
            for key, value in merge_lora_state_dict(pending.pop(module), scalings).items():
                yield key, value.to(dtype) if dtype is not None else value
    if pending:
        raise ValueError(f"LoRA layers without all of base weight, lora_A and lora_B: {sorted(pending)[:3]}")


def _lora_module(name: str) -> str | None:
    """``a.b.q_proj`` for ``a.b.q_proj.base_layer.weight`` / ``.lora_A.default.weight`` / ``.lora_B...``."""
    for marker in (".base_layer.weight", ".lora_A.", ".lora_B."):
        if marker in name:
            return name.split(marker)[0]
    return None


def buckets(weights: Iterator[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive ``(name, tensor)`` pairs in lists of at most ``max_bytes`` (a larger tensor goes alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def load_into_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> int:
    """Run inside vLLM's worker (``LLM.collective_rpc``): the weights into its model's ``load_weights``, which
    maps Hugging Face names onto vLLM's layout (and its tensor-parallel shard). Returns the count."""
    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model
    model.load_weights(weights=weights)
    return len(weights)


def prompt_token_ids(policy: Any, prompt_batch: dict[str, Any]) -> list[list[int]]:
    """Each prompt's own token ids without padding, its run of ``<|image_pad|>`` collapsed to one token (vLLM
    expands one placeholder per image into the image's tokens itself)."""
    pad = policy.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    out = []
    for ids, mask in zip(prompt_batch["input_ids"], prompt_batch["attention_mask"]):
        row = ids[mask.bool()].tolist()
        out.append([t for i, t in enumerate(row) if t != pad or i == 0 or row[i - 1] != pad])
    return out


@contextlib.contextmanager
def kept_rng() -> Iterator[None]:
    """vLLM seeds Python's, NumPy's and torch's global generators when it builds an engine: keep the trainer's."""
    import numpy as np

    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])


class VLLMEngine:
    """Rollouts from vLLM colocated with training (one engine per rank). Unmeasured on hardware.

    Args:
        gpu_memory_utilization: vLLM's share of the GPU's total memory (weights + KV cache while awake).
        enable_sleep_mode: free vLLM's weights and KV cache between rollouts (``sleep(level=2)``).
        llm_kwargs: more ``vllm.LLM`` arguments (``tensor_parallel_size``, ``enforce_eager``, ``max_num_seqs`` …).
        sync_bucket_mib: weights sent to the engine per ``load_weights`` call (bounds the transient memory).
        llm: an already built engine (or a stand-in with vLLM's API; tests).
        sampling_params_class: what builds the sampling parameters (default ``vllm.SamplingParams``).
    """

    #: engines that sample from another model than the trainer's get truncated importance weights by default
    default_correction = RolloutCorrection(level="token", cap=2.0)

    def __init__(self, gpu_memory_utilization: float = 0.3, enable_sleep_mode: bool = True,
                 llm_kwargs: dict[str, Any] | None = None, sync_bucket_mib: int = 512, llm: Any = None,
                 sampling_params_class: Any = None) -> None:
        self.gpu_memory_utilization = float(gpu_memory_utilization)
        self.enable_sleep_mode = bool(enable_sleep_mode)
        self.llm_kwargs = dict(llm_kwargs or {})
        self.sync_bucket_mib = int(sync_bucket_mib)
        self.llm = llm
        self._params_class = sampling_params_class
        self.synced_steps = 0
        self.max_model_len: int | None = None

    # ------------------------------------------------------------------ engine
    def setup(self, policy: Any, max_model_len: int, seed: int = 0) -> Any:
        """Build the rank's engine before training (not inside a step, when training memory is taken):
        ``max_model_len`` = the data's ``max_length`` + ``max_new_tokens``; seed = ``seed`` + the rank's index
        among the tensor-parallel groups (the same inside a group, as vLLM needs). Asleep afterwards."""
        self.max_model_len = int(max_model_len)
        if self.llm is not None:
            return self.llm
        vllm = require_vllm()
        world, rank = _world()
        tp = int(self.llm_kwargs.get("tensor_parallel_size", 1))
        kwargs = engine_kwargs(policy, self.max_model_len, self.gpu_memory_utilization, self.enable_sleep_mode,
                               seed + rank // tp, world, self.llm_kwargs)
        with kept_rng():
            self.llm = vllm.LLM(**kwargs)
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)
        return self.llm

    def sync_weights(self, policy: Any) -> None:
        """Before every rollout (the first after a resume included): wake the weights, stream the training
        weights in, reset the caches computed with the old ones, wake the KV cache."""
        if self.llm is None:
            raise RuntimeError("VLLMEngine.setup(policy, max_model_len) must run before the first rollout "
                               "(GRPOModule does it at the start of fit)")
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["weights"])
        dtype = policy.compute_dtype or next(policy.hf_model.parameters()).dtype
        with torch.no_grad():
            for bucket in buckets(streamed_weights(policy, dtype), self.sync_bucket_mib * 2**20):
                self.llm.collective_rpc(load_into_worker, args=(bucket,))
                del bucket
        self.llm.reset_prefix_cache()
        engine = getattr(self.llm, "llm_engine", None)
        if hasattr(engine, "reset_encoder_cache"):  # vision features of the old weights
            engine.reset_encoder_cache()
        if self.enable_sleep_mode:
            self.llm.wake_up(tags=["kv_cache"])
        self.synced_steps += 1

    def sampling_params(self, policy: Any, sampling: Sampling) -> Any:
        make = self._params_class or require_vllm().SamplingParams
        return make(**self.sampling_kwargs(policy, sampling))

    @staticmethod
    def sampling_kwargs(policy: Any, sampling: Sampling) -> dict[str, Any]:
        """``SamplingParams(n=G, temperature, top_p, top_k (0: off), max_tokens, stop_token_ids, logprobs=0)``:
        ``logprobs=0`` returns the sampled token's log-prob only; vision special tokens suppressed by
        ``logit_bias`` −100."""
        greedy = not sampling.do_sample
        return {"n": sampling.num_generations, "temperature": 0.0 if greedy else sampling.temperature,
                "top_p": 1.0 if greedy else sampling.top_p, "top_k": 0 if greedy else (sampling.top_k or 0),
                "max_tokens": sampling.max_new_tokens, "stop_token_ids": list(policy.stop_token_ids),
                "logit_bias": {int(t): SUPPRESS_BIAS for t in policy.suppress_token_ids},
                "logprobs": 0, "skip_special_tokens": True}

    def requests(self, policy: Any, prompt_batch: dict[str, Any]) -> list[dict[str, Any]]:
        """Each prompt's token ids (``prompt_token_ids``) with its image as the data module decoded it
        (``batch["pil_images"]``: 16-bit radiographs rescaled as for training)."""
        images = prompt_batch.get("pil_images")
        if images is None:
            raise ValueError("VLLMEngine needs the decoded images of the prompts (batch['pil_images'], set by "
                             "datamodules.collate.PromptCollator)")
        out = []
        for ids, image in zip(prompt_token_ids(policy, prompt_batch), images):
            request: dict[str, Any] = {"prompt_token_ids": ids}
            if image is not None:
                request["multi_modal_data"] = {"image": image}
            out.append(request)
        return out

    def generate(self, policy: Any, prompt_batch: dict[str, Any], sampling: Sampling,
                 synced_gpus: bool = False) -> Rollout:
        width = int(prompt_batch["attention_mask"].sum(-1).max())
        if self.max_model_len is not None and width + sampling.max_new_tokens > self.max_model_len:
            raise ValueError(f"a prompt of {width} tokens + {sampling.max_new_tokens} new tokens exceeds the "
                             f"engine's max_model_len={self.max_model_len} (data.max_length + max_new_tokens)")
        outputs = self.llm.generate(self.requests(policy, prompt_batch), self.sampling_params(policy, sampling),
                                    use_tqdm=False)
        rollout = rollout_from_outputs(policy, prompt_batch, sampling, outputs)
        if self.enable_sleep_mode:
            self.llm.sleep(level=2)  # weights and KV cache freed for training; weights come back at the next sync
        return rollout

    def __repr__(self) -> str:
        return (f"VLLMEngine(gpu_memory_utilization={self.gpu_memory_utilization}, "
                f"enable_sleep_mode={self.enable_sleep_mode})")


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


def rollout_from_outputs(policy: Any, prompt_batch: dict[str, Any], sampling: Sampling, outputs: list[Any]) -> Rollout:
    """vLLM ``RequestOutput`` s (one per prompt, ``n`` completions each) → a ``Rollout`` (rows grouped) with the
    engine's log-probs of the sampled tokens (NaN where unknown: a stop token vLLM left out; 0 on padding)."""
    from radvlm.generation import completion_mask_from_ids

    g = sampling.num_generations
    stops = list(policy.stop_token_ids)
    rows: list[torch.Tensor] = []
    logps: list[torch.Tensor] = []
    for request in outputs:
        if len(request.outputs) != g:
            raise ValueError(f"vLLM returned {len(request.outputs)} completions for a prompt, expected {g}")
        for completion in request.outputs:
            ids = list(completion.token_ids)
            lp = [float(step[t].logprob) for t, step in zip(ids, completion.logprobs or [])] if completion.logprobs \
                else [0.0] * len(ids)
            if completion.finish_reason == "stop" and (not ids or ids[-1] not in stops):
                reason = getattr(completion, "stop_reason", None)
                ids.append(reason if isinstance(reason, int) else stops[0])  # the stop token vLLM left out
                lp.append(float("nan"))  # its log-prob unknown: the trainer's is used (ratio 1)
            rows.append(torch.tensor(ids or [policy.pad_token_id], dtype=torch.long).unsqueeze(0))
            logps.append(torch.tensor(lp or [0.0], dtype=torch.float32).unsqueeze(0))
    device = prompt_batch["input_ids"].device
    completion = pad_right(rows, policy.pad_token_id).to(device)  # (B*G, C)
    logprobs = pad_right(logps, 0.0).to(device)  # (B*G, C)
    mask, truncated = completion_mask_from_ids(completion, stops)
    completion = completion.masked_fill(mask == 0, policy.pad_token_id)
    texts = policy.tokenizer.batch_decode(completion, skip_special_tokens=True)
    logprobs = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))  # (B*G, C)
    return Rollout.from_completions(prompt_batch, g, completion, mask, truncated, texts, logprobs=logprobs)
