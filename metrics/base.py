"""Common base of every metric in this package: a per-sample score that is also a reward.

Contract (DESIGN.md): ``score(preds, targets) -> Tensor[N]`` is stateless and returns one float per sample,
NaN where the value could not be computed (model missing, exception, timeout); ``update`` stores those
per-sample tensors (tensors, never strings, so DDP can gather them); ``compute`` aggregates, ignoring NaN.
``higher_is_better`` gives the sign when the value becomes a GRPO reward; ``worst_value`` is the value an
unusable answer receives (for example a thinking completion without ``</think>``).

Precision: every metric computes in float32 whatever the caller runs under. ``bf16-true`` training makes
bfloat16 the default dtype (8 bits of mantissa: rewards of 0.8125 and 0.8140 are then the same number) and mixed
precision enables autocast; ``PerSampleMetric`` subclasses run their ``__init__``, ``score``, ``update`` and
``compute`` inside :func:`float32_math` and ``score`` always returns float32 (``__init_subclass__`` does this
for every subclass, so a new metric cannot forget it).

Cancellation: a caller that runs ``score`` in a thread of its own and gives up on it (a reward timeout,
``radvlm.rewards.score_with_timeout``) sets that thread's cancellation event (the thread attribute
``CANCEL_ATTR``, or :func:`cancel_scope`); the metrics of this package call :func:`check_cancelled` between
model batches, judge requests and reports and stop there with :class:`ScoringCancelled`. Per-sample inputs
are bounded before any model (token caps of each model-based metric), so the work between two checks is too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from abc import abstractmethod
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterable, Iterator, Sequence

import torch
from torchmetrics import Metric


def check_pairs(preds: Sequence[str], targets: Sequence[str]) -> None:
    """Raise a clear error unless ``preds`` and ``targets`` are equally long sequences of strings."""
    if isinstance(preds, str) or isinstance(targets, str):
        raise TypeError("preds and targets must be lists of strings, not a single string")
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions but {len(targets)} targets")
    for name, seq in (("preds", preds), ("targets", targets)):
        for i, text in enumerate(seq):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{i}] is {type(text).__name__}, expected str")


@contextlib.contextmanager
def float32_math() -> Iterator[None]:
    """Float32 default dtype and no autocast inside the block (restored after).

    The default dtype is process-global in torch: it is changed (and restored) only when it is not float32
    already, so a block entered in a worker thread while the caller already holds float32 (as
    ``radvlm.rollout.compute_rewards`` does) touches nothing global.
    """
    previous = torch.get_default_dtype()
    if previous != torch.float32:
        torch.set_default_dtype(torch.float32)
    try:
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda"):
                if device == "cpu" or torch.cuda.is_available():
                    stack.enter_context(torch.autocast(device, enabled=False))
            yield
    finally:
        if previous != torch.float32:
            torch.set_default_dtype(previous)


def _in_float32(fn: Callable, cast_result: bool = False) -> Callable:
    """``fn`` run inside :func:`float32_math`; with ``cast_result`` a floating tensor result becomes float32."""
    if getattr(fn, "_float32_math", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with float32_math():
            out = fn(*args, **kwargs)
        if cast_result and isinstance(out, torch.Tensor) and out.is_floating_point():
            out = out.to(torch.float32)
        return out

    wrapper._float32_math = True
    return wrapper


#: name of the thread attribute holding that thread's cancellation event (any object with ``is_set()``); the
#: reward runner of ``radvlm.rewards`` sets it on its scoring threads (the same name, no import either way)
CANCEL_ATTR = "cancel_event"


class ScoringCancelled(BaseException):
    """Scoring stopped at a :func:`check_cancelled` because its caller gave up on it (deadline passed).

    A ``BaseException`` (as ``asyncio.CancelledError``): the metrics' ``except Exception`` clauses, which turn a
    failure into NaN and go on with the next sample, let it through, so cancelled work really stops."""


def cancel_event() -> Any:
    """The cancellation event of the current thread, or None."""
    return getattr(threading.current_thread(), CANCEL_ATTR, None)


def check_cancelled(event: Any = None) -> None:
    """Raise :class:`ScoringCancelled` when ``event`` (default: the current thread's) is set."""
    event = cancel_event() if event is None else event
    if event is not None and event.is_set():
        raise ScoringCancelled("scoring cancelled: its caller stopped waiting (timeout)")


@contextlib.contextmanager
def cancel_scope(event: threading.Event) -> Iterator[threading.Event]:
    """``event`` as the current thread's cancellation event inside the block (restored after): set it from
    another thread to stop a ``score`` call running here at its next check."""
    thread = threading.current_thread()
    previous = getattr(thread, CANCEL_ATTR, None)
    setattr(thread, CANCEL_ATTR, event)
    try:
        yield event
    finally:
        setattr(thread, CANCEL_ATTR, previous)


class PerSampleMetric(Metric):
    """A metric whose state is the list of per-sample values; ``compute`` is their NaN-ignoring mean.

    Subclasses implement ``score``; they may override ``compute`` for other aggregates (micro F1, mAP).
    """

    higher_is_better: bool = True
    is_differentiable = False
    full_state_update = False
    #: value given to an answer that cannot be scored at all (e.g. unclosed thinking block)
    worst_value: float = 0.0

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("__init__", "score", "update", "compute"):  # float32 whatever the caller's precision
            if name in cls.__dict__:
                setattr(cls, name, _in_float32(cls.__dict__[name], cast_result=name == "score"))

    def __init__(self, **kwargs) -> None:
        with float32_math():
            super().__init__(**kwargs)
            self.add_state("values", default=[], dist_reduce_fx="cat")

    @abstractmethod
    def score(self, preds: Sequence[str], targets: Sequence[str]) -> torch.Tensor:  # (N,)
        """Per-sample values, NaN where a value could not be computed."""

    def available(self) -> bool:
        """Whether the metric can score at all (a model-based metric: its model loads; loads it once). A
        metric without a model is always available."""
        return True

    @_in_float32
    def update(self, preds: Sequence[str], targets: Sequence[str]) -> None:
        check_pairs(preds, targets)
        values = self.score(list(preds), list(targets)).detach().to(dtype=torch.float32)  # (N,)
        self.values.append(values.to(self.device))

    def per_sample(self) -> torch.Tensor:  # (N_total,)
        """All per-sample values stored so far (synced across processes when called inside ``compute``)."""
        vals = self.values
        if isinstance(vals, torch.Tensor):  # after a DDP sync torchmetrics concatenates list states
            return vals.reshape(-1)
        if not vals:
            return torch.zeros(0, dtype=torch.float32, device=self.device)
        return torch.cat([v.reshape(-1) for v in vals])

    @_in_float32
    def compute(self) -> torch.Tensor:
        vals = self.per_sample()
        finite = vals[~torch.isnan(vals)]
        if finite.numel() == 0:
            return torch.tensor(float("nan"), dtype=torch.float32, device=self.device)
        return finite.mean()


_WARNED: set[str] = set()


#: environment variable naming the process's GPU on its node (set by torchrun, Lightning's launcher, SLURM setups)
LOCAL_RANK_ENV = "LOCAL_RANK"


def rank_cuda_index(device_count: int, local_rank_env: str | None, current_device: int | None) -> int:
    """The CUDA index of this process: the current device when CUDA is initialised and it is not 0, else a valid
    ``LOCAL_RANK``, else the current device or 0 (pure: no torch call, so it is tested without a GPU).

    ``current_device`` is None when CUDA is not initialised yet (``torch.cuda.current_device()`` would initialise
    it). Device 0 is what an initialised process reports when ``set_device`` was never called, so a current
    device 0 gives way to ``LOCAL_RANK``. A non-integer ``LOCAL_RANK``, or one outside ``[0, device_count)``,
    raises a ValueError naming it when it is needed (CUDA not initialised); once a device is current it is
    ignored, as under per-rank ``CUDA_VISIBLE_DEVICES`` binding, where each rank sees one device (a process
    that sees a single device uses it whatever ``LOCAL_RANK`` says).
    """
    if current_device is not None and current_device != 0:
        return int(current_device)
    raw = (local_rank_env or "").strip()
    if not raw:
        return 0 if current_device is None else int(current_device)
    try:
        rank = int(raw)
    except ValueError:
        rank = None
    if rank is not None and 0 <= rank < device_count:
        return rank
    if rank is not None and rank >= 0 and device_count == 1:  # per-rank CUDA_VISIBLE_DEVICES: its one GPU
        return 0
    if current_device is not None:  # a device is current: a LOCAL_RANK that names no visible device is not used
        return int(current_device)
    raise ValueError(
        f"{LOCAL_RANK_ENV}={local_rank_env!r} names no CUDA device of this process ({device_count} visible): "
        f"expected an integer in [0, {device_count}); pass an explicit device such as 'cuda:0' "
        f"(e.g. under per-rank CUDA_VISIBLE_DEVICES) or fix {LOCAL_RANK_ENV}"
    )


def rank_device(cuda_available: bool, device_count: int, local_rank_env: str | None,
                current_device: int | None) -> str:
    """``cuda:{rank_cuda_index(...)}`` when CUDA is available, else ``cpu`` (pure, see :func:`rank_cuda_index`)."""
    if not cuda_available:
        return "cpu"
    return f"cuda:{rank_cuda_index(device_count, local_rank_env, current_device)}"


def _current_cuda_device() -> int | None:
    """``torch.cuda.current_device()`` when CUDA is initialised, else None (never initialises CUDA itself)."""
    return torch.cuda.current_device() if torch.cuda.is_initialized() else None


def default_device() -> str:
    """This process's own device for a model-based metric: ``cuda:{rank's index}`` (:func:`rank_device`), else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    return rank_device(True, torch.cuda.device_count(), os.environ.get(LOCAL_RANK_ENV), _current_cuda_device())


def resolve_device(device: str | torch.device | None) -> str:
    """``device`` with the rank's CUDA index filled in: None -> :func:`default_device`, ``"cuda"`` -> ``"cuda:{i}"``
    of this rank (kept as ``"cuda"`` without CUDA, so loading fails as before); ``"cuda:3"``, ``"cpu"`` as given."""
    if device is None:
        return default_device()
    text = str(device)
    dev = torch.device(text)
    if dev.type != "cuda" or dev.index is not None or not torch.cuda.is_available():
        return text
    return default_device()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a RuntimeWarning the first time ``key`` is seen in this process (a metric whose model
    is missing or failing warns once, not once per batch)."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class ReferenceCache:
    """LRU cache of reference-side work (embeddings, annotations) keyed by the reference text.

    GRPO scores the G rollouts of a prompt against the same reference: ``split`` hands back what is cached,
    and which distinct references and predictions still need the model, so each reference is processed once.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.items: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, text: object) -> bool:
        return text in self.items

    def split(self, targets: Iterable[str], preds: Iterable[str], known: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], list[str], list[str]]:
        """``(table of known/cached values, new distinct references, new distinct predictions)``."""
        table: dict[str, Any] = dict(known or {})
        new_refs: list[str] = []
        for text in dict.fromkeys(targets):
            if text in table:
                continue
            if text in self.items:
                self.items.move_to_end(text)
                table[text] = self.items[text]
            else:
                new_refs.append(text)
        pending = set(new_refs)
        new_preds = [t for t in dict.fromkeys(preds) if t not in table and t not in pending]
        return table, new_refs, new_preds

    def store(self, values: dict[str, Any], refs: Iterable[str]) -> None:
        """Remember the (non-``None``) values of ``refs``, evicting the least recently used past ``size``."""
        for text in refs:
            if values.get(text) is not None:
                self.items[text] = values[text]
        while len(self.items) > self.size:
            self.items.popitem(last=False)


