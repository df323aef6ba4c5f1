"""The whole pipeline end to end through ``main.py`` and the real configs, one stage per process, one line each.

``python -m benchmarks.pipeline [--size 2b|8b] [--work DIR] [--budget SECONDS]``   one GPU (gpu_check.sh pipeline)
``python -m benchmarks.pipeline --cpu-smoke [--work DIR]``                       the same plumbing on CPU, tiny

Seven stages (checkpoint, phantom, sft, grpo_lora, grpo_full, predict, evaluate; ``Pipeline.commands``), each
a separate process (``benchmarks.pipeline_stage``) under its own time limit, inside one overall budget. The
real configs are used as they are, with command-line overrides only (``Pipeline``). Output and exit status:
``Pipeline.run`` and ``main``.

Deviations from the paper's setup: random weights of the real shape (generations are noise, rewards mostly 0:
this checks that everything runs, not what it learns), phantom images, one device, runs of a few steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: the repo root, not benchmarks/, must be importable
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(ROOT))

from benchmarks.pipeline_stage import MARKER

STAGES = ("checkpoint", "phantom", "sft", "grpo_lora", "grpo_full", "predict", "evaluate")
MIN_STAGE_S = 10  # a stage is not started with less time than this left in the budget


@dataclasses.dataclass
class Settings:
    """Sizes of one pipeline run; ``limits``: seconds per stage; ``budget``: seconds for the whole run."""

    size: str
    accelerator: str
    image_size: int
    phantom_n: int
    sft_steps: int
    sft_batch: int
    grpo_steps: int  # rollout batches; optimizer steps = grpo_steps × updates
    grpo_batch: int  # prompts per GRPO step
    g: int
    max_new_tokens: int
    updates: int
    micro_batch: int
    workers: int
    predict_batch: int
    limits: dict[str, int]
    budget: int


def gpu_settings(size: str) -> Settings:
    """One GPU: 2B within 500 s in all (stage limits add up to 510 s; the budget caps the last); 8B ~20 min."""
    limits = {"checkpoint": 60, "phantom": 40, "sft": 100, "grpo_lora": 100, "grpo_full": 110, "predict": 60,
              "evaluate": 40}
    budget = 500
    if size == "8b":  # four times the weights to write, load and export per stage
        limits = {**limits, "checkpoint": 180, "sft": 300, "grpo_lora": 300, "grpo_full": 330, "predict": 150}
        budget = 1400
    return Settings(size=size, accelerator="gpu", image_size=672, phantom_n=24, sft_steps=3, sft_batch=4,
                    grpo_steps=2, grpo_batch=4, g=8, max_new_tokens=64, updates=2, micro_batch=8, workers=4,
                    predict_batch=8, limits=limits, budget=budget)


def cpu_smoke_settings() -> Settings:
    """Tiny checkpoint on CPU, bf16-true as on GPU: the plumbing of every stage in about two minutes."""
    return Settings(size="tiny", accelerator="cpu", image_size=64, phantom_n=24, sft_steps=2, sft_batch=2,
                    grpo_steps=1, grpo_batch=2, g=2, max_new_tokens=4, updates=2, micro_batch=4, workers=0,
                    predict_batch=4, limits=dict.fromkeys(STAGES, 150), budget=600)


# ---------------------------------------------------------------------------------------------- processes
def kill_group(proc: subprocess.Popen) -> None:
    """Stop a stage and the processes it started (data loader workers): TERM, then KILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_process(cmd: list[str], log: Path, limit: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Run ``cmd`` from the repository root with its output in ``log``; exit status (None: killed at the
    limit) and wall seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            code = None
        except BaseException:  # interrupted: leave nothing running
            kill_group(proc)
            raise
    return code, time.perf_counter() - t0


def stage_result(log: Path) -> dict[str, Any]:
    """The ``PIPELINE_STAGE`` line of a stage's log (empty when the process died before printing it)."""
    found: dict[str, Any] = {}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith(MARKER):
            found = json.loads(line[len(MARKER):])
    return found


def tail(log: Path, n: int = 25) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return "\n".join("    | " + line[-200:] for line in lines[-n:])


def flags(values: dict[str, Any]) -> list[str]:
    """``{"trainer.max_steps": 3}`` → ``["--trainer.max_steps", "3"]`` (lists and dicts as JSON)."""
    out: list[str] = []
    for key, value in values.items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, dict)):
            value = json.dumps(value)
        out += [f"--{key}", str(value)]
    return out


