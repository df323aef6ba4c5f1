"""The console scripts of ``setup.cfg`` (``radvlm-evaluate``, ``radvlm-infer``, ``radvlm-demo``, …): each runs
one tool's ``main`` on the command line's arguments, as ``python -m radvlm_tools.<tool>`` does.

The tools' ``main`` return their result (a dict) to Python callers; an entry point's return value becomes the
exit status (``sys.exit``), where a dict would be printed and read as failure, so these return 0 instead."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _run(main: Callable[[], Any]) -> int:
    """Exit status 0 once ``main`` returns; its errors exit as they do under ``python -m`` (argparse: 2)."""
    main()
    return 0


def evaluate() -> int:
    from radvlm_tools.evaluate import main

    return _run(main)


def infer() -> int:
    from radvlm_tools.infer import main

    return _run(main)


def demo() -> int:
    from radvlm_tools.demo import main

    return _run(main)


def shuffle_control() -> int:
    from radvlm_tools.shuffle_control import main

    return _run(main)


def synthesize_thinking() -> int:
    from radvlm_tools.synthesize_thinking import main

    return _run(main)


def ablation() -> int:
    from radvlm_tools.ablation import main

    return _run(main)


def phantom() -> int:
    from datamodules.phantom import main

    return _run(main)
