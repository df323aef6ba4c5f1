"""The CPU benchmarks and the GPU pipeline script run end to end at tiny sizes and write what the summaries read."""

import json
import sys

import pytest
import torch

from benchmarks import checkpoint, grpo_step, pipeline, pipeline_stage, rollout, run_all


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
    assert [(r["mode"], r["prompts"]) for r in rows] == [(m, b) for b in (1, 2) for m in ("plain", "shared", "fsdp2")]
    assert data["meta"]["statistic"] == "median" and data["meta"]["warmup"] == 1
    for r in rows:
        assert r["rows"] == 2 * r["prompts"]  # G = 2
        assert 0 < r["tokens"] <= r["rows"] * 4  # at most max_new_tokens per rollout
        assert r["tokens_per_s"] > 0 and r["bandwidth_bound_tokens_per_s"] > 0
        assert r["reps"] == 2 and len(r["rep_seconds"]) == 2  # the warm-up repetition is not among them
        assert min(r["rep_seconds"]) <= r["seconds"] <= max(r["rep_seconds"])  # the median
        assert r["identical_samples"] is True  # float32: the exact check holds
        # and the bf16-proof check: greedy tokens are the arg-max of a cache-free forward pass
        assert r["greedy_consistent"] is True and r["greedy_equal_frac"] == 1.0
        assert r["greedy_gap_plain"] <= rollout.GREEDY_TIE_TOLERANCE
        assert r["image_tokens"] == 16  # 128² image → 8×8 patches → 4×4 merged tokens
    assert rows[1]["speedup"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], rel=1e-2)
    assert not torch.distributed.is_initialized()  # the one-process group of the fsdp2 mode was ended
    assert data["meta"]["copy_bandwidth_gb_s"] > 0


def test_greedy_gap_flags_tokens_that_are_not_the_argmax(tiny_ckpt, tmp_path):
    """A completion that is not the model's greedy choice (each token shifted by one id) is far above the
    tolerance, while the greedy output itself has gap 0 in float32."""
    from radvlm.policy import Policy, repeat_batch

    policy = Policy.from_pretrained(tiny_ckpt, max_pixels=64 * 64)
    policy.eval()
    records = rollout.write_prompt_records(tmp_path, 2, 64)
    batch = rollout.prompt_batch(policy, records, 2, "cpu")
    out = policy.generate(batch, num_return_sequences=2, max_new_tokens=6, shared_prefill=True)
    prompt = repeat_batch(Policy.model_inputs(batch), 2)
    suppress = torch.as_tensor(policy.suppress_token_ids, dtype=torch.long)
    assert rollout.greedy_gap(policy, prompt, out, suppress) <= 1e-4  # float32: exactly the arg-max
    out.completion_ids = (out.completion_ids + 1) % len(policy.tokenizer)  # not the model's choices
    assert rollout.greedy_gap(policy, prompt, out, suppress) > 10 * rollout.GREEDY_TIE_TOLERANCE


def test_grpo_step_benchmark_alternates_modes_and_reports_wall_clock_beside_phases(results):
    data = json.loads((results / "grpo_step.json").read_text())
    rows = data["rows"]
    assert [r["mode"] for r in rows] == ["plain", "shared"]
    assert data["meta"]["modes_alternate"] is True and data["meta"]["warmup"] == 1
    for r in rows:
        assert r["steps_timed"] == 2  # 6 steps: plain, shared, plain, shared, plain, shared; the first two dropped
        phases = [r[f"{p}_s"] for p in grpo_step.PHASES]
        assert all(t > 0 for t in phases)
        # wall clock from the previous step's end includes the four phases (and data loading, logging)
        assert r["step_s"] >= r["phase_sum_s"] > 0
        assert len(r["rep_step_s"]) == 2
        assert 0 < r["reward_fraction"] < 1
    assert rows[1]["speedup_step"] > 0


def test_run_all_summary_lists_rollout_and_phase_breakdown(results, capsys):
    summary = run_all.main(["--summary-only", "--results", str(results)])
    assert set(summary["results"]) == {"rollout", "grpo_step"}
    text = capsys.readouterr().out
    assert "same samples True" in text and "greedy consistent True" in text
    assert "plain  step" in text and "shared step" in text and "generate " in text and "phases " in text


def test_checkpoint_writer_gives_a_loadable_folder_of_the_requested_shape(tmp_path):
    """The GPU pipeline's checkpoint path (shaped config + the tiny tokenizer files), at a CPU size."""
    from radvlm.policy import Policy

    info = checkpoint.write_checkpoint(tmp_path / "small", "small", "cpu", dtype="float32", work=tmp_path)
    assert info["params_b"] > 0.01
    policy = Policy.from_pretrained(tmp_path / "small")
    text = policy.hf_model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers) == (512, 4)  # rollout.SHAPES["small"]
    assert policy.tokenizer("<|im_start|>")["input_ids"] == [policy.tokenizer.convert_tokens_to_ids("<|im_start|>")]
    assert (tmp_path / "small" / "chat_template.jinja").is_file()


