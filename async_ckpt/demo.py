"""The training demo: a tiny character-level transformer with async checkpoints.

    python -m async_ckpt.demo                 # train, saving every 25 steps
    python -m async_ckpt.demo --resume        # continue exactly where the last commit left off
    torchrun --nproc-per-node 2 -m async_ckpt.demo --resume          # DDP on 2 ranks
    torchrun --nproc-per-node 2 -m async_ckpt.demo --resume --fsdp   # FSDP2 on 2 ranks

It trains with AdamW, warmup + cosine LR, dropout and a shuffled, resumable data
order, so every kind of state a resume can get wrong is in play. Each step prints its
loss; each committed save prints its stall, size, throughput and time to commit.
Kill it at any moment (Ctrl-C, ``kill -9``): ``--resume`` prints the same losses the
uninterrupted run would have printed.

Under ``torchrun`` (``WORLD_SIZE`` set) every rank runs this script: gloo on the CPU, NCCL
with one GPU per rank when CUDA is available. The model is wrapped in DDP, or sharded with
FSDP2 (``fully_shard`` on a 1-D device mesh) with ``--fsdp``. ``--batch-size`` is then the
global batch: every rank draws the same global batch from the sampler and trains on its
``[rank::world_size]`` share, so the sample order does not depend on the number of ranks.
Each rank has its own dropout stream (saved and restored per rank); rank 0 prints the
global loss (the mean of the ranks' losses) and the save lines. Resume with the same
number of ranks for the same losses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import CheckpointManager, CheckpointManagerOptions, ResumableSampler

_WORDS = ("the a checkpoint model saves every step and resumes exactly where it stopped "
          "loss gradient optimizer moment learning rate warmup cosine schedule dropout random "
          "seed data order epoch tensor disk commit manifest marker rename fsync crash "
          "restore training continues bit for bit as if nothing happened").split()


def make_corpus(seed: int, n_chars: int = 60_000) -> str:
    """Deterministic pseudo-English text (the demo ships no data and fetches none)."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
        sentence = sentence.capitalize() + rng.choice([".", ".", "!", "?"]) + " "
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = self.drop(att.masked_fill(~mask, float("-inf")).softmax(-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, block: int, dim: int = 64, layers: int = 2, heads: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(block, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight      # tied weights: saved once, restored tied
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.tok(idx) + self.pos[: idx.shape[1]])
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


@dataclass(frozen=True)
class World:
    """Where this process trains: its rank, the number of ranks and its device."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False


def init_world(args: argparse.Namespace) -> World:
    """A process group when launched by torchrun (or for ``--fsdp`` in one process), else none."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched and not args.fsdp:
        return World()
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    device = torch.device("cpu")
    if cuda:
        # Deterministic cuBLAS (use_deterministic_algorithms) needs this before its first use.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    size = int(os.environ.get("WORLD_SIZE", "1")) if launched else 1
    if args.batch_size % size:
        raise SystemExit(f"--batch-size {args.batch_size} (the global batch) must be divisible by the {size} ranks")
    backend = "nccl" if cuda else "gloo"
    if launched:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return World(dist.get_rank(), dist.get_world_size(), device, True)


def build(args: argparse.Namespace, world: Optional[World] = None):
    """Model, optimizer, scheduler, sampler and data, all from ``args.seed``.

    With several ranks every rank builds the same model; ``model`` is the module whose
    state is saved (under DDP the wrapped module, so its keys are the single-process ones)
    and ``train_model`` is what the forward pass calls.
    """
    world = world or World()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed % (2 ** 32))
    text = make_corpus(args.seed)
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    model = TinyGPT(len(chars), args.block, dim=args.dim)
    train_model = model
    if world.distributed:
        model.to(world.device)
        data = data.to(world.device)
        if args.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(world.device.type, (world.size,))
            for blk in model.blocks:
                fully_shard(blk, mesh=mesh)
            fully_shard(model, mesh=mesh)      # the rest, tied embedding/head included
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # DDP all-reduces gradients in buckets and, by default, re-lays them out after the
            # first iteration. With three or more ranks an element's summation order depends
            # on its offset in the bucket, so the first step after a resume (old layout) would
            # differ in the last bit from the uninterrupted run's (new layout).
            # find_unused_parameters=True keeps the layout fixed (at the cost of a graph
            # walk per step and a warning from DDP); with two ranks a + b == b + a anyway.
            train_model = DDP(model, find_unused_parameters=world.size > 2,
                              device_ids=[world.device.index] if world.device.type == "cuda" else None)
        if world.rank:
            # Every rank its own dropout stream; rank 0 keeps the single-process one.
            torch.manual_seed(args.seed * 1_000_003 + world.rank)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, args.steps // 10), args.steps))
    sampler = ResumableSampler(len(data) - args.block - 1, seed=args.seed)
    return model, train_model, opt, sched, sampler, data


def _global_loss(loss: torch.Tensor, world: World) -> tuple[float, list[float]]:
    """The mean of every rank's loss, and the ranks' losses (one value in one process)."""
    if not world.distributed:
        return loss.item(), []
    import torch.distributed as dist

    parts = [torch.zeros(1, dtype=torch.float64, device=world.device) for _ in range(world.size)]
    dist.all_gather(parts, loss.detach().to(torch.float64).reshape(1))
    per_rank = [p.item() for p in parts]
    return sum(per_rank) / world.size, per_rank


def train(args: argparse.Namespace, out=sys.stdout) -> list[tuple[int, float]]:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    world = init_world(args)
    try:
        if world.rank == 0:
            return _train(args, world, out)
        with open(os.devnull, "w") as quiet:     # rank 0 speaks for every rank
            return _train(args, world, quiet)
    finally:
        if world.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(args: argparse.Namespace, world: World, out) -> list[tuple[int, float]]:
    model, train_model, opt, sched, sampler, data = build(args, world)
    progress = {"step": -1, "epoch": 0, "samples_seen": 0}
    state = {"model": model, "optimizer": opt, "scheduler": sched, "data": sampler, "progress": progress}
    options = CheckpointManagerOptions(max_to_keep=args.keep, save_interval_steps=args.save_every,
                                       compression=None if args.compression == "none" else args.compression)
    losses: list[tuple[int, float]] = []
    ranks = ""
    if world.distributed:
        ranks = (f" | {world.size} rank(s), {'FSDP2' if args.fsdp else 'DDP'} on {world.device.type}, "
                 f"global batch {args.batch_size}")
    print(f"seed {args.seed} (init, data order, dropout) | {sum(p.numel() for p in model.parameters())} "
          f"params | checkpoints in {args.dir}{ranks}", file=out, flush=True)
    with CheckpointManager(args.dir, options) as mgr:     # collective with several ranks
        start = 0
        if args.resume:
            last = mgr.restore(state)
            if last is None:
                print("no committed checkpoint yet: starting from scratch", file=out, flush=True)
            else:
                start = last + 1
                print(f"resumed from step {last} (epoch {sampler.epoch}, sample {sampler.position})",
                      file=out, flush=True)
        elif mgr.latest_step() is not None:
            raise SystemExit(f"{args.dir} already holds checkpoints (latest step {mgr.latest_step()}); "
                             "pass --resume to continue, or choose another --dir")
        handles = []
        train_model.train()
        for step in range(start, args.steps):
            idx = torch.tensor(sampler.next_batch_for(args.batch_size, world.rank, world.size))
            x = torch.stack([data[i:i + args.block] for i in idx])
            y = torch.stack([data[i + 1:i + args.block + 1] for i in idx])
            logits = train_model(x)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            value, per_rank = _global_loss(loss, world)
            losses.append((step, value))
            progress.update(step=step, epoch=sampler.epoch, samples_seen=progress["samples_seen"] + args.batch_size)
            print(f"step {step:5d}  loss {value:.6f}  lr {sched.get_last_lr()[0]:.2e}", file=out, flush=True)
            if args.loss_log and world.rank == 0:
                record = {"step": step, "loss": value.hex()}
                if per_rank:
                    record["rank_losses"] = [v.hex() for v in per_rank]
                with open(args.loss_log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if mgr.should_save(step) or step == args.steps - 1:
                handles.append(mgr.save_async(step, state, metrics={"loss": value}, force=True))
            handles = _report(handles, out)
            if args.crash_at is not None and step == args.crash_at:
                # Deterministic for scripted demos and tests: the saves already queued
                # commit first, then the process dies as abruptly as kill -9 (every rank).
                mgr.wait_until_finished()
                _report(handles, out)
                print(f"simulating a crash at step {step} (SIGKILL)", file=out, flush=True)
                if world.distributed:
                    # No rank dies before every rank has reported: torchrun tears the others
                    # down as soon as one exits, which could cut rank 0 short of its report.
                    import torch.distributed as dist
                    dist.barrier()
                os.kill(os.getpid(), signal.SIGKILL)
        mgr.wait_until_finished()
        _report(handles, out)
        print(f"done: committed steps {mgr.all_steps()}", file=out, flush=True)
    return losses


def _report(handles, out) -> list:
    """Print one line per finished save; return those still running."""
    running = []
    for h in handles:
        if not h.done():
            running.append(h)
            continue
        r = h.result()
        if r is None:
            continue
        mb = r.raw_bytes / 1e6
        print(f"saved step {r.step}: stall {r.stall_seconds * 1e3:.1f} ms, {mb:.2f} MB "
              f"({r.stored_bytes / 1e6:.2f} MB on disk), {mb / max(r.seconds_to_commit, 1e-9):.0f} MB/s, "
              f"committed in {r.seconds_to_commit * 1e3:.0f} ms", file=out, flush=True)
    return running


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m async_ckpt.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="runs/demo", help="checkpoint directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="total training steps (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=25, help="save interval in steps (default: %(default)s)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="restore the latest committed checkpoint first")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=16,
                   help="samples per step, split across the ranks under torchrun (default: %(default)s)")
    p.add_argument("--block", type=int, default=64, help="context length in characters")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    p.add_argument("--compression", choices=["none", "zstd", "auto"], default="auto")
    p.add_argument("--loss-log", help="append exact losses (float.hex) as JSON lines to this file")
    p.add_argument("--crash-at", type=int,
                   help="after the given step, let queued saves commit, then SIGKILL this process")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard the model with FSDP2 (fully_shard) instead of wrapping "
                        "it in DDP (in one process: FSDP2 on a group of one)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"finished in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