#: set to 1 to let model-based metrics download weights from the Hugging Face hub
DOWNLOAD_ENV = "RADVLM_ALLOW_DOWNLOADS"


def downloads_allowed() -> bool:
    """Whether the user opted in to hub downloads (``RADVLM_ALLOW_DOWNLOADS=1``)."""
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def hub_access() -> Iterator[None]:
    """Hugging Face hub access for the block: as configured when downloads are allowed, else offline (local
    folders and the local HF cache only). Offline, a missing model fails at once instead of spending about
    95 s in the hub client's retry back-off."""
    if downloads_allowed():
        yield
        return
    import huggingface_hub.constants as hub

    saved, saved_env = hub.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    hub.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


class ModelUnavailable(RuntimeError):
    """A scorer model could not be loaded (the message says where to put its weights)."""


def load_once(cache: dict[Hashable, Any], key: Hashable, build: Callable[[], Any]) -> Any:
    """``build()`` once per process and ``key`` (a model, an annotator); a failure is remembered and raised
    again on every later call, so an offline run pays the failed load once, not at every step.

    ``build`` runs under :func:`hub_access`: without ``RADVLM_ALLOW_DOWNLOADS=1`` only local weights (folders,
    the HF cache) are read, and a failure says how to opt in to downloads."""
    if key not in cache:
        try:
            with hub_access():
                cache[key] = build()
        except Exception as exc:  # noqa: BLE001  (remembered, re-raised below)
            if not downloads_allowed():
                hint = (f"{type(exc).__name__}: {exc} [hub downloads are off: put the weights where the metric "
                        f"looks for them, or set {DOWNLOAD_ENV}=1 to allow downloads]")
                wrapped = ModelUnavailable(hint)
                wrapped.__cause__ = exc
                exc = wrapped
            cache[key] = exc
    value = cache[key]
    if isinstance(value, BaseException):
        raise value
    return value
