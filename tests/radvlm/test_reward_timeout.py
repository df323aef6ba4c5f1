"""A reward timeout stops the work (radvlm/rewards.py ``score_with_timeout``, metrics/base.py cancellation).

The call runs in a thread of its own whose cancellation event is set at the deadline; the metrics of
``metrics/`` check it between batches and stop, so once ``RewardError`` is raised no thread of theirs keeps
running and repeated timeouts do not grow ``threading.active_count()``. A metric that never checks is
abandoned; further calls of that metric (and of any, past ``MAX_ABANDONED``) are refused rather than starting
threads. Other test files time out metrics that only sleep; their abandoned threads may still be ending while
these tests run, so the checks compare the set of threads before and after each call."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from metrics.base import ScoringCancelled, cancel_scope, check_cancelled
from radvlm import rewards
from radvlm.rewards import RewardError, RewardTerm, abandoned_reward_calls, compute_rewards, score_with_timeout


class Cooperative:
    """Checks for cancellation between ``steps`` short steps; ``done`` counts the steps it made."""

    higher_is_better = True
    worst_value = 0.0

    def __init__(self, steps: int = 500, step_s: float = 0.01) -> None:
        self.steps, self.step_s, self.done = steps, step_s, 0

    def score(self, preds, targets):
        for _ in range(self.steps):
            check_cancelled()
            time.sleep(self.step_s)
            self.done += 1
        return torch.zeros(len(preds))


class Stubborn(Cooperative):
    """Never checks for cancellation: blocks until ``release`` is set (10 s at most)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def score(self, preds, targets):
        self.release.wait(10)
        return torch.zeros(len(preds))


class Length:
    higher_is_better = True
    worst_value = 0.0

    def score(self, preds, targets):
        return torch.tensor([float(len(p)) for p in preds])


