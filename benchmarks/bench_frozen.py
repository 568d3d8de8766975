"""Frozen-backbone fine-tuning: save_async to committed with the frozen file hard-linked
(``reuse_frozen=True``) against writing every byte (``reuse_frozen=False``), interleaved in
one run, plus the raw write of the trainable bytes alone as the floor.

    python -m benchmarks.bench_frozen [--frozen-gib 1] [--trainable-mib 64] [--repeat 5]
                                      [--snapshot eager|lazy] [--dir PATH]

The state: a frozen fp32 backbone, a trainable fp32 head with AdamW (2 moments). Each
repeat takes one AdamW step, then saves with both managers (order alternating). The reuse
manager pays one crc32c pass over the frozen bytes per save (to prove they are unchanged)
and writes only the head and its optimizer state, except every ``frozen_max_shared``-th
save (default 4), which writes the frozen file afresh: the mean shows that amortised cost.
With ``--snapshot lazy`` the reuse manager also copies the frozen parameters in the
background (behind the optimizer fence), so its stall drops by their copy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions, native


def make_state(frozen_gib: float, trainable_mib: float):
    torch.manual_seed(0)
    width = 4096
    rows = int(frozen_gib * (1 << 30)) // (4 * width)
    backbone = torch.nn.Linear(width, rows // 1, bias=False)
    backbone.weight.requires_grad_(False)
    head_rows = max(1, int(trainable_mib * (1 << 20)) // (4 * width))
    head = torch.nn.Linear(width, head_rows, bias=False)
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    return model, opt


def step(model, opt) -> None:
    for p in model["head"].parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()


def raw_write_seconds(nbytes: int, root: str) -> float:
    buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).numpy()
    view = memoryview(buf)
    jobs = [native.WriteJob(view[i:i + (32 << 20)], 0) for i in range(0, nbytes, 32 << 20)]
    path = f"{root}/raw-{time.monotonic_ns()}.bin"
    t0 = time.perf_counter()
    native.Writer(4).write([path], jobs, True)
    took = time.perf_counter() - t0
    import os
    os.remove(path)
    return took


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frozen-gib", type=float, default=1.0)
    p.add_argument("--trainable-mib", type=float, default=64.0)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--snapshot", choices=("eager", "lazy"), default="eager")
    p.add_argument("--dir", default=None, help="scratch folder (default: a new temp folder)")
    args = p.parse_args()
    model, opt = make_state(args.frozen_gib, args.trainable_mib)
    step(model, opt)
    root = tempfile.mkdtemp(dir=args.dir)
    state = {"model": model, "optimizer": opt}
    managers = {reuse: CheckpointManager(f"{root}/{reuse}", CheckpointManagerOptions(
        compression=None, max_to_keep=2, reuse_frozen=reuse, snapshot=args.snapshot))
        for reuse in (True, False)}
    for m in managers.values():
        m.save(0, state)                       # pool allocation and the first frozen write
    commit = {True: [], False: []}
    stall = {True: [], False: []}
    linked = []
    trainable = sum(t.numel() * t.element_size() for t in model["head"].parameters()) * 3
    floor = []
    for rep in range(1, args.repeat + 1):
        step(model, opt)
        for reuse in ((True, False) if rep % 2 else (False, True)):
            result = managers[reuse].save_async(rep, state).result()
            commit[reuse].append(result.seconds_to_commit)
            stall[reuse].append(result.stall_seconds)
            if reuse:
                linked.append(result.linked_bytes)
        floor.append(raw_write_seconds(trainable, root))
    for m in managers.values():
        m.close()
    med = {k: statistics.median(v) for k, v in commit.items()}
    mean = {k: statistics.fmean(v) for k, v in commit.items()}
    frozen = model["backbone"].weight.numel() * 4
    print(f"snapshot={args.snapshot}; frozen {frozen / (1 << 30):.2f} GiB, trainable+AdamW {trainable / (1 << 20):.0f} MiB, "
          f"median of {args.repeat}; linked per save: {statistics.median(linked) / (1 << 30):.2f} GiB\n")
    print("| row | ms |\n| --- | ---: |")
    print(f"| save_async to committed, reuse_frozen=True: median / mean | {med[True] * 1e3:.0f} / "
          f"{mean[True] * 1e3:.0f} |")
    print(f"| save_async to committed, reuse_frozen=False: median / mean | {med[False] * 1e3:.0f} / "
          f"{mean[False] * 1e3:.0f} |")
    print(f"| raw write of the trainable bytes only (floor) | {statistics.median(floor) * 1e3:.0f} |")
    print(f"| stall, reuse on / off | {statistics.median(stall[True]) * 1e3:.0f} / "
          f"{statistics.median(stall[False]) * 1e3:.0f} |")
    print(f"\nspeed-up to committed: {med[False] / med[True]:.2f}x median, {mean[False] / mean[True]:.2f}x mean")


if __name__ == "__main__":
    main()
