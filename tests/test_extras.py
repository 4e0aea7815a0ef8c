"""Every extra installs together into a fresh virtual environment, and each integration imports.

Opt-in (it installs torch, transformers, lightning... into a new venv: minutes, network):
    SD_TEST_EXTRAS=1 python -m pytest tests/test_extras.py -q
The checks that need no installation (the extras' declarations) always run.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKPACK_PIN = "backpack-for-pytorch==1.7.1"

CHECK = r"""
import importlib, importlib.util, sys
import torch
assert torch.__version__.startswith("2.13.0"), torch.__version__
import lightning, transformers, tensorboard, opacus, backpack  # noqa: F401
from backpack.extensions import BatchL2Grad  # noqa: F401
import sam_diagnostics as sd
from sam_diagnostics.integrations import hf, lightning as sd_lightning  # noqa: F401
from sam_diagnostics.live import TensorBoardSink  # noqa: F401
from transformers import BertConfig, BertForSequenceClassification, Trainer  # noqa: F401
import sd_benchmarks.run  # noqa: F401
bench = importlib.util.find_spec("benchmarks")  # opacus' own top-level package, if any
print("torchvision installed:", importlib.util.find_spec("torchvision") is not None)
print("site benchmarks:", bench.origin if bench else None)
print("ok", sd.__version__)
"""


def _extras() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]


def test_extras_are_declared_without_torchvision():
    EXTRAS = _extras()
    assert {"dev", "lightning", "bench", "hf"} <= set(EXTRAS)
    every = " ".join(dep for deps in EXTRAS.values() for dep in deps).lower()
    assert "torchvision" not in every and "backpack" not in every
    assert any(d.startswith("transformers") for d in EXTRAS["hf"])
    assert any(d.startswith("tensorboard") for d in EXTRAS["hf"])


@pytest.mark.skipif(os.environ.get("SD_TEST_EXTRAS") != "1",
                    reason="installs into a fresh venv (minutes); set SD_TEST_EXTRAS=1")
def test_fresh_venv_installs_every_extra_and_imports_each_integration(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")

    def pip(*args):
        proc = subprocess.run([py, "-m", "pip", "install", "-q", *args], capture_output=True,
                              text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]

    pip("torch==2.13.0")  # CPU torch first, as scripts/test.sh does
    pip("-e", f"{ROOT}[dev,lightning,bench,hf]")
    pip("--no-deps", BACKPACK_PIN)  # see the comment on the bench extra in pyproject.toml
    proc = subprocess.run([py, "-c", CHECK], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)  # not the repository root: nothing shadowed by cwd
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok" in proc.stdout and "torchvision installed: False" in proc.stdout
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True)
    # pip check reports backpack's undeclared torchvision (installed without deps on purpose)
    problems = [line for line in check.stdout.splitlines() if "torchvision" not in line]
    assert not [p for p in problems if "has requirement" in p or "is not supported" in p], \
        check.stdout
    tests = subprocess.run(
        [py, "-m", "pytest", "tests/test_hf.py", "tests/test_live.py", "tests/test_benchmarks.py",
         "-q", "-x", "-p", "no:cacheprovider"], capture_output=True, text=True, timeout=1800,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert tests.returncode == 0, tests.stdout[-3000:]
