"""Native Writer/Reader throughput against the raw disk ceiling, measured in the same run.

    python -m benchmarks.bench_native [--size 1GiB] [--repeat 3] [--dir PATH] [--threads 4]
                                      [--chunk 64MiB]

Each repeat, interleaved (the order reverses every other repeat: this shared virtual disk
drifts by up to 2x within seconds, and whoever goes first gains):
  ceiling write   one thread, sequential 64 MiB writes of the same bytes + fsync; buffered and
                  O_DIRECT both run, the better median is the ceiling
  native raw      Writer(threads), CODEC_RAW, fsync'd
  native zstd     Writer, CODEC_ZSTD shuffle 4, on float32 data (throughput in raw bytes/s)
  native auto     Writer, CODEC_AUTO shuffle 4, same float32 data
Then, after dropping the page cache for every file (fsync + POSIX_FADV_DONTNEED, and
/proc/sys/vm/drop_caches when writable), the matching reads: ceiling (buffered and O_DIRECT
sequential reads, best median) and Reader(threads) into preallocated destinations.
Prints medians in GB/s (1e9 bytes/s) and ours/ceiling ratios.
"""

from __future__ import annotations

import argparse
import mmap
import os
import re
import shutil
import statistics
import tempfile
import time
import uuid

import numpy as np

from async_ckpt import native

SLICE = 64 << 20
ALIGN = 4096


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


def aligned_bytes(size: int) -> np.ndarray:
    """A page-aligned uint8 array (anonymous mmap), as O_DIRECT needs."""
    buf = mmap.mmap(-1, max(size, 1))
    return np.frombuffer(buf, np.uint8, count=size)


def drop_cache(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def settle(folder: str) -> None:
    """Remove earlier outputs and let the disk finish discards before the next timing."""
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.sync()
    time.sleep(0.2)


def pwrite_all(fd: int, chunk: memoryview, pos: int) -> None:
    done = 0
    while done < len(chunk):
        done += os.pwrite(fd, chunk[done:], pos + done)


def pread_all(fd: int, chunk: memoryview, pos: int) -> None:
    done = 0
    while done < len(chunk):
        got = os.preadv(fd, [chunk[done:]], pos + done)
        if got == 0:
            raise IOError("short read")
        done += got


def ceiling_write(path: str, data: np.ndarray, direct: bool) -> float:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0)
    t0 = time.perf_counter()
    fd = os.open(path, flags, 0o644)
    try:
        view = memoryview(data)
        size = len(view)
        body = size - size % ALIGN if direct else size
        for pos in range(0, body, SLICE):
            pwrite_all(fd, view[pos:min(pos + SLICE, body)], pos)
        if body < size:  # unaligned tail, buffered
            os.close(fd)
            fd = os.open(path, os.O_WRONLY)
            os.pwrite(fd, view[body:], body)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def ceiling_read(path: str, out: np.ndarray, direct: bool) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        view = memoryview(out)
        size = len(view)
        body = size - size % ALIGN if direct else size
        for pos in range(0, body, SLICE):
            pread_all(fd, view[pos:min(pos + SLICE, body)], pos)
        if body < size:
            with open(path, "rb") as f:
                f.seek(body)
                view[body:] = f.read()
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def native_write(writer, path, data, chunk, codec, shuffle=0):
    view = memoryview(data)
    jobs = [native.WriteJob(view[p:p + chunk], 0, codec, 1, shuffle) for p in range(0, len(view), chunk)]
    t0 = time.perf_counter()
    records = writer.write([path], jobs, True)
    return time.perf_counter() - t0, records