def has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------- pipeline
class Pipeline:
    """The stages of one run in ``work``, each started from the latest export that exists.

    The real configs are used as they are, with command-line overrides only: one device (``strategy auto``
    for SFT and LoRA GRPO; full GRPO keeps the config's ``FSDP2Strategy`` on one process), short runs, the work
    folder for data, logs and exports, and a few sizes (batch, G, new tokens). Precision (bf16-mixed: float32
    master weights), gradient checkpointing, SDPA, pixel budgets,
    optimizers, losses and callbacks stay the configs'. Without ``tensorboard`` installed, the configs'
    TensorBoard logger is replaced by ``CSVLogger`` (said on the stage's line). Each stage's Lightning
    checkpoint (``save_last``) is written, measured and deleted after the stage unless ``keep_checkpoints``
    (disk: a 2B full fine-tune's checkpoint with its AdamW state is ≈ 13 GB). A stage starts from the latest
    export that exists, so a failed stage does not hide the ones after it. Random weights: generations are
    noise (ids outside the tiny tokenizer decode to nothing), rewards mostly 0.
    """

    def __init__(self, settings: Settings, work: Path, keep_checkpoints: bool = False) -> None:
        self.s = settings
        self.work = work
        self.keep_checkpoints = keep_checkpoints
        self.base = work / "base"
        self.phantom = work / "phantom"
        self.exports = work / "exports"
        self.predictions = work / "predictions" / "vindr.jsonl"
        self.logs = work / "logs"
        self.tensorboard = any(importlib.util.find_spec(m) is not None for m in ("tensorboard", "tensorboardX"))
        self.results: list[dict[str, Any]] = []
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        PYTHONUNBUFFERED="1")
        if settings.accelerator == "cpu":
            self.env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: one thread per process is fastest

    # ------------------------------------------------------------------ stage commands
    def trainer_flags(self, name: str, optimizer_steps: int, val_after: int, fsdp2: bool = False) -> dict[str, Any]:
        """One device, short run, one validation batch after ``val_after`` training batches, logs in WORK;
        ``fsdp2`` keeps the config's ``FSDP2Strategy`` (one process: its precision policy and whole-weight
        decoding run as on many GPUs) instead of ``strategy auto``."""
        out: dict[str, Any] = {
            "trainer.accelerator": self.s.accelerator, "trainer.devices": 1, "trainer.num_nodes": 1,
            "trainer.max_steps": optimizer_steps, "trainer.val_check_interval": val_after,
            "trainer.limit_val_batches": 1, "trainer.default_root_dir": self.work / "runs" / name,
        }
        if fsdp2:
            out["trainer.strategy.init_args.hybrid_shard"] = False  # one node, one process
        else:
            out["trainer.strategy"] = "auto"
        if self.tensorboard:
            out.update({"trainer.logger.init_args.save_dir": self.work / "runs", "trainer.logger.init_args.name": name})
        else:
            out["trainer.logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": str(self.work / "runs"), "name": name}}
        return out

    def latest_export(self, names: tuple[str, ...]) -> Path:
        """The first of ``names`` (exports) that exists, else the base checkpoint."""
        for name in names:
            if has_weights(self.exports / name):
                return self.exports / name
        return self.base

    def sft_args(self) -> list[str]:
        s = self.s
        return ["main", "fit", "--config", "configs/sft.yaml", *flags({
            **self.trainer_flags("sft", s.sft_steps, s.sft_steps),
            "model.init_args.policy.name_or_path": self.base,
            "model.init_args.max_new_tokens": s.max_new_tokens,  # greedy samples at validation
            "model.init_args.num_generation_samples": 2,
            "model.init_args.export_dir": self.exports / "sft",
            "data.init_args.phantom_dir": self.phantom, "data.init_args.batch_size": s.sft_batch,
            "data.init_args.num_workers": s.workers, "data.init_args.max_val_samples": s.sft_batch,
        })]

    def grpo_args(self, name: str, lora: bool) -> list[str]:
        s = self.s
        values = {
            **self.trainer_flags(name, s.grpo_steps * s.updates, s.grpo_steps, fsdp2=not lora),
            "model.init_args.policy.name_or_path": self.latest_export(("sft",)),
            "model.init_args.num_generations": s.g, "model.init_args.max_new_tokens": s.max_new_tokens,
            "model.init_args.val_max_new_tokens": s.max_new_tokens,
            "model.init_args.ppo_mini_batch_size": max(1, s.grpo_batch // s.updates),
            "model.init_args.micro_batch_size": s.micro_batch, "model.init_args.export_dir": self.exports / name,
            "data.init_args.phantom_dir": self.phantom, "data.init_args.batch_size": s.grpo_batch,
            "data.init_args.eval_batch_size": s.grpo_batch, "data.init_args.num_workers": s.workers,
            "data.init_args.max_val_samples": s.grpo_batch,
        }
        if lora:
            values["model.init_args.policy.lora"] = {"r": 16, "alpha": 32}
        return ["main", "fit", "--config", "configs/grpo_grounding.yaml", *flags(values)]

    def predict_args(self) -> list[str]:
        s = self.s
        return ["main", "predict", "--config", "configs/eval_vindr.yaml", *flags({
            "trainer.accelerator": s.accelerator, "trainer.default_root_dir": self.work / "runs" / "predict",
            "trainer.callbacks.init_args.output": self.predictions,
            "model.init_args.policy.name_or_path": self.latest_export(("grpo_full", "grpo_lora", "sft")),
            "model.init_args.max_new_tokens": s.max_new_tokens,
            "data.init_args.predict_files": [str(self.phantom / "test.json")],
            "data.init_args.tasks": ["abnormality_grounding"], "data.init_args.eval_batch_size": s.predict_batch,
            "data.init_args.num_workers": s.workers,
        })]

    def commands(self) -> dict[str, tuple[list[str], Path, list[str]]]:
        """Per stage: wrapper arguments, the artefact it must leave, and the stages it needs.

        Each stage runs in its own process (``benchmarks.pipeline_stage``, which reports the process's seconds,
        peak CUDA memory and peak RSS):

        1. ``checkpoint``: a random-weight Qwen3-VL checkpoint folder of the real shape (``--size 2b``: 2.13 B
           parameters, ``8b``: 8.77 B; ``benchmarks.rollout.SHAPES``), built directly on the GPU in bf16 and
           saved as safetensors, with the tokenizer, image processor and chat template of the tiny checkpoint
           (``radvlm.tiny``; no network). ``--cpu-smoke``: the tiny checkpoint itself.
        2. ``phantom``: ``python -m datamodules.phantom`` (24 images of 672², the configs' pixel budget: 441
           visual tokens per image).
        3. ``sft``: ``main.py fit --config configs/sft.yaml`` (full fine-tune, gradient checkpointing,
           bf16-true), a few steps and one validation batch, export.
        4. ``grpo_lora``: ``main.py fit --config configs/grpo_grounding.yaml`` with LoRA r = 16 (reference =
           adapters off), from the SFT export: 2 GRPO steps of 4 prompts × G = 8, 2 optimizer updates each
           (π_old log-probs computed), soft-F1 reward (needs no weights), one validation batch (mAP), merged
           export.
        5. ``grpo_full``: the same as a full fine-tune (frozen reference copy on the GPU).
        6. ``predict``: ``main.py predict --config configs/eval_vindr.yaml`` (greedy, ``PredictionWriter``) on
           the phantom test images' abnormality-grounding prompts, with the full-GRPO export.
        7. ``evaluate``: ``python -m radvlm_tools.evaluate`` of those predictions (mAP@0.5, IoU, soft-F1,
           bootstrap CIs).
        """
        s = self.s
        device = "cuda" if s.accelerator == "gpu" else "cpu"
        evaluate = ["evaluate", str(self.predictions), "--offline", "--bootstrap", "200",
                    "--json", str(self.predictions.with_suffix(".eval.json"))]
        return {
            "checkpoint": (["checkpoint", str(self.base), "--size", s.size, "--device", device, "--work",
                            str(self.work)], self.base / "config.json", []),
            "phantom": (["phantom", str(self.phantom), "--n", str(s.phantom_n), "--size", str(s.image_size)],
                        self.phantom / "meta.json", []),
            "sft": (self.sft_args(), self.exports / "sft" / "config.json", ["checkpoint", "phantom"]),
            "grpo_lora": (self.grpo_args("grpo_lora", lora=True), self.exports / "grpo_lora" / "config.json",
                          ["checkpoint", "phantom"]),
            "grpo_full": (self.grpo_args("grpo_full", lora=False), self.exports / "grpo_full" / "config.json",
                          ["checkpoint", "phantom"]),
            "predict": (self.predict_args(), self.predictions, ["checkpoint", "phantom"]),
            "evaluate": (evaluate, self.predictions.with_suffix(".eval.json"), ["predict"]),
        }

    # ------------------------------------------------------------------ running
    def checkpoints_written(self, name: str) -> float:
        """GB of Lightning checkpoints the stage wrote; deleted unless ``keep_checkpoints``."""
        total = 0.0
        for folder in (self.work / "runs" / name).glob("**/checkpoints"):
            total += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e9
            if not self.keep_checkpoints:
                shutil.rmtree(folder, ignore_errors=True)
        return total

    def run_stage(self, name: str, deadline: float) -> dict[str, Any]:
        wrapper_args, artefact, needs = self.commands()[name]  # built now: the latest exports decide
        row: dict[str, Any] = {"stage": name, "limit_s": self.s.limits[name]}
        passed = {r["stage"] for r in self.results if r["result"] == "pass"}
        missing = [n for n in needs if n not in passed]
        left = deadline - time.perf_counter()
        if missing or left < MIN_STAGE_S:
            row.update(result="skipped", seconds=0.0,
                       note=f"needs {', '.join(missing)}" if missing else f"{left:.0f} s left in the budget")
            return row
        limit = min(self.s.limits[name], left)
        row["limit_s"] = round(limit)
        log = self.logs / f"{name}.log"
        cmd = [sys.executable, "-m", "benchmarks.pipeline_stage", *wrapper_args]
        (log.parent).mkdir(parents=True, exist_ok=True)
        log.with_suffix(".cmd").write_text(" ".join(cmd) + "\n")
        code, seconds = run_process(cmd, log, limit, self.env)
        inner = stage_result(log)
        row.update(seconds=round(seconds, 1), log=str(log), peak_gib=inner.get("peak_gib"),
                   peak_rss_gib=inner.get("peak_rss_gib"), inner_s=inner.get("seconds"))
        notes = []
        if code is None:
            row["result"], row["error"] = "timeout", f"killed after {limit:.0f} s"
        elif code != 0 or not inner.get("ok"):
            row["result"], row["error"] = "fail", inner.get("error") or f"exit status {code}"
        elif not artefact.exists():
            row["result"], row["error"] = "fail", f"finished without writing {artefact}"
        else:
            row["result"] = "pass"
        if name in ("sft", "grpo_lora", "grpo_full"):
            gb = self.checkpoints_written(name)
            size = f"{gb:.1f} GB" if gb >= 0.1 else f"{1000 * gb:.0f} MB"
            notes.append(f"ckpt {size}{' (deleted)' if gb and not self.keep_checkpoints else ''}")
            if name.startswith("grpo"):
                start = self.latest_export(("sft",))
                notes.append(f"from {start.name}")
            if not self.tensorboard:
                notes.append("CSVLogger (no tensorboard)")
        if name == "predict":
            notes.append(f"model {self.latest_export(('grpo_full', 'grpo_lora', 'sft')).name}")
            if self.predictions.exists():
                from radvlm_tools.prediction_files import read_prediction_file

                notes.append(f"{len(read_prediction_file(self.predictions).rows)} rows")
        if name == "evaluate" and artefact.exists():
            notes.append(evaluation_note(artefact))
        row["note"] = ", ".join(n for n in notes if n)
        return row

    def clean(self) -> None:
        """Remove what an earlier run left in the work folder (only the pipeline's own outputs)."""
        for name in ("base", "tiny", "phantom", "exports", "predictions", "runs", "logs"):
            shutil.rmtree(self.work / name, ignore_errors=True)
        (self.work / "pipeline.json").unlink(missing_ok=True)

    def run(self) -> dict[str, Any]:
        """Every stage in turn; the summary, also written to ``WORK/pipeline.json``.

        Output: one line per stage when it ends (pass/fail, seconds, peak GiB), the last lines of a failed
        stage's log, and a final table. Logs of every stage: ``WORK/logs/<stage>.log`` (its command line
        beside it, ``.cmd``).
        """
        start = time.perf_counter()
        deadline = start + self.s.budget
        self.work.mkdir(parents=True, exist_ok=True)
        self.clean()
        print(f"pipeline: size {self.s.size} on {self.s.accelerator}, budget {self.s.budget} s, work {self.work}",
              flush=True)
        for name in STAGES:
            row = self.run_stage(name, deadline)
            self.results.append(row)
            print(format_line(row), flush=True)
            if row["result"] in ("fail", "timeout") and row.get("log"):
                print(tail(Path(row["log"])), flush=True)
        total = time.perf_counter() - start
        summary = {"settings": dataclasses.asdict(self.s), "stages": self.results, "total_s": round(total, 1),
                   "budget_s": self.s.budget, "passed": all(r["result"] == "pass" for r in self.results),
                   "date": time.strftime("%Y-%m-%d"), "work": str(self.work)}
        (self.work / "pipeline.json").write_text(json.dumps(summary, indent=2))
        print(format_table(summary), flush=True)
        return summary


def evaluation_note(path: Path) -> str:
    """mAP@0.5 and soft-F1 of the evaluated predictions (random weights: expect ~0)."""
    try:
        metrics = json.loads(path.read_text())["tasks"]["abnormality_grounding"]["metrics"]
        parts = [f"{metrics[k]['label']} {metrics[k]['value']:.3f}" for k in ("map", "soft_f1")
                 if metrics.get(k, {}).get("value") is not None]
        return ", ".join(parts) or "evaluated"
    except (KeyError, TypeError, ValueError):
        return "evaluated"


def format_line(row: dict[str, Any]) -> str:
    peak = f"{row['peak_gib']:.2f} GiB" if row.get("peak_gib") is not None else "—"
    rss = f"{row['peak_rss_gib']:.2f}" if row.get("peak_rss_gib") is not None else "—"
    extra = f"  {row['error']}" if row.get("error") else ""
    note = f"  [{row['note']}]" if row.get("note") else ""
    return (f"pipeline: {row['stage']:<11}{row['result'].upper():<8}{row.get('seconds', 0):>7.1f} s "
            f"(limit {row['limit_s']} s)  peak GPU {peak}, RSS {rss} GiB{note}{extra}")


def format_table(summary: dict[str, Any]) -> str:
    lines = ["", f"{'stage':<11} {'result':<8} {'seconds':>8} {'limit':>6} {'peak GPU GiB':>13} {'peak RSS GiB':>13}  note"]
    for r in summary["stages"]:
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "—"
        rss = f"{r['peak_rss_gib']:.2f}" if r.get("peak_rss_gib") is not None else "—"
        note = "; ".join(x for x in (r.get("note"), r.get("error")) if x)
        lines.append(f"{r['stage']:<11} {r['result']:<8} {r.get('seconds', 0):>8.1f} {r['limit_s']:>6} {peak:>13} "
                     f"{rss:>13}  {note}")
    verdict = "all stages passed" if summary["passed"] else "NOT all stages passed"
    lines.append(f"total {summary['total_s']:.1f} s of a {summary['budget_s']} s budget: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline; with ``--results DIR``, also copy the summary to ``DIR/pipeline-SIZE.json``.

    Run as a script, the exit status is 0 when every stage passed.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2b", choices=["2b", "8b"], help="checkpoint shape (GPU)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny checkpoint on CPU (tests the plumbing)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary folder)")
    parser.add_argument("--budget", type=int, default=None, help="seconds for the whole run (default: by size)")
    parser.add_argument("--results", default=None, help="also write pipeline-SIZE.json to this folder")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the stages' Lightning checkpoints")
    args = parser.parse_args(argv)
    settings = cpu_smoke_settings() if args.cpu_smoke else gpu_settings(args.size)
    if args.budget is not None:
        settings.budget = args.budget
    work = Path(args.work or tempfile.mkdtemp(prefix="radvlm-pipeline-"))
    summary = Pipeline(settings, work, keep_checkpoints=args.keep_checkpoints).run()
    if args.results:
        folder = Path(args.results)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"pipeline-{settings.size}.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
