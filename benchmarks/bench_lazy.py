"""Stall of save_async, eager vs lazy, on a 1 GiB model + optimizer state, against the
memcpy floor of the same bytes, all in one run.

    python -m benchmarks.bench_lazy [--repeat 5] [--dir PATH]

Lazy mode returns once the copies are queued; the next optimizer.step() waits for them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default=None, help="scratch folder (default: a new temp folder)")
    args = p.parse_args()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16 << 20)) for _ in range(8)]     # 512 MiB
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for q in params:
        q.grad = torch.ones_like(q)
    opt.step()                                                                  # + 512 MiB momentum
    state = {"model": {f"p{i}": q for i, q in enumerate(params)}, "optimizer": opt}
    root = tempfile.mkdtemp(dir=args.dir)
    results = {}
    for mode in ("lazy", "eager"):
        stalls, steps = [], []
        o = CheckpointManagerOptions(snapshot=mode, compression=None, max_to_keep=1)
        with CheckpointManager(f"{root}/{mode}", o) as mgr:
            for step in range(args.repeat + 1):            # the first save allocates the pool
                t0 = time.perf_counter()
                handle = mgr.save_async(step, state)
                stalls.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                opt.step()                                 # fenced in lazy mode
                steps.append(time.perf_counter() - t0)
                handle.result()
        results[mode] = (statistics.median(stalls[1:]), statistics.median(steps[1:]))
    buf = torch.empty(1 << 30, dtype=torch.uint8)
    sources = list(params) + [opt.state[q]["momentum_buffer"] for q in params]
    floor = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        off = 0
        for x in sources:
            n = x.numel() * 4
            buf[off:off + n].view(torch.float32).copy_(x.detach())
            off += n
        floor.append(time.perf_counter() - t0)
    memcpy = statistics.median(floor)
    print(f"memcpy floor (1 GiB): {memcpy * 1e3:.1f} ms")
    for mode, (stall, step) in results.items():
        print(f"{mode:5s}: save_async stall {stall * 1e3:8.2f} ms ({stall / memcpy:.2f}x memcpy), "
              f"next optimizer.step {step * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
