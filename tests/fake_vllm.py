"""A stand-in for ``vllm`` with the API surface of vLLM 0.28–0.30 that ``radvlm.vllm_engine`` uses, on CPU.

What it mimics (read from vLLM 0.30.0's source; docs/vllm.md): ``LLM(**kwargs)`` refuses unknown arguments;
``distributed_executor_backend="external_launcher"`` needs ``RANK``/``LOCAL_RANK`` and turns
``VLLM_ENABLE_V1_MULTIPROCESSING`` off, and only in-process engines have ``llm.llm_engine.model_executor``;
building reseeds the global RNGs; ``sleep(level)`` (2 discards the weights) / ``wake_up(tags)`` with the tags
``weights``, ``kv_cache``, ``scheduling``; ``collective_rpc(method, timeout, args, kwargs)`` calls a callable
with the worker first; the worker's model has ``load_weights(weights)`` under Hugging Face names (an unknown
name is an error); ``generate`` takes ``{"prompt_token_ids", "multi_modal_data": {"image": PIL}}`` with one
``<|image_pad|>`` per image, expands it itself with its own processor (the pixel budget from
``mm_processor_kwargs={"size": ...}``), refuses prompts past ``max_model_len``, and returns
``RequestOutput.outputs[i].token_ids / logprobs / finish_reason`` (``logprobs=0``: the sampled token's,
after temperature). Instead of vLLM's kernels it runs the tiny Hugging Face model it loaded, so its log-probs
agree with the trainer's when the weights, prompt and image agree. ``install(monkeypatch)`` puts it in
``sys.modules["vllm"]``.
"""

from __future__ import annotations

import os
import random
import types
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__version__ = "0.30.0"
SLEEP_TAGS = ("weights", "kv_cache", "scheduling")
ENGINE_ARGS = {"max_model_len", "distributed_executor_backend", "limit_mm_per_prompt", "enable_sleep_mode",
               "logprobs_mode", "generation_config", "enforce_eager", "max_num_seqs"}


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    skip_special_tokens: bool = True


class _Model:
    """The worker's model: ``load_weights`` under Hugging Face names, into a Hugging Face model."""

    def __init__(self, hf_model) -> None:
        self.hf = hf_model
        self.params = dict(hf_model.named_parameters())
        self.loaded: list[str] = []
        self.max_call_bytes = 0

    def load_weights(self, weights) -> set[str]:
        weights = list(weights)
        self.max_call_bytes = max(self.max_call_bytes, sum(t.numel() * t.element_size() for _, t in weights))
        for name, tensor in weights:
            if name not in self.params:
                raise KeyError(f"no parameter named {name!r} in the model")  # as vLLM's params_dict lookup
            with torch.no_grad():
                self.params[name].copy_(tensor)
            self.loaded.append(name)
        return {n for n, _ in weights}


@dataclass
class _Worker:
    model_runner: Any

    def get_model(self):
        return self.model_runner.model


@dataclass
class _LLMEngine:
    model_executor: Any = None
    encoder_resets: int = 0

    def reset_encoder_cache(self) -> None:
        self.encoder_resets += 1


