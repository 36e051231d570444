"""Train a patched model under FSDP2 (``torch.distributed.fsdp.fully_shard``) and check it against
single-process training on the same data.

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_cbam.py --steps 5

Runs on CPUs with the gloo backend (each process holds half of every sharded parameter); on GPUs
use ``--backend nccl`` and move the model to ``cuda:LOCAL_RANK``. The model is a ResNet-18 with
GroupNorm (batch norm would make each rank's statistics differ from a full batch's) and CBAM on
its residual branches; every CBAM module is its own FSDP unit, the rest of the model the root's.
Each rank trains on its half of every global batch; rank 0 then trains a copy in one process on
the whole batches and prints both loss curves and their largest difference (exit status 1 when it
is above 1e-4).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn

from cbam_insert import CBAM, insert_cbam

BATCH = 8  # global batch, split over the ranks


def build() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, norm_layer=lambda c: nn.GroupNorm(8, c))
    return insert_cbam(model, after="block", example_inputs=(torch.rand(1, 3, 32, 32),), seed=0).train()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.rand(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def train(model: nn.Module, steps: int, rank: int = 0, world: int = 1) -> list[float]:
    """SGD steps on this rank's share of each batch; the global (mean) loss of each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for step in range(steps):
        x, y = batch(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        losses.append(float(total))
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backend", default="gloo")
    args = parser.parse_args()
    torch.set_num_threads(1)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        print("single process (launch with torchrun --nproc_per_node 2 to shard):", train(build(), args.steps))
        return 0
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group(args.backend)
    rank = dist.get_rank()
    try:
        mesh = init_device_mesh("cpu" if args.backend == "gloo" else "cuda", (world,))
        model = build()
        cbams = [m for m in model.modules() if isinstance(m, CBAM)]
        for m in cbams:
            fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        sharded = train(model, args.steps, rank, world)
    finally:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    reference = train(build(), args.steps)
    diff = max(abs(a - b) for a, b in zip(sharded, reference, strict=True))
    print(f"FSDP2 on {world} processes, {len(cbams)} CBAM modules as their own units")
    print("fsdp2 losses: " + " ".join(f"{v:.6f}" for v in sharded))
    print("single-process losses: " + " ".join(f"{v:.6f}" for v in reference))
    print(f"max |difference|: {diff:.3g}")
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
