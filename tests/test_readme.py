"""The README's commands, run as a new user would (at small size where they take minutes)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import xarray as xr

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_gives_exactly_two_setup_commands_and_ci_runs_the_test_one():
    block = README.split("## Two commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["bash scripts/study.sh", "bash scripts/test.sh"]
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    for script in ("study.sh", "test.sh"):
        text = (ROOT / "scripts" / script).read_text()
        assert "torch==2.13.0" in text  # CPU torch first, then the package


def test_main_job_code_path_at_tiny_size(tmp_path):
    """scripts/study.sh runs analyses/label_noise.py --quick; here with 2 epochs and 1 seed."""
    out = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "analyses" / "label_noise.py"), "--quick", "--epochs", "2",
         "--seeds", "1", "--jobs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| mnist1d-mlp | J-SAM |" in proc.stdout
    assert (out / "report.md").stat().st_size > 0
    assert sorted(p.name for p in (out / "figures" / "mnist1d-mlp").glob("*.png"))
    merged = xr.open_dataset(out / "mnist1d-mlp.nc")
    assert set(merged["optimizer"].values) == {"sgd", "sam", "lsam", "jsam", "regsgd"}
    merged.close()


def test_readme_cli_lines(tmp_path):
    lines = [line.strip() for line in README.splitlines()
             if line.strip().startswith("sam-diagnostics ") and "sweep" not in line]
    assert len(lines) == 5
    for line in lines:
        argv = line.split()
        if argv[1] == "train":
            argv += ["--no-progress", "--threads", "1"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
    assert (tmp_path / "figs" / "accuracy.png").exists()


def test_readme_probe_snippet():
    import sam_diagnostics as sd

    code = README.split("## Attach to your model in three lines", 1)[1]
    code = code.split("```python", 1)[1].split("```", 1)[0]
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    env = {"model": model, "x": torch.randn(12, 5), "y": torch.randint(0, 3, (12,)),
           "noisy": torch.arange(12) % 3 == 0}
    exec(code, env)
    assert isinstance(env["ds"], xr.Dataset)
    assert env["sd"] is sd


def test_readme_optimizer_snippet():
    code = README.split("Switch the optimizer in one line:", 1)[1]
    code = code.split("```python", 1)[1].split("```", 1)[0]
    import sam_diagnostics as sd

    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    env = {"torch": torch, "sd": sd, "model": model, "x": torch.randn(12, 5),
           "y": torch.randint(0, 3, (12,))}
    exec(code, env)
    assert env["loss"].dim() == 0


@pytest.mark.parametrize("page", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_pages_link_only_existing_files(page):
    for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
        if target.startswith("http"):
            continue
        assert (page.parent / target).exists(), f"{page.name} links missing {target}"


def test_docs_build(tmp_path):
    # the worked examples run in tests/test_examples.py; here the committed output is spliced
    env = {**os.environ, "SD_DOCS_SKIP_EXAMPLES": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
                           str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
    assert "jacobian_norms" in (tmp_path / "site" / "api" / "index.html").read_text()
    examples = (tmp_path / "site" / "examples" / "index.html").read_text()
    assert "best_test_acc" in examples and "example-output" not in examples
    assert (tmp_path / "site" / "figures" / "examples" / "02_compare_sam_sgd" /
            "logit_scale.png").exists()
