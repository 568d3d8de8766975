"""What fresh memory costs on this machine: small pages, huge pages, a collapse onto huge
pages and a cold read through the page cache, each right after memory was freed and again
after the machine sat idle a while.

    python tools/fresh_memory_cost.py [--mib 512] [--idle 5] [--dir PATH]

Under a hypervisor with free page reporting (a virtio balloon that reports free 2 MiB blocks,
as on the dev VM), the host drops the memory of blocks freed a couple of seconds ago, and a
huge page taken from one waits for the host to back it again; the figures after ``--idle``
seconds show that. The page cache's large folios come from the same blocks, so a cold read
pays it too; the last row faults in huge pages (``benchmarks._ceilings.back_free_memory``,
what the benchmarks do before each timing) after the pause and before the read. On bare
metal the columns should match. The /proc/vmstat compaction counter is printed so a slow
figure can be told apart from the kernel compacting memory.
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from async_ckpt import native  # noqa: E402
from benchmarks._ceilings import back_free_memory, fault_in  # noqa: E402

PAGE = 4096


def _compact_stalls() -> int:
    with open("/proc/vmstat") as f:
        counters = dict(line.split() for line in f)
    return int(counters.get("compact_stall", -1))


def _collapse(nbytes: int, idle: float) -> float:
    """Seconds for MADV_COLLAPSE of ``nbytes`` on small pages, ``idle`` seconds after faulting them."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(m, dtype=np.uint8)
    a[::PAGE] = 1
    time.sleep(idle)
    t = time.perf_counter()
    native.collapse_huge_pages(a)
    t = time.perf_counter() - t
    del a
    m.close()
    return t


def _cold_read(path: str, nbytes: int, out: np.ndarray, idle: float, back: bool) -> float:
    """Seconds to read ``path`` after its pages left the page cache ``idle`` seconds ago."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        time.sleep(idle)
        if back:
            back_free_memory(nbytes)
        view, done = memoryview(out), 0
        t = time.perf_counter()
        while done < nbytes:
            done += os.preadv(fd, [view[done:done + (64 << 20)]], done)
        return time.perf_counter() - t
    finally:
        os.close(fd)


def _read_rows(nbytes: int, idle: float, repeat: int, folder: str | None) -> list[tuple[str, float, float]]:
    out = np.ones(nbytes, dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="fresh-memory-", dir=folder) as d:
        path = os.path.join(d, "data")
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes())
            os.fsync(f.fileno())
        rows = []
        for _ in range(repeat):
            rows.append(("cold read", _cold_read(path, nbytes, out, 0.0, False),
                         _cold_read(path, nbytes, out, idle, False)))
            rows.append(("  backed", _cold_read(path, nbytes, out, 0.0, True),
                         _cold_read(path, nbytes, out, idle, True)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/fresh_memory_cost.py")
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--idle", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where the read's file goes (default: the temp dir)")
    args = ap.parse_args(argv)
    nbytes = args.mib << 20
    stalls = _compact_stalls()
    rows = []
    for what, run in (("small pages", lambda: fault_in(nbytes, huge=False)),
                      ("huge pages", lambda: fault_in(nbytes, huge=True))):
        for _ in range(args.repeat):
            run()                   # frees the memory the next, timed, call takes at once
            at_once = run()
            time.sleep(args.idle)
            rows.append((what, at_once, run()))
    if native.huge_page_size() > 0:
        for _ in range(args.repeat):
            rows.append(("collapse", _collapse(nbytes, 0.0), _collapse(nbytes, args.idle)))
    rows += _read_rows(nbytes, args.idle, args.repeat, args.dir)
    print(f"{args.mib} MiB of new memory: at once after a free | after {args.idle:g} s idle")
    for what, fast, idle in rows:
        print(f"  {what:12s} {1e3 * fast:8.0f} ms | {1e3 * idle:8.0f} ms")
    print(f"compact_stall in /proc/vmstat rose by {_compact_stalls() - stalls}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