class LLM:
    """``vllm.LLM`` on CPU with the tiny checkpoint (see the module docstring)."""

    def __init__(self, model: str, dtype: str = "auto", seed: int = 0, gpu_memory_utilization: float = 0.92,
                 tensor_parallel_size: int = 1, mm_processor_kwargs: dict | None = None, **kwargs) -> None:
        unknown = set(kwargs) - ENGINE_ARGS
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got unexpected keyword arguments {sorted(unknown)}")
        self.kwargs = {"model": model, "dtype": dtype, "seed": seed, "gpu_memory_utilization": gpu_memory_utilization,
                       "tensor_parallel_size": tensor_parallel_size, "mm_processor_kwargs": mm_processor_kwargs,
                       **kwargs}
        backend = kwargs.get("distributed_executor_backend")
        if backend == "external_launcher":
            for var in ("RANK", "LOCAL_RANK"):
                if var not in os.environ:
                    raise KeyError(var)  # ExecutorWithExternalLauncher reads int(os.environ[var])
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # ParallelConfig.__post_init__
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1 and backend != "external_launcher":
            raise RuntimeError("stand-in: without external_launcher every rank's vLLM would take GPU 0")
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        random.seed(seed)  # vLLM's set_random_seed in the worker: the trainer's RNGs are reseeded
        np.random.seed(seed)
        torch.manual_seed(seed)
        from transformers import AutoModelForImageTextToText

        from radvlm.processor import load_processor

        hf = AutoModelForImageTextToText.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
        size = (mm_processor_kwargs or {}).get("size", {})
        self.processor = load_processor(model, min_pixels=size.get("shortest_edge"), max_pixels=size.get("longest_edge"))
        self.worker = _Worker(types.SimpleNamespace(model=_Model(hf)))
        self.llm_engine = _LLMEngine(model_executor=types.SimpleNamespace(driver_worker=self.worker)
                                     if in_process else None)
        self.asleep: set[str] = set()
        self.calls: list[tuple] = []
        self.received: list[dict] = []
        self.prefix_resets = 0

    @property
    def model(self) -> _Model:
        return self.worker.model_runner.model

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        self.calls.append(("sleep", level))
        if not self.kwargs.get("enable_sleep_mode"):
            return  # nothing in the sleep pool: nothing freed
        self.asleep = {"weights", "kv_cache"}
        if level == 2:  # weights discarded: garbage until written again
            with torch.no_grad():
                for p in self.model.params.values():
                    p.fill_(float("nan"))
        self.prefix_resets += 1

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tuple(tags or SLEEP_TAGS)))
        for tag in tags or SLEEP_TAGS:
            if tag not in SLEEP_TAGS:
                warnings.warn(f"unknown wake-up tag {tag!r}", stacklevel=2)
            self.asleep.discard(tag)

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        self.calls.append(("collective_rpc", getattr(method, "__name__", method)))
        fn = method if callable(method) else getattr(type(self.worker), method)
        return [fn(self.worker, *args, **(kwargs or {}))]

    def reset_prefix_cache(self) -> bool:
        self.calls.append(("reset_prefix_cache",))
        self.prefix_resets += 1
        return True

    def generate(self, prompts, sampling_params: SamplingParams | None = None, use_tqdm: bool = True, **_):
        self.calls.append(("generate", len(prompts)))
        if self.asleep & {"weights", "kv_cache"}:
            raise RuntimeError(f"generate() while {sorted(self.asleep)} are asleep: wake_up() first")
        if not all(bool(torch.isfinite(p).all()) for p in self.model.params.values()):
            raise RuntimeError("the weights were discarded by sleep(level=2) and not loaded again")
        params = sampling_params or SamplingParams()
        return [self._one(i, prompt, params) for i, prompt in enumerate(prompts)]

    def _one(self, index: int, prompt: dict, params: SamplingParams) -> RequestOutput:
        tok = self.processor.tokenizer
        pad = tok.convert_tokens_to_ids("<|image_pad|>")
        ids = list(prompt["prompt_token_ids"])
        image = prompt.get("multi_modal_data", {}).get("image")
        self.received.append({"prompt_token_ids": list(ids), "image": image})
        inputs: dict[str, Any] = {}
        if image is not None:
            if ids.count(pad) != 1:
                raise ValueError(f"expected one <|image_pad|> placeholder for the image, found {ids.count(pad)}")
            out = self.processor.image_processor(images=[image], return_tensors="pt")
            grid = out["image_grid_thw"]  # (1, 3)
            k = int(grid.prod()) // self.processor.image_processor.merge_size ** 2
            at = ids.index(pad)
            ids = ids[:at] + [pad] * k + ids[at + 1:]
            inputs = {"pixel_values": out["pixel_values"].repeat(params.n, 1), "image_grid_thw": grid.repeat(params.n, 1)}
        self.received[-1]["expanded"] = list(ids)
        limit = self.kwargs.get("max_model_len")
        if limit is not None and len(ids) + (params.max_tokens or 0) > limit:
            raise ValueError(f"The decoder prompt (length {len(ids)}) plus max_tokens is longer than the maximum "
                             f"model length of {limit}")
        input_ids = torch.tensor([ids] * params.n)  # (n, P)
        suppress = [t for t, b in (params.logit_bias or {}).items() if b <= -100]
        sample = params.temperature > 0
        gen = self.model.hf.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            mm_token_type_ids=(input_ids == pad).int(), **inputs, do_sample=sample,
            temperature=params.temperature if sample else None, top_p=params.top_p if sample else None,
            top_k=(params.top_k or 0) if sample else None, max_new_tokens=params.max_tokens,
            eos_token_id=params.stop_token_ids, pad_token_id=tok.pad_token_id, suppress_tokens=suppress or None,
            output_scores=True, return_dict_in_generate=True)
        outputs = []
        stops = set(params.stop_token_ids or [])
        for row in range(params.n):
            new = gen.sequences[row, input_ids.shape[1]:].tolist()
            token_ids, logprobs, reason = [], [], "length"
            for step, token in enumerate(new):
                lp = torch.log_softmax(gen.scores[step][row].float(), dim=-1)[token]
                token_ids.append(token)
                logprobs.append({token: Logprob(float(lp), rank=1)})
                if token in stops:
                    reason = "stop"
                    break
            outputs.append(CompletionOutput(row, tok.decode(token_ids, skip_special_tokens=True), token_ids,
                                            float(sum(next(iter(d.values())).logprob for d in logprobs)),
                                            logprobs if params.logprobs is not None else None, reason))
        return RequestOutput(str(index), ids, outputs)


def install(monkeypatch) -> types.ModuleType:
    """``import vllm`` gives this stand-in for the rest of the test."""
    import sys

    module = types.ModuleType("vllm")
    for name in ("LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"):
        setattr(module, name, globals()[name])
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    return module

