"""verify throughput against the raw disk read of the same files, measured in the same run.

    python -m benchmarks.bench_verify [--size 1GiB] [--repeat 3] [--dir PATH] [--threads N]
                                      [--data randn|random|zeros]

Writes one committed step of ``--size`` bytes of float32 tensors with write_checkpoint (the
manager's default compression, "auto"), then, each repeat:
  raw     page cache dropped for every data file (fsync + POSIX_FADV_DONTNEED), then the
          best of three reads of every data file: buffered sequential, O_DIRECT sequential,
          and buffered 16 MiB preads from as many threads as verify uses (the ceiling)
  verify  page cache dropped the same way, then verify.check_step (commit marker, manifest,
          file sizes, every chunk's crc32c and zstd decode) through the native reader
Prints medians in GB/s (1e9 bytes/s) of *stored* bytes and the verify/raw ratio (bar: >= 80 %).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from async_ckpt.format.manifest import parse_manifest_bytes
from async_ckpt.format.names import MANIFEST_NAME
from async_ckpt.tools import verify
from async_ckpt.pipeline.saving import write_checkpoint
from benchmarks.bench_native import aligned_bytes, ceiling_read, drop_cache, parse_size, pread_all


def parallel_read(path: str, out: np.ndarray, threads: int, slice_bytes: int = 16 << 20) -> float:
    """Buffered preads of ``slice_bytes`` from ``threads`` threads (the GIL is released in preadv)."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    view = memoryview(out)

    def read(pos: int) -> None:
        pread_all(fd, view[pos:pos + slice_bytes], pos)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, range(0, len(view), slice_bytes)))
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def make_state(size: int, data: str, tensors: int = 64) -> dict:
    gen = torch.Generator().manual_seed(0)
    per = max(1, size // tensors // 4)
    if data == "randn":
        model = {f"layer{i}.weight": torch.randn(per, generator=gen) for i in range(tensors)}
    elif data == "random":
        model = {f"layer{i}.weight": torch.randint(0, 256, (per * 4,), dtype=torch.uint8, generator=gen)
                 for i in range(tensors)}
    else:
        model = {f"layer{i}.weight": torch.zeros(per) for i in range(tensors)}
    return {"model": model, "progress": {"step": 1}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir under the CWD)")
    ap.add_argument("--threads", type=int, default=None, help="verify reader threads (default: auto)")
    ap.add_argument("--data", choices=("randn", "random", "zeros"), default="randn")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench_verify-", dir=args.dir or os.getcwd()))
    try:
        t0 = time.perf_counter()
        step_dir = write_checkpoint(root, 1, make_state(args.size, args.data))
        write_s = time.perf_counter() - t0
        manifest = parse_manifest_bytes((step_dir / MANIFEST_NAME).read_bytes())
        files = [str(step_dir / f.path) for f in manifest.files]
        stored = sum(f.size for f in manifest.files)
        raw_total = sum(c.raw_length for c in manifest.chunks)
        codecs = sorted({c.codec for c in manifest.chunks})
        print(f"checkpoint: {raw_total / 1e9:.3f} GB raw, {stored / 1e9:.3f} GB stored in {len(files)} file(s), "
              f"{len(manifest.chunks)} chunks ({', '.join(codecs)}), written in {write_s:.2f} s; "
              f"verify threads {args.threads or verify.default_threads()}")
        threads = args.threads or verify.default_threads()
        bufs = [aligned_bytes(os.path.getsize(p)) for p in files]
        raw_s, ver_s = [], []
        for r in range(args.repeat):
            best = None
            for how in ("buffered", "direct", "parallel"):
                drop_cache(files)
                try:
                    if how == "parallel":
                        t = sum(parallel_read(p, b, threads) for p, b in zip(files, bufs))
                    else:
                        t = sum(ceiling_read(p, b, how == "direct") for p, b in zip(files, bufs))
                except OSError:      # O_DIRECT unsupported on this file system
                    continue
                best = t if best is None else min(best, t)
            raw_s.append(best)
            drop_cache(files)
            t0 = time.perf_counter()
            rep = verify.check_step(step_dir, threads=args.threads, show_progress=False)
            ver_s.append(time.perf_counter() - t0)
            assert rep.verdict == verify.COMPLETE or rep.verdict == verify.PARTIAL, rep.verdict
            assert rep.bytes_checked == sum(c.length for c in manifest.chunks)
            print(f"  repeat {r + 1}: raw {stored / raw_s[-1] / 1e9:.2f} GB/s, "
                  f"verify {stored / ver_s[-1] / 1e9:.2f} GB/s")
        raw = stored / statistics.median(raw_s) / 1e9
        ver = stored / statistics.median(ver_s) / 1e9
        print(f"raw disk read (median): {raw:.2f} GB/s")
        print(f"verify (median):        {ver:.2f} GB/s  ({raw_total / statistics.median(ver_s) / 1e9:.2f} GB/s "
              "of decoded bytes)")
        ratios = [r_s / v_s for r_s, v_s in zip(raw_s, ver_s)]
        print(f"verify / raw:           {ver / raw * 100:.0f} % of medians, {statistics.median(ratios) * 100:.0f} % "
              f"median of per-repeat ratios  (bar: >= 80 %)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
