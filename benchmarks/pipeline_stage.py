"""One stage of ``benchmarks.pipeline`` in this process, and its result as one JSON line at exit.

``python -m benchmarks.pipeline_stage TARGET [ARGS ...]`` runs TARGET with ARGS:

- ``main``: ``main.main(args=ARGS)``, the LightningCLI (``fit --config configs/sft.yaml --trainer.… …``);
- ``evaluate``: ``radvlm_tools.evaluate.main(ARGS)``;
- ``phantom``: ``datamodules.phantom.main(ARGS)``;
- ``checkpoint``: ``benchmarks.checkpoint.checkpoint_main(ARGS)`` (a random-weight checkpoint folder).

Whatever happens, the last line it prints is ``PIPELINE_STAGE {...}`` with ``ok``, ``seconds`` (the target
alone, after this wrapper's imports), ``peak_gib`` (the largest ``torch.cuda.max_memory_allocated`` of the
process, ``null`` when CUDA was never used), ``peak_rss_gib`` (the process's peak resident memory) and
``error``; the exit status is 0 when the target returned normally. The GRPO module resets the CUDA peak
statistics every step (its ``memory/peak_gib`` is per step): this wrapper wraps
``torch.cuda.reset_peak_memory_stats`` so that the peak before each reset is kept, and the figure it prints
is the peak of the whole process.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: the repo root, not benchmarks/, must be importable
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(ROOT))

MARKER = "PIPELINE_STAGE "
TARGETS = ("main", "evaluate", "phantom", "checkpoint")


class CudaPeak:
    """Peak CUDA memory of the process, kept across ``torch.cuda.reset_peak_memory_stats`` calls."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.bytes = 0
        self._reset = torch.cuda.reset_peak_memory_stats

        def reset_keeping_peak(device=None) -> None:
            if torch.cuda.is_initialized():
                self.bytes = max(self.bytes, torch.cuda.max_memory_allocated(device))
            self._reset(device)

        torch.cuda.reset_peak_memory_stats = reset_keeping_peak

    def restore(self) -> None:
        self.torch.cuda.reset_peak_memory_stats = self._reset

    def gib(self) -> float | None:
        cuda = self.torch.cuda
        if not (cuda.is_available() and cuda.is_initialized()):
            return None
        return round(max(self.bytes, cuda.max_memory_allocated()) / 2**30, 2)


def run_target(target: str, args: list[str]) -> None:
    if target == "main":
        import main

        main.main(args=args)
    elif target == "evaluate":
        from radvlm_tools.evaluate import main as evaluate

        evaluate(args)
    elif target == "phantom":
        from datamodules.phantom import main as phantom

        phantom(args)
    elif target == "checkpoint":
        from benchmarks.checkpoint import checkpoint_main

        checkpoint_main(args)
    else:
        raise SystemExit(f"unknown target {target!r}: one of {', '.join(TARGETS)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in TARGETS:
        print(f"usage: python -m benchmarks.pipeline_stage {{{','.join(TARGETS)}}} [ARGS ...]", file=sys.stderr)
        return 2
    target, args = argv[0], argv[1:]
    peak = CudaPeak() if target != "phantom" else None  # the phantom writer needs no torch
    ok, error = True, None
    start = time.perf_counter()
    try:
        run_target(target, args)
    except SystemExit as exc:  # argument errors of LightningCLI / argparse
        ok = exc.code in (0, None)
        error = None if ok else f"SystemExit: {exc.code}"
    except BaseException as exc:  # noqa: BLE001  (reported on the result line, whatever it is)
        traceback.print_exc()
        ok, error = False, f"{type(exc).__name__}: {exc}"[:500]
    seconds = time.perf_counter() - start
    if peak is not None:
        peak.restore()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux → GiB
    result = {"target": target, "ok": ok, "seconds": round(seconds, 2), "peak_gib": peak.gib() if peak else None,
              "peak_rss_gib": round(rss, 2), "error": error}
    sys.stdout.flush()
    print(MARKER + json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
