"""The CPU benchmarks run end to end at tiny sizes and write the JSON the summary reads."""

import json

import pytest
import torch

from benchmarks import grpo_step, rollout, run_all


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Both model benchmarks once, with run_all's ``quick`` settings, into one results folder."""
    folder = tmp_path_factory.mktemp("bench_results")
    work = str(tmp_path_factory.mktemp("bench_work"))
    quick = run_all.PRESETS["quick"]
    threads = torch.get_num_threads()
    rollout.main(quick["rollout"] + ["--out", str(folder / "rollout.json"), "--work", work])
    grpo_step.main(quick["grpo_step"] + ["--out", str(folder / "grpo_step.json"), "--work", work])
    assert torch.get_num_threads() == threads  # "--threads 1" is given back to the rest of the process
    return folder


def test_rollout_benchmark_times_both_paths_and_finds_identical_samples(results):
    data = json.loads((results / "rollout.json").read_text())
    rows = data["rows"]
    assert [(r["mode"], r["prompts"]) for r in rows] == [("plain", 1), ("shared", 1), ("plain", 2), ("shared", 2)]
    for r in rows:
        assert r["rows"] == 2 * r["prompts"]  # G = 2
        assert 0 < r["tokens"] <= r["rows"] * 4  # at most max_new_tokens per rollout
        assert r["tokens_per_s"] > 0 and r["bandwidth_bound_tokens_per_s"] > 0
        assert r["identical_samples"] is True
        assert r["image_tokens"] == 16  # 128² image → 8×8 patches → 4×4 merged tokens
    assert rows[1]["speedup"] > 0
    assert data["meta"]["copy_bandwidth_gb_s"] > 0


def test_grpo_step_benchmark_reports_every_phase_for_both_rollout_paths(results):
    data = json.loads((results / "grpo_step.json").read_text())
    rows = data["rows"]
    assert [r["mode"] for r in rows] == ["plain", "shared"]
    for r in rows:
        assert r["steps_timed"] == 1  # 2 steps, the first one a warm-up
        phases = [r[f"{p}_s"] for p in grpo_step.PHASES]
        assert all(t > 0 for t in phases)
        # the step time the module logs is the sum of its phases (each rounded to 1e-4 s here)
        assert r["step_s"] == pytest.approx(sum(phases), abs=5e-4)
        assert 0 < r["reward_fraction"] < 1
    assert rows[1]["speedup_step"] > 0
    assert rows[1]["same_lengths"] is True  # same seed and weights: the shared path sampled the same rollouts


def test_run_all_summary_lists_rollout_and_phase_breakdown(results, capsys):
    summary = run_all.main(["--summary-only", "--results", str(results)])
    assert set(summary["results"]) == {"rollout", "grpo_step"}
    text = capsys.readouterr().out
    assert "same samples True" in text
    assert "plain  step" in text and "shared step" in text and "generate " in text
