"""Model-based metrics and the GREEN judge run on the process's own GPU (``LOCAL_RANK``), never on cuda:0 by default.

The pure helpers are tested by hand; the metric classes on a monkeypatched 4-GPU machine (no model is built:
each class loads its model lazily, at the first ``score``).
"""

import pytest
import torch

from metrics.base import default_device, rank_cuda_index, rank_device, resolve_device
from metrics.bertscore import BERTScore
from metrics.chexbert import CheXbertF1, CheXbertSimilarity
from metrics.green import GREEN, HFJudge
from metrics.radgraph import RadGraphF1, radgraph_cuda_index


# ------------------------------------------------------------------------------------------ pure helpers
def test_local_rank_picks_the_rank_gpu():
    assert rank_device(True, 4, "2", None) == "cuda:2"
    assert rank_device(True, 4, " 3 ", None) == "cuda:3"


def test_no_cuda_is_cpu_whatever_the_rank():
    assert rank_device(False, 0, "2", None) == "cpu"
    assert rank_device(False, 0, "junk", 1) == "cpu"  # nothing is validated without CUDA


def test_no_local_rank_and_nothing_current_is_device_0():
    assert rank_device(True, 4, None, None) == "cuda:0"
    assert rank_device(True, 4, "", None) == "cuda:0"


def test_a_current_device_wins_over_local_rank():
    assert rank_device(True, 4, "2", 1) == "cuda:1"
    assert rank_device(True, 4, None, 3) == "cuda:3"
    assert rank_device(True, 4, "junk", 2) == "cuda:2"  # LOCAL_RANK is not read then


def test_current_device_0_gives_way_to_local_rank():
    # an initialised process that never called set_device reports 0: the rank's GPU is LOCAL_RANK's
    assert rank_device(True, 4, "2", 0) == "cuda:2"
    assert rank_device(True, 4, None, 0) == "cuda:0"
    # per-rank CUDA_VISIBLE_DEVICES: one visible device, set current; LOCAL_RANK names none of them
    assert rank_device(True, 1, "3", 0) == "cuda:0"
    assert rank_device(True, 1, "3", None) == "cuda:0"  # the same before CUDA is initialised


@pytest.mark.parametrize("value", ["two", "1.5", "-1", "4", "7"])
def test_bad_local_rank_is_a_clear_error(value):
    with pytest.raises(ValueError) as info:
        rank_cuda_index(4, value, None)
    message = str(info.value)
    assert f"LOCAL_RANK={value!r}" in message and "4 visible" in message


# ------------------------------------------------------------------------------------ a 4-GPU machine
@pytest.fixture
def four_gpus(monkeypatch):
    """torch.cuda says 4 devices, CUDA not initialised, this process is LOCAL_RANK 3."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)

    def current_device():  # it would initialise CUDA: never asked before initialisation
        raise AssertionError("current_device called before CUDA is initialised")

    monkeypatch.setattr(torch.cuda, "current_device", current_device)
    monkeypatch.setenv("LOCAL_RANK", "3")
    return monkeypatch


def test_default_and_resolved_device_follow_local_rank(four_gpus):
    assert default_device() == "cuda:3"
    assert resolve_device(None) == "cuda:3"
    assert resolve_device("cuda") == "cuda:3"
    assert resolve_device(torch.device("cuda")) == "cuda:3"
    assert resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("cpu") == "cpu"


def test_default_device_reads_the_current_device_once_initialised(four_gpus):
    four_gpus.setattr(torch.cuda, "is_initialized", lambda: True)
    four_gpus.setattr(torch.cuda, "current_device", lambda: 2)
    assert default_device() == "cuda:2" and resolve_device("cuda") == "cuda:2"


def test_bad_local_rank_fails_at_construction(four_gpus):
    four_gpus.setenv("LOCAL_RANK", "9")
    with pytest.raises(ValueError, match="LOCAL_RANK='9'"):
        RadGraphF1(device="cuda")


def test_without_cuda_cuda_stays_as_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == "cpu" and resolve_device(None) == "cpu"
    assert resolve_device("cuda") == "cuda"  # loading then fails as before (NaN + warning, or strict raises)


@pytest.mark.parametrize("device", ["cuda", None])
def test_metrics_store_the_rank_device(four_gpus, device):
    assert RadGraphF1(device=device).model_device == "cuda:3"
    assert CheXbertF1(device=device).model_device == "cuda:3"
    assert CheXbertSimilarity(device=device).model_device == "cuda:3"
    assert BERTScore(device=device).model_device == "cuda:3"
    green = GREEN(device=device)
    assert isinstance(green.judge, HFJudge)
    assert green.judge.device == "cuda:3" and green.judge.dtype == "float16"


def test_metrics_keep_an_explicit_index_and_cpu(four_gpus):
    assert RadGraphF1(device="cuda:1").model_device == "cuda:1"
    assert CheXbertF1(device="cuda:1").model_device == "cuda:1"
    assert BERTScore(device="cuda:1").model_device == "cuda:1"
    assert HFJudge(device="cuda:1").device == "cuda:1"
    judge = HFJudge(device="cpu")
    assert judge.device == "cpu" and judge.dtype == "float32"


# ----------------------------------------------------------------------------- radgraph's cuda argument
def test_radgraph_index_is_the_rank_index(four_gpus):
    assert radgraph_cuda_index("cuda:3") == 3
    assert radgraph_cuda_index("cuda") == 3  # was 0 (``dev.index or 0``) on every rank
    assert radgraph_cuda_index("cuda:0") == 0
    assert radgraph_cuda_index("cpu") == -1
    with pytest.raises(ValueError, match="cpu or cuda"):
        radgraph_cuda_index("meta")
