"""Run by ``torchrun --nproc_per_node 2`` (gloo, CPU) from tests/test_ddp_record.py: the
``sam-diagnostics train`` command lines given as JSON in argv[1], one after the other in this
process group. With argv[2] = "R:N", rank 1 dies (``os._exit``) at the N-th optimizer step of
run R (0-based), which must be the last."""

import json
import os
import sys

import torch
import torch.distributed as dist

from sam_diagnostics import record
from sam_diagnostics.cli import main

torch.set_num_threads(1)
runs = json.loads(sys.argv[1])
die_run, die_at = map(int, sys.argv[2].split(":")) if len(sys.argv) > 2 else (-1, 0)
dist.init_process_group("gloo")
step = record.Recorder.step


def dying(self, loss=None):
    if self.global_step + 1 == die_at:
        os._exit(3)
    return step(self, loss)


codes = []
for i, argv in enumerate(runs):
    if i == die_run and dist.get_rank() == 1:
        record.Recorder.step = dying
    codes.append(main(argv))
dist.destroy_process_group()
sys.exit(max(codes))