def new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads alive now that were not alive in ``before`` (``set(threading.enumerate())``)."""
    return [t for t in threading.enumerate() if t not in before]


def wait_for_abandoned_calls(limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while abandoned_reward_calls() and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture(autouse=True)
def no_abandoned_calls():
    """Each test starts and ends without timed-out calls still running (they are process-wide)."""
    wait_for_abandoned_calls()
    yield
    wait_for_abandoned_calls()
    assert abandoned_reward_calls() == 0


# --------------------------------------------------------------------------------------- the runner itself
def test_a_timed_out_cooperative_reward_leaves_no_thread_and_does_no_more_work():
    metric, before, count = Cooperative(), set(threading.enumerate()), threading.active_count()
    start = time.perf_counter()
    with pytest.raises(RewardError, match="Cooperative took longer than 0.1s"):
        score_with_timeout(metric, ["a"], ["b"], timeout=0.1)
    assert time.perf_counter() - start < 1.0  # deadline 0.1 s + at most one 0.01 s step
    assert new_threads(before) == [] and threading.active_count() <= count
    steps = metric.done
    time.sleep(0.2)
    assert metric.done == steps < metric.steps  # stopped, not finishing in the background


def test_repeated_timeouts_do_not_grow_the_thread_count():
    before, count = set(threading.enumerate()), threading.active_count()
    for _ in range(20):
        with pytest.raises(RewardError):
            score_with_timeout(Cooperative(), ["a"], ["b"], timeout=0.02)
        assert new_threads(before) == [] and threading.active_count() <= count
    assert abandoned_reward_calls() == 0


def test_results_and_errors_of_calls_within_the_deadline_come_back_unchanged():
    assert score_with_timeout(Length(), ["abc", ""], ["x", "y"], timeout=5.0).tolist() == [3.0, 0.0]

    class Broken(Length):
        def score(self, preds, targets):
            raise ValueError("bad reference")

    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="bad reference"):
        score_with_timeout(Broken(), ["a"], ["b"], timeout=5.0)
    assert new_threads(before) == []


def test_a_metric_that_ignores_cancellation_is_abandoned_and_the_thread_count_stays_bounded(monkeypatch):
    monkeypatch.setattr(rewards, "MAX_ABANDONED", 2)
    before, count = set(threading.enumerate()), threading.active_count()
    first, second = Stubborn(), Stubborn()
    with pytest.raises(RewardError, match="took longer"):
        score_with_timeout(first, ["a"], ["b"], timeout=0.05)
    assert abandoned_reward_calls() == 1 and len(new_threads(before)) == 1
    for _ in range(5):  # the same object again: refused at once, no thread started
        with pytest.raises(RewardError, match="previous call timed out and is still running"):
            score_with_timeout(first, ["a"], ["b"], timeout=0.05)
    assert len(new_threads(before)) == 1 and threading.active_count() <= count + 1
    assert score_with_timeout(Length(), ["ab"], ["x"], timeout=1.0).tolist() == [2.0]  # other metrics still run
    with pytest.raises(RewardError, match="took longer"):
        score_with_timeout(second, ["a"], ["b"], timeout=0.05)
    assert abandoned_reward_calls() == 2
    for _ in range(5):  # MAX_ABANDONED calls still run: every metric is refused, no new thread
        with pytest.raises(RewardError, match="2 timed-out reward calls are still running"):
            score_with_timeout(Length(), ["a"], ["b"], timeout=1.0)
    assert len(new_threads(before)) == 2 and threading.active_count() <= count + 2
    first.release.set()
    second.release.set()
    wait_for_abandoned_calls(5.0)
    assert abandoned_reward_calls() == 0 and new_threads(before) == []
    assert score_with_timeout(first, ["abc"], ["x"], timeout=5.0).tolist() == [0.0]


def test_compute_rewards_turns_the_cancelled_term_into_nan_and_scores_the_others():
    before = set(threading.enumerate())
    terms = [RewardTerm(Cooperative(), name="slow"), RewardTerm(Length(), name="length")]
    result = compute_rewards(terms, ["ab", "abc"], ["t", "t"], [None, None], [False, False], timeout=0.1)
    assert result.failed == {"slow": 2, "length": 0} and torch.isnan(result.total).all()
    assert result.values["length"].tolist() == [2.0, 3.0]
    assert new_threads(before) == []


# ------------------------------------------------------------------------------------ metrics.base pieces
def test_scoring_cancelled_passes_through_except_exception_and_the_scope_is_restored():
    event = threading.Event()
    with cancel_scope(event):
        check_cancelled()  # not set: nothing happens
        event.set()
        with pytest.raises(ScoringCancelled):
            try:
                check_cancelled()
            except Exception:  # noqa: BLE001  (what the metrics' failure handling looks like)
                pytest.fail("ScoringCancelled must not be an Exception")
    check_cancelled()  # the scope ended: this thread has no event again
    assert rewards.CANCEL_ATTR == __import__("metrics.base", fromlist=["CANCEL_ATTR"]).CANCEL_ATTR


# ------------------------------------------------------------------------------------ the real metrics stop
@pytest.fixture(scope="module")
def model_metrics(tmp_path_factory, bert_dir):
    from metrics.bertscore import BERTScore
    from metrics.chexbert import CheXbertSimilarity
    from metrics.radcliq import RadCliQ
    from metrics.radgraph import RadGraphF1
    from metrics.text import BLEU
    from metrics.tiny import write_tiny_chexbert, write_tiny_radgraph

    root = tmp_path_factory.mktemp("timeout-models")
    radgraph_dir = write_tiny_radgraph(root / "radgraph-xl", bert_dir)
    chexbert = write_tiny_chexbert(root / "chexbert.pth", bert_dir)
    out = {
        "bertscore": BERTScore(bert_dir, num_layers=2, device="cpu", batch_size=1, reference_cache_size=0),
        "radgraph": RadGraphF1(model_dir=radgraph_dir, device="cpu", reference_cache_size=0),
        "chexbert": CheXbertSimilarity(chexbert, bert_dir, device="cpu", batch_size=1, reference_cache_size=0),
    }
    out["radcliq"] = RadCliQ(radgraph=RadGraphF1(reward_level="radcliq", model_dir=radgraph_dir, device="cpu",
                                                 reference_cache_size=0),
                             bertscore=out["bertscore"], semb=out["chexbert"], bleu=BLEU(n=2))
    for metric in out.values():  # load the models now: loading is not a cancellation point
        metric.score(["The heart is normal."], ["No effusion."])
    return out


@pytest.mark.parametrize("name", ["bertscore", "radgraph", "chexbert", "radcliq"])
def test_model_metrics_stop_at_their_next_batch_after_a_timeout(model_metrics, name):
    metric = model_metrics[name]
    # one text per batch (tiny models: milliseconds); all 2000 would take seconds (RadGraph: about a minute)
    preds = [f"report {i}: the heart size is normal, small left pleural effusion {i * 7919}" for i in range(2000)]
    before, count = set(threading.enumerate()), threading.active_count()
    start = time.perf_counter()
    with pytest.raises(RewardError, match="took longer than 0.5s"):
        score_with_timeout(metric, preds, ["No acute cardiopulmonary process."] * len(preds), timeout=0.5)
    elapsed = time.perf_counter() - start
    assert new_threads(before) == [] and threading.active_count() <= count, f"{name} left a thread running"
    assert abandoned_reward_calls() == 0
    assert elapsed < 3.0  # deadline + at most one batch


def test_the_local_green_judge_stops_generating_when_cancelled(tmp_path):
    from metrics.green import GREEN, HFJudge
    from metrics.tiny import write_tiny_causal_lm

    judge = HFJudge(write_tiny_causal_lm(tmp_path / "judge"), device="cpu", max_new_tokens=1500, batch_size=2)
    metric = GREEN(judge=judge)
    judge.load()
    before, start = set(threading.enumerate()), time.perf_counter()
    with pytest.raises(RewardError):  # 8 prompts × 1500 greedy tokens would take tens of seconds
        score_with_timeout(metric, [f"effusion {i}" for i in range(8)], ["No effusion."] * 8, timeout=0.3)
    assert time.perf_counter() - start < 3.0
    assert new_threads(before) == []


def test_the_endpoint_green_judge_sends_no_more_requests_once_cancelled():
    from metrics.green import GREEN
    from tests.helpers import FakeChatServer

    def slow_answer(payload):
        time.sleep(0.1)
        return "[Clinically Significant Errors]:\nNo errors.\n\n[Matched Findings]:\n1. Effusion.\n"

    with FakeChatServer(slow_answer) as server:
        metric = GREEN(endpoint=server.url, workers=2, retries=0)
        before = set(threading.enumerate())
        with pytest.raises(RewardError):  # 40 distinct pairs at 0.1 s each over 2 workers: 2 s
            score_with_timeout(metric, [f"effusion {i}" for i in range(40)], ["Effusion."] * 40, timeout=0.3)
        ours = [t for t in new_threads(before) if not t.name.startswith("Thread-")]  # server handlers aside
        assert ours == [], ours
        sent = len(server.seen)
        time.sleep(0.3)
        assert len(server.seen) == sent <= 12  # about 0.4 s of two workers, then nothing more
