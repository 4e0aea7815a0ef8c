"""The SAM family under DistributedDataParallel: ``torchrun --nproc_per_node 2`` (gloo, CPU) ends
at the parameters of one process on the concatenated batches (issue 13)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_sam.py"
ROOT = Path(__file__).resolve().parents[1]


def run(out, torchrun):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "2"] if torchrun else []),
           str(SCRIPT), "--out", str(out), *([] if torchrun else ["--single"])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    return run(d / "two.pt", torchrun=True), run(d / "one.pt", torchrun=False)


def close(a, b):
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("config", [
    ("sam", None, "global"),   # batch SAM with the global batch's ε
    ("sam", 1, "replica"),     # 1-SAM: per-example ε is local by definition
    ("jsam", 1, "replica"),
    ("lsam", 2, "replica"),    # m-sharpness: groups inside each rank's shard
], ids=str)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(runs, config):
    two, one = runs
    close(two[config], one[config])


def test_replica_epsilon_is_m_sharpness_with_the_local_batch(runs):
    """The option matters: per-replica ε differs from the global one and equals m = B / ranks."""
    two, one = runs
    a, b = two[("sam", None, "replica")], two[("sam", None, "global")]
    assert any(not torch.allclose(a[n], b[n], rtol=1e-6, atol=1e-9) for n in a)
    close(a, one[("sam", 4, "replica")])
