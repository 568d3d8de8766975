"""Ceilings measured on the same machine, the same disk and the same bytes as every contender.

- snapshot floor: copy each tensor of the state into a preallocated (pre-faulted) buffer,
- raw write: sequential write of ``nbytes`` + fsync, buffered, O_DIRECT one thread
  (benchmarks/bench_native.py's ``ceiling_write``), O_DIRECT on several threads, and O_DIRECT
  from a buffer on transparent huge pages (as our staging buffers are once collapsed: a
  block request then carries more memory per segment); best wins,
- raw read: the file read back after the page cache is dropped, buffered, O_DIRECT, and
  buffered into a buffer on huge pages; best wins.

The single-file helpers (aligned buffers, cache dropping, one-thread write/read) are
imported from ``benchmarks.bench_native``; only what it lacks lives here.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from async_ckpt import native

from benchmarks.bench_native import ALIGN, aligned_bytes, ceiling_read, ceiling_write, drop_cache

SLICE = 8 << 20


def files_under(path: Path) -> list[str]:
    path = Path(path)
    if path.is_file():
        return [str(path)]
    return [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]


_libc = None


def syncfs(path: Path) -> None:
    """syncfs(2) on the file system holding ``path``: every dirty page, inode and directory."""
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            import ctypes
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


MANY_FILES = 16


def fsync_tree(path: Path) -> None:
    """Make every file and directory under ``path`` durable.

    Up to MANY_FILES files: fsync each file and directory. More (tensorstore's one folder
    per array, DCP with many tensors): one syncfs(2), which is far cheaper than thousands of
    fsyncs, so a many-file peer is not charged for a loop a careful user would not write.
    """
    path = Path(path)
    if path.is_dir() and sum(len(f) for _, _, f in os.walk(path)) > MANY_FILES:
        syncfs(path)
        return
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        path = path.parent
    for d, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


PROC_DROP = True     # also write /proc/sys/vm/drop_caches (--quick turns it off: slow, and CI needs none)


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


MADV_HUGEPAGE = 14
BACKING_MARGIN = 64 << 20


def fault_in(nbytes: int, huge: bool) -> float:
    """Map ``nbytes`` of new anonymous memory (asking for transparent huge pages when
    ``huge``, where the kernel has them), write one byte per 4 KiB page, unmap it; returns
    the seconds the writes took."""
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        if huge:
            try:
                m.madvise(MADV_HUGEPAGE)
            except OSError:
                pass                        # no transparent huge pages: small ones are backed too
        pages = np.frombuffer(m, dtype=np.uint8)
        t0 = time.perf_counter()
        pages[::4096] = 1
        seconds = time.perf_counter() - t0
        del pages
    finally:
        m.close()
    return seconds


def back_free_memory(nbytes: int) -> None:
    """Fault in and free ``nbytes`` (plus a margin) of anonymous memory on huge pages, so that
    what the next timing allocates (a read's page cache, a buffered write's) is memory the
    hypervisor has backed.

    Why: a hypervisor with free page reporting (the dev VM's virtio balloon) takes back the
    memory of 2 MiB blocks that stayed free for about 2 s, and the page cache's large folios
    come from such blocks. A cold read of 512 MiB took 158-161 ms right after its pages left
    the page cache and 764-891 ms when 5 s passed in between; this call after the pause
    brought it back to 161-164 ms (``python tools/fresh_memory_cost.py``). Without it,
    whichever row followed a pause paid the host's work. Memory that stays backed (bare
    metal) only costs the touch."""
    fault_in(nbytes + BACKING_MARGIN, huge=True)


def drop_caches(paths: Iterable[str]) -> None:
    """Evict ``paths`` from the page cache: make them durable (fsync each, or one syncfs for
    many files), POSIX_FADV_DONTNEED each, then /proc/sys/vm/drop_caches when PROC_DROP
    (``bench_native.drop_cache`` for few files). First, one ``sync``: the deletions and
    writes of earlier rows (journal commits, discards) must not land inside a timed read.
    Last, :func:`back_free_memory` for the files' size: the read's page cache comes from
    memory the hypervisor has backed."""
    paths = list(paths)
    if not paths:
        return
    os.sync()
    _evict(paths)
    back_free_memory(sum(os.path.getsize(p) for p in paths))


def _evict(paths: list[str]) -> None:
    if PROC_DROP and len(paths) <= MANY_FILES:
        drop_cache(paths)
        return
    many = len(paths) > MANY_FILES
    if many:
        syncfs(Path(paths[0]).parent)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            if not many:
                os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if PROC_DROP:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


class MemcpyFloor:
    """Copy every tensor into its slot of one preallocated, pre-faulted host buffer."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = [t.detach() for t in tensors]
        offsets, cursor = [], 0
        for t in self.tensors:
            cursor = -(-cursor // 16) * 16
            offsets.append(cursor)
            cursor += t.numel() * t.element_size()
        self.buffer = torch.ones(max(cursor, 1), dtype=torch.uint8)   # touch every page now
        self.slots = [self.buffer[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                      for o, t in zip(offsets, self.tensors)]

    def run(self) -> float:
        t0 = time.perf_counter()
        for dst, src in zip(self.slots, self.tensors):
            dst.copy_(src)
        return time.perf_counter() - t0


def ceiling_write_parallel(path: str, data: np.ndarray, threads: int) -> float:
    """O_DIRECT sequential slices of ``data`` on ``threads`` threads (GIL released in pwrite), fsync."""
    size = len(data) - len(data) % ALIGN
    view = memoryview(data)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    cursor = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            while True:
                with lock:
                    pos = cursor[0]
                    cursor[0] += SLICE
                if pos >= size:
                    return
                chunk = view[pos:min(pos + SLICE, size)]
                done = 0
                while done < len(chunk):
                    done += os.pwrite(fd, chunk[done:], pos + done)
        except BaseException as e:   # surfaced below
            errors.append(e)

    try:
        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        if errors:
            raise errors[0]
        if size < len(data):
            os.close(fd)
            fd = os.open(path, os.O_WRONLY)
            os.pwrite(fd, view[size:], size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


class DiskCeilings:
    """Raw write and read of ``nbytes`` in ``folder``; each call returns {variant: seconds}."""

    def __init__(self, nbytes: int, folder: Path, threads: int) -> None:
        self.data = aligned_bytes(nbytes)
        self.data[:] = np.random.default_rng(5).integers(0, 256, nbytes, dtype=np.uint8)
        self.out = aligned_bytes(nbytes)
        self.out[:] = 0
        # The same bytes and destination on transparent huge pages, where the kernel has them.
        self.data_huge, self.out_huge = aligned_bytes(nbytes), aligned_bytes(nbytes)
        self.data_huge[:] = self.data
        self.out_huge[:] = 0
        for buf in (self.data_huge, self.out_huge):
            native.collapse_huge_pages(buf)
        self.folder = Path(folder)
        self.threads = threads

    def write_read(self) -> dict[str, float]:
        self.folder.mkdir(parents=True, exist_ok=True)
        res: dict[str, float] = {}
        paths = {}
        for variant in ("buffered", "direct", "direct_mt", "direct_huge"):
            p = str(self.folder / f"raw-{variant}")
            if os.path.exists(p):
                os.remove(p)
            os.sync()
            if variant == "direct_mt":
                res[f"write_{variant}"] = ceiling_write_parallel(p, self.data, self.threads)
            elif variant == "direct_huge":
                res[f"write_{variant}"] = ceiling_write(p, self.data_huge, True)
            else:
                res[f"write_{variant}"] = ceiling_write(p, self.data, variant == "direct")
            paths[variant] = p
        for variant, direct, out in (("buffered", False, self.out), ("direct", True, self.out),
                                     ("buffered_huge", False, self.out_huge)):
            drop_caches(paths.values())
            res[f"read_{variant}"] = ceiling_read(paths["buffered"], out, direct)
        for p in paths.values():
            os.remove(p)
        return res
