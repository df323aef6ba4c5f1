"""The console scripts of ``setup.cfg`` (``radvlm-evaluate``, ``radvlm-infer``, ``radvlm-demo``, …): each runs
one tool's ``main`` on the command line's arguments, as ``python -m radvlm_tools.<tool>`` does.

The tools' ``main`` return their result (a dict) to Python callers; an entry point's return value becomes the
exit status (``sys.exit``), where a dict would be printed and read as failure, so these return 0 instead."""

from __future__ import annotations

from collections.abc import Callable


def _run(main: Callable[[], object]) -> int:
    """Exit status 0 once ``main`` returns; its errors exit as they do under ``python -m`` (argparse: 2)."""
    main()
    return 0


def _entry(module: str) -> Callable[[], int]:
    """The console script of ``module``'s ``main`` (``_run``); the import waits for the call, so each tool loads
    only what it needs."""

    def run() -> int:
        import importlib

        return _run(importlib.import_module(module).main)

    run.__name__ = module.rsplit(".", 1)[1]
    return run


evaluate = _entry("radvlm_tools.evaluate")
infer = _entry("radvlm_tools.infer")
demo = _entry("radvlm_tools.demo")
shuffle_control = _entry("radvlm_tools.shuffle_control")
synthesize_thinking = _entry("radvlm_tools.synthesize_thinking")
ablation = _entry("radvlm_tools.ablation")
phantom = _entry("datamodules.phantom")