def test_stage_wrapper_reports_a_failure_on_its_result_line(tmp_path, capsys):
    assert pipeline_stage.main(["phantom", str(tmp_path / "p"), "--n", "0"]) == 1  # n < 1 is refused
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith(pipeline_stage.MARKER)][-1]
    result = json.loads(line[len(pipeline_stage.MARKER):])
    assert result["ok"] is False and "ValueError" in result["error"] and result["peak_gib"] is None


def test_stage_past_its_limit_is_killed(tmp_path):
    code, seconds = pipeline.run_process([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "log", 1,
                                         {"PATH": "/usr/bin:/bin"})
    assert code is None and seconds < 15


@pytest.mark.timeout(600)  # about 75 s on 2 idle cores (seven processes, mostly imports); allow a busy machine
def test_gpu_pipeline_runs_every_stage_on_cpu_in_smoke_mode(tmp_path, capsys):
    """phantom → SFT → GRPO (LoRA, full under FSDP2Strategy) → predict → evaluate through main.py and the real
    configs (bf16-mixed fits, bf16-true predictions), tiny checkpoint on CPU: the plumbing of ``gpu_check.sh pipeline``."""
    summary = pipeline.main(["--cpu-smoke", "--work", str(tmp_path), "--results", str(tmp_path / "results")])
    out = capsys.readouterr().out
    stages = {r["stage"]: r for r in summary["stages"]}
    assert list(stages) == list(pipeline.STAGES)
    failed = {n: (r["result"], r.get("error")) for n, r in stages.items() if r["result"] != "pass"}
    assert not failed, f"{failed}\n{out}"
    assert summary["passed"] and summary["settings"]["accelerator"] == "cpu"
    for name in pipeline.STAGES:
        assert f"pipeline: {name}" in out  # one line per stage as it ends
        assert stages[name]["peak_gib"] is None and stages[name]["peak_rss_gib"] > 0  # no CUDA on CPU
    for name in ("sft", "grpo_lora", "grpo_full"):
        assert pipeline.has_weights(tmp_path / "exports" / name)
        # full GRPO keeps the config's FSDP2Strategy (one process): precision policy and whole-weight decoding
        assert ("--trainer.strategy auto" in (tmp_path / "logs" / f"{name}.cmd").read_text()) == (name != "grpo_full")
        assert not list((tmp_path / "runs" / name).glob("**/checkpoints"))  # written, measured, deleted
    assert "from sft" in stages["grpo_full"]["note"] and "model grpo_full" in stages["predict"]["note"]
    header, *lines = (tmp_path / "predictions" / "vindr.jsonl").read_text().splitlines()
    assert "radvlm_prediction_header" in json.loads(header)  # the model that wrote the rows
    assert len(lines) == 2 and all(json.loads(x)["task"] == "abnormality_grounding" for x in lines)
    assert "mAP@0.5" in stages["evaluate"]["note"]  # the evaluator's JSON was read back
    assert json.loads((tmp_path / "results" / "pipeline-tiny.json").read_text())["passed"] is True
    assert "all stages passed" in out


def test_rollout_benchmark_times_the_vllm_engine_on_the_stand_in(tmp_path, monkeypatch):
    """The ``vllm`` mode through ``tests/fake_vllm.py``: built from a saved folder of the benchmark's model,
    timed beside ``shared``, with its share of the bound and the log-prob gap to the trainer."""
    from tests import fake_vllm

    fake_vllm.install(monkeypatch)
    rows = rollout.main(["--size", "tiny", "--image-size", "128", "--batch-sizes", "1", "--g", "2",
                         "--max-new-tokens", "4", "--warmup", "1", "--reps", "2", "--greedy-tokens", "0",
                         "--threads", "1", "--modes", "shared", "vllm", "--out", str(tmp_path / "r.json"),
                         "--work", str(tmp_path / "work")])
    by_mode = {r["mode"]: r for r in rows}
    assert set(by_mode) == {"shared", "vllm"} and (tmp_path / "work" / "vllm_model" / "config.json").is_file()
    assert 0 <= by_mode["vllm"]["logprob_diff_mean"] < 0.5 and "logprob_diff_mean" not in by_mode["shared"]
    assert all(0 < r["share_of_bound"] < 1 for r in rows)


def test_grpo_step_optimized_and_packed_modes_report_the_correctness_column(tmp_path):
    out = tmp_path / "grpo_step_packed.json"
    grpo_step.main(["--size", "tiny", "--image-size", "128", "--batch-size", "2", "--g", "2", "--max-new-tokens", "4",
                    "--warmup", "0", "--reps", "1", "--threads", "1", "--modes", "shared", "packed", "prefix",
                    "--out", str(out), "--work", str(tmp_path / "work")])
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == ["shared", "packed", "prefix"]
    assert rows[1]["speedup_train_side"] > 0 and rows[2]["speedup_train_side"] > 0
    assert rows[0]["check_prefix_logprob_max_abs_diff"] < 1e-4
    # float32 on CPU: the packed pass gives the padded pass's log-probs and gradients up to rounding
    assert rows[0]["check_packed_logprob_max_abs_diff"] < 1e-4
    assert rows[0]["check_packed_other_grad_max_abs_diff"] < 1e-3
