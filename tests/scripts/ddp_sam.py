"""Run by ``torchrun --nproc_per_node 2`` (gloo, CPU) from tests/test_ddp.py: for every
configuration, a few SAM-family steps on this rank's shard of fixed batches with the model
wrapped in DistributedDataParallel; rank 0 saves the final parameters. With ``--single``: one
process on the concatenated batches."""

import argparse
import sys

import torch
import torch.distributed as dist
from torch import nn

import sam_diagnostics as sd

#: (variant, m, sync_epsilon)
CONFIGS = [("sam", None, "global"), ("sam", None, "replica"), ("sam", 1, "replica"),
           ("jsam", 1, "replica"), ("lsam", 2, "replica"), ("sam", 4, "replica")]

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--single", action="store_true")
args = p.parse_args()

torch.set_num_threads(1)
if args.single:
    rank, world = 0, 1
else:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
g = torch.Generator().manual_seed(1)
batches = [(torch.randn(8, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
results = {}
for variant, m, sync in CONFIGS:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    net = model if args.single else nn.parallel.DistributedDataParallel(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = sd.SAM(net, base, rho=0.2, m=m, variant=variant, sync_epsilon=sync)
    for x, y in batches:
        shard = slice(rank * 8 // world, (rank + 1) * 8 // world)
        opt.step(x[shard], y[shard])
    results[(variant, m, sync)] = {n: t.detach() for n, t in model.state_dict().items()}
if rank == 0:
    torch.save(results, args.out)
if not args.single:
    dist.destroy_process_group()
sys.exit(0)
