"""GPU snapshot stall: 4 GiB of bf16 + fp32 CUDA state, in one run, interleaved.

    python -m benchmarks.bench_gpu [--gib 4] [--repeat 5] [--dir PATH]

Rows: the pinned device-to-host copy floor (the same bytes, side stream, preallocated
pinned buffer); ``save_async`` stall, eager and lazy, and time to committed, with chunk
checksums on the GPU (default) and on the host (``ASYNC_CKPT_DEVICE_CRC=0``); the next
optimizer step after a lazy save against a plain step; DCP ``async_save`` with its pinned
stager (blocking part and total); ``torch.save`` (GPU tensors, blocking); the crc32c kernel
over the whole state against one host thread over the same bytes in pinned memory. Prints
one markdown table and the device name. Exits 2 with a message where CUDA is unavailable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import os

import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions, native
from async_ckpt.pipeline import device_crc

TENSOR_BYTES = 128 << 20


def make_state(gib: float):
    n = max(2, int(gib * (1 << 30)) // TENSOR_BYTES)
    bf16 = [torch.randn(TENSOR_BYTES // 2, device="cuda").to(torch.bfloat16) for _ in range(n // 4)]
    fp32 = [torch.nn.Parameter(torch.randn(TENSOR_BYTES // 4, device="cuda")) for _ in range(n - n // 4)]
    opt = torch.optim.SGD(fp32, lr=1e-3)
    for p in fp32:
        p.grad = torch.full_like(p, 1e-3)
    state = {"model": {f"w{i}": t for i, t in enumerate(bf16)} | {f"p{i}": p for i, p in enumerate(fp32)},
             "optimizer": opt}
    return state, opt, bf16 + list(fp32)


def d2h_floor(tensors, pinned: torch.Tensor) -> float:
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    stream.wait_stream(torch.cuda.current_stream())
    off = 0
    with torch.cuda.stream(stream):
        for t in tensors:
            n = t.numel() * t.element_size()
            pinned[off:off + n].view(t.dtype).copy_(t.detach().view(-1), non_blocking=True)
            off += n
    stream.synchronize()
    return time.perf_counter() - t0


def crc_kernel(tensors) -> float:
    """The checksum kernel alone over every tensor (one chunk each), timed on its stream."""
    rows = [(t.data_ptr(), t.numel() * t.element_size(), 0, k) for k, t in enumerate(tensors)]
    lens = [r[1] for r in rows]
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    device_crc.launch(device_crc.pieces_array(rows), lens, stream, torch.cuda.current_device())
    stream.synchronize()
    return time.perf_counter() - t0


def host_crc(pinned: torch.Tensor) -> float:
    t0 = time.perf_counter()
    native.crc32c(pinned.numpy())
    return time.perf_counter() - t0


def timed_step(opt) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=4.0)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default=None, help="scratch folder (default: a new temp folder)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(dir=args.dir))
    state, opt, tensors = make_state(args.gib)
    total = sum(t.numel() * t.element_size() for t in tensors)
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    rows: dict[str, list[float]] = {}
    managers = {mode: CheckpointManager(root / mode, CheckpointManagerOptions(
        snapshot=mode, compression=None, max_to_keep=1)) for mode in ("eager", "lazy")}
    managers["eager, host checksums"] = CheckpointManager(root / "eager_host_crc", CheckpointManagerOptions(
        snapshot="eager", compression=None, max_to_keep=1))
    for m in managers.values():
        m.save(0, state)                       # allocate the pinned pool once, untimed
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    stager = DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
                                          use_async_staging=False, use_non_blocking_copy=True))
    device_crcs = device_crc.available(torch.cuda.current_device())
    print(f"device checksums: {'on' if device_crcs else 'off (' + str(device_crc.load()) + ')'}")
    step = 1
    for rep in range(args.repeat):
        rows.setdefault("pinned D2H copy floor", []).append(d2h_floor(tensors, pinned))
        rows.setdefault("plain optimizer step", []).append(timed_step(opt))
        if device_crcs:
            rows.setdefault("crc32c kernel over the state", []).append(crc_kernel(tensors))
        rows.setdefault("host crc32c over the state (1 thread, pinned)", []).append(host_crc(pinned))
        for mode, mgr in managers.items():
            os.environ[device_crc.ENV] = "0" if "host" in mode else "1"
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            handle = mgr.save_async(step, state)
            rows.setdefault(f"ours save_async stall ({mode})", []).append(time.perf_counter() - t0)
            rows.setdefault(f"optimizer step right after save_async ({mode})", []).append(timed_step(opt))
            result = handle.result()
            rows.setdefault(f"ours save_async to committed ({mode})", []).append(result.seconds_to_commit)
            step += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            future = dcp.async_save(state["model"], checkpoint_id=str(root / f"dcp{rep}"),
                                    async_stager=stager, no_dist=True)
            rows.setdefault("DCP async_save blocking (pinned stager)", []).append(time.perf_counter() - t0)
            (future.result() if hasattr(future, "result") else future.upload_completion.result())
            rows.setdefault("DCP async_save total", []).append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.save(state["model"], root / f"torch{rep}.pt")
        rows.setdefault("torch.save (blocking)", []).append(time.perf_counter() - t0)
    for m in managers.values():
        m.close()
    floor = statistics.median(rows["pinned D2H copy floor"])
    print(f"device: {torch.cuda.get_device_name()} | state {total / (1 << 30):.2f} GiB "
          f"(bf16 + fp32) | median of {args.repeat}\n")
    print("| row | ms | x D2H floor |\n| --- | ---: | ---: |")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"| {name} | {med * 1e3:.1f} | {med / floor:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
