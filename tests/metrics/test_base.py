"""The shared pieces of metrics/base.py."""

from metrics.base import ReferenceCache


def test_reference_cache_returns_cached_and_new_texts_and_evicts_least_recent():
    cache = ReferenceCache(size=2)
    table, refs, preds = cache.split(["a", "b", "a"], ["x", "a", "x"])
    assert (table, refs, preds) == ({}, ["a", "b"], ["x"])  # distinct, a prediction equal to a ref not redone
    cache.store({"a": 1, "b": 2, "x": 9}, refs)
    table, refs, preds = cache.split(["b", "c"], ["a"], known={"": 0})
    assert table == {"": 0, "b": 2} and refs == ["c"] and preds == ["a"]
    cache.store({"c": 3}, refs)  # "a" is now the least recently used: evicted
    assert "a" not in cache and "b" in cache and "c" in cache and len(cache) == 2


# ------------------------------------------------------------------------------------- float32 under bf16

import threading  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from metrics.base import PerSampleMetric, float32_math  # noqa: E402
from metrics.grounding import GroundingMAP, SoftF1  # noqa: E402
from metrics.text import GLEU  # noqa: E402

PREDS = ["[0.10, 0.20, 0.31, 0.42]", "The heart is mildly enlarged.", "[0.5, 0.5, 0.9, 0.9] and [0, 0, 0.2, 0.2]"]
TARGETS = ["[0.11, 0.2, 0.3, 0.4]", "Mild cardiomegaly.", "[0.5, 0.52, 0.9, 0.88]"]


class Precise(PerSampleMetric):
    """Returns values that bfloat16 cannot tell apart (0.8125 and 0.8140 round to the same bf16 number)."""

    def score(self, preds, targets):
        return torch.tensor([0.8125, 0.8140])[: len(preds)]


@pytest.fixture
def bf16_default():
    torch.set_default_dtype(torch.bfloat16)  # what Lightning's bf16-true does around every step
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("metric_cls", [SoftF1, GroundingMAP, GLEU])
def test_metrics_score_in_float32_under_a_bf16_default_dtype(metric_cls, bf16_default):
    torch.set_default_dtype(torch.float32)
    expected = metric_cls().score(PREDS, TARGETS)
    torch.set_default_dtype(torch.bfloat16)
    metric = metric_cls()  # built under bf16 too: its states must stay float32
    values = metric.score(PREDS, TARGETS)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, expected, rtol=0, atol=0)
    metric.update(PREDS, TARGETS)
    out = metric.compute()
    for v in (out.values() if isinstance(out, dict) else [out]):
        assert v.dtype in (torch.float32, torch.float64)
    assert torch.get_default_dtype() == torch.bfloat16  # restored for the caller


def test_values_that_bf16_would_merge_stay_distinct(bf16_default):
    values = Precise().score(["a", "b"], ["a", "b"])
    assert values.dtype == torch.float32 and values[0] != values[1]  # bf16 would make them equal
    assert torch.tensor(0.8125, dtype=torch.bfloat16) == torch.tensor(0.8140, dtype=torch.bfloat16)


def test_metrics_ignore_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with float32_math():
            assert not torch.is_autocast_enabled("cpu")
            out = torch.ones(2, 2) @ torch.ones(2, 2)
        assert torch.is_autocast_enabled("cpu")
    assert out.dtype == torch.float32


def test_float32_math_leaves_a_float32_default_untouched_from_a_worker_thread():
    """A reward scored in a worker thread (timeouts) while the caller already holds float32 changes nothing
    global, so a worker that outlives its timeout cannot reset the caller's default dtype later."""
    calls = []
    real = torch.set_default_dtype

    def recording(dtype):
        calls.append(dtype)
        real(dtype)

    torch.set_default_dtype = recording
    try:
        worker = threading.Thread(target=lambda: SoftF1().score(PREDS, TARGETS))
        worker.start()
        worker.join()
    finally:
        torch.set_default_dtype = real
    assert calls == []


# ------------------------------------------------------------------------------------- hub downloads opt-in

def test_scorer_models_load_offline_unless_downloads_are_allowed(monkeypatch):
    import huggingface_hub.constants as hub

    from metrics.base import DOWNLOAD_ENV, ModelUnavailable, load_once

    seen = []

    def build():
        seen.append(hub.HF_HUB_OFFLINE)
        raise OSError("no such model on disk")

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv(DOWNLOAD_ENV, raising=False)
    cache: dict = {}
    with pytest.raises(ModelUnavailable, match=f"no such model on disk.*{DOWNLOAD_ENV}=1"):
        load_once(cache, "m", build)
    with pytest.raises(ModelUnavailable):  # remembered: not built again
        load_once(cache, "m", build)
    assert seen == [True] and hub.HF_HUB_OFFLINE is False  # offline while loading, restored after
    monkeypatch.setenv(DOWNLOAD_ENV, "1")
    with pytest.raises(OSError, match="no such model on disk"):
        load_once({}, "m", build)
    assert seen == [True, False]  # the user's hub setting is kept when downloads are allowed
