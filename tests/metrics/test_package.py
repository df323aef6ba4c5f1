"""The ``metrics`` package: every public name resolves, and importing the package alone is cheap."""

import subprocess
import sys

import metrics


def test_every_public_name_resolves_to_its_submodule_object():
    assert metrics.__all__ == sorted(metrics.__all__) and "SoftF1" in metrics.__all__
    for name in metrics.__all__:
        value = getattr(metrics, name)
        assert value.__module__.startswith("metrics."), name
    from metrics.grounding import SoftF1

    assert metrics.SoftF1 is SoftF1


def test_importing_the_package_imports_no_heavy_library():
    code = ("import sys, metrics; heavy = [m for m in ('torch', 'torchmetrics', 'transformers', 'bert_score', "
            "'radgraph') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=".")
    assert done.returncode == 0, done.stdout + done.stderr