def native_read(reader, path, records, out, chunk):
    view = memoryview(out)
    jobs = [native.ReadJob(r.file, r.offset, r.length, r.raw_length, r.codec, r.shuffle, r.crc32c,
                           r.raw_crc32c, view[i * chunk:i * chunk + r.raw_length], i)
            for i, r in enumerate(records)]
    t0 = time.perf_counter()
    reader.read([path], jobs)
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="folder on the disk to measure (default: a tmp dir in cwd)")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--chunk", type=parse_size, default=parse_size("64MiB"))
    ap.add_argument("--no-codecs", action="store_true", help="skip the zstd/auto runs")
    args = ap.parse_args(argv)

    base = args.dir or os.getcwd()
    folder = tempfile.mkdtemp(prefix=".bench-native-", dir=base)
    size, chunk = args.size, args.chunk
    rng = np.random.default_rng(0)
    raw = aligned_bytes(size)
    raw[:] = rng.integers(0, 256, size, dtype=np.uint8)
    floats = np.frombuffer(rng.standard_normal(size // 4 + 1, dtype=np.float32).tobytes()[:size], np.uint8)
    out = aligned_bytes(size)
    out[:] = 0  # fault the pages in once, outside any timing
    writer, reader = native.Writer(args.threads), native.Reader(args.threads)
    print(f"size {size / 2**30:.2f} GiB, chunk {chunk >> 20} MiB, threads {args.threads}, "
          f"repeat {args.repeat}, dir {folder}, zstd {native.zstd_backend()}, "
          f"crc32c hw {native.crc32c_hardware()}")

    t = {k: [] for k in ("w_buf", "w_dir", "w_raw", "w_zstd", "w_auto",
                         "r_buf", "r_dir", "r_raw", "r_zstd", "r_auto")}
    ratio = {}
    try:
        for rep in range(args.repeat):
            settle(folder)
            flip = rep % 2 == 1  # alternate who goes first: the disk drifts within a repeat
            p = lambda name: os.path.join(folder, f"{name}-{uuid.uuid4().hex[:8]}.bin")  # noqa: E731
            cb, cd = p("ceil-buf"), p("ceil-dir")
            paths, recs = {"raw": p("raw")}, {}

            def ours_raw_write():
                dt, recs["raw"] = native_write(writer, paths["raw"], raw, chunk, native.CODEC_RAW)
                t["w_raw"].append(dt)

            writes = [lambda: t["w_buf"].append(ceiling_write(cb, raw, False)),
                      lambda: t["w_dir"].append(ceiling_write(cd, raw, True)), ours_raw_write]
            for fn in (writes[::-1] if flip else writes):
                fn()
            if not args.no_codecs:
                for name, codec in (("zstd", native.CODEC_ZSTD), ("auto", native.CODEC_AUTO)):
                    paths[name] = p(name)
                    dt, recs[name] = native_write(writer, paths[name], floats, chunk, codec, 4)
                    t["w_" + name].append(dt)
                    ratio[name] = sum(r.length for r in recs[name]) / size

            def ours_raw_read():
                t["r_raw"].append(native_read(reader, paths["raw"], recs["raw"], out, chunk))
                if not np.array_equal(out, raw):
                    raise SystemExit("native read returned different bytes")

            reads = [lambda: t["r_buf"].append(ceiling_read(cb, out, False)),
                     lambda: t["r_dir"].append(ceiling_read(cd, out, True)), ours_raw_read]
            for fn in (reads[::-1] if flip else reads):
                drop_cache([cb, cd] + list(paths.values()))
                fn()
            for name in ("zstd", "auto"):
                if name in paths:
                    drop_cache([paths[name]])
                    t["r_" + name].append(native_read(reader, paths[name], recs[name], out, chunk))
            print(f"  repeat {rep + 1}: " + ", ".join(f"{k} {size / v[-1] / 1e9:.2f}" for k, v in t.items() if v))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    gbps = {k: size / statistics.median(v) / 1e9 for k, v in t.items() if v}
    ceil_w, ceil_r = max(gbps["w_buf"], gbps["w_dir"]), max(gbps["r_buf"], gbps["r_dir"])
    print("\nmedian GB/s (raw bytes per second)")
    print(f"  ceiling write: buffered {gbps['w_buf']:.2f}, O_DIRECT {gbps['w_dir']:.2f} -> {ceil_w:.2f}")
    print(f"  ceiling read:  buffered {gbps['r_buf']:.2f}, O_DIRECT {gbps['r_dir']:.2f} -> {ceil_r:.2f}")
    # Paired view: each repeat's ours/best-ceiling, robust to the disk drifting between repeats.
    pw = statistics.median(min(t["w_buf"][i], t["w_dir"][i]) / t["w_raw"][i] for i in range(args.repeat))
    pr = statistics.median(min(t["r_buf"][i], t["r_dir"][i]) / t["r_raw"][i] for i in range(args.repeat))
    print(f"  native raw write {gbps['w_raw']:.2f}  = {gbps['w_raw'] / ceil_w:.0%} of ceiling "
          f"(median of per-repeat ratios {pw:.0%})")
    print(f"  native raw read  {gbps['r_raw']:.2f}  = {gbps['r_raw'] / ceil_r:.0%} of ceiling "
          f"(median of per-repeat ratios {pr:.0%})")
    for name in ("zstd", "auto"):
        if "w_" + name in gbps:
            print(f"  native {name} (float32, shuffle 4, stored {ratio[name]:.0%}): "
                  f"write {gbps['w_' + name]:.2f}, read {gbps['r_' + name]:.2f}")


if __name__ == "__main__":
    main()
