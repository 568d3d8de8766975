"""Storage backends: write a snapshot's chunks into a directory, read chunks back.

IO sees only (file, offset, bytes): the plan decides what goes where, the backend
decides how bytes reach the disk. Call sequence:

1. The manager's training thread calls ``staging_gate()`` when a save starts; a backend
   that returns a gate can write chunks while the snapshot copy is still filling the
   staging buffer (the copy opens the gate chunk by chunk).
2. The manager's background thread calls ``write(directory, rank, snapshot)`` once per
   save, possibly before the snapshot copy has completed; a backend without a gate must
   ``snapshot.wait()`` before reading the buffer. It returns the files and chunk records
   the manifest needs. On error the caller removes ``directory``. ``snapshot.reuse`` may
   name the frozen-parameter file of the last commit (:class:`FrozenFile`, from
   ``reuse_candidate``); a backend may hard-link it instead of writing the same bytes
   again, or ignore it.
3. ``restore``/``load``/``verify`` call ``read(directory, manifest, requests)`` on the
   caller's thread; each request is (chunk index, destination or None to check only).
"""

from __future__ import annotations

import abc
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import device_crc, faults
from .layout import ChunkEntry, FileEntry, Manifest, data_file_name
from .snapshot import Snapshot

ReadRequest = tuple[int, Optional[memoryview]]


@dataclass(frozen=True)
class FrozenFile:
    """A committed data file holding only the plan's frozen-parameter chunks, in order.

    ``signature`` is the plan's ``frozen_signature`` when it was written (memory address,
    version counter and size of every frozen parameter): a later save may reuse the file
    only when its own signature is the same *and* every chunk's crc32c and length match.
    """

    path: Path
    size: int
    chunks: tuple[ChunkEntry, ...]
    signature: tuple
    shared_by: int = 1          # committed steps holding this very file (the manager counts)

    def matches(self, lengths: Sequence[int], crcs: Sequence[int]) -> bool:
        """Every chunk has the same length and crc32c (the signature is checked by ``write``)."""
        return len(lengths) == len(self.chunks) and all(
            c.raw_length == n and c.raw_crc32c == crc for c, n, crc in zip(self.chunks, lengths, crcs))


class Storage(abc.ABC):
    def staging_gate(self):
        """A gate object the snapshot copy opens chunk by chunk, or None (write after the copy)."""
        return None

    @abc.abstractmethod
    def write(self, directory: Path, rank: int, snapshot: Snapshot) -> tuple[list[FileEntry], list[ChunkEntry]]:
        """Write every planned chunk; return file entries and one chunk record per planned chunk."""

    def reuse_candidate(self, step_dir: Path, files: Sequence[FileEntry], chunks: Sequence[ChunkEntry],
                        plan) -> Optional[FrozenFile]:
        """After a commit: the file a later save may reuse (``snapshot.reuse``), or None."""
        return None

    @abc.abstractmethod
    def read(self, directory: Path, manifest: Manifest, requests: Sequence[ReadRequest],
             collect_errors: bool = False) -> list[Optional[str]]:
        """Check and decode each requested chunk into its destination."""


_CODEC_NAMES = {0: "raw", 1: "zstd"}


class NativeStorage(Storage):
    """The default backend: the compiled writer/reader (parallel pwrite/pread, crc32c, zstd)."""

    def __init__(self, io_threads: int = 4, compression: Optional[str] = "auto", level: int = 1,
                 fsync: bool = True) -> None:
        from . import native  # loads the extension and zstd lazily
        self._native = native
        self._codec = {None: native.CODEC_RAW, "zstd": native.CODEC_ZSTD,
                       "auto": native.CODEC_AUTO}[compression]
        self._level = level
        self._fsync = fsync
        self._writer = native.Writer(io_threads)
        self._reader = native.Reader(io_threads)

    def staging_gate(self):
        return self._native.Gate()

    def write(self, directory: Path, rank: int, snapshot: Snapshot) -> tuple[list[FileEntry], list[ChunkEntry]]:
        """Chunks before the plan's first frozen chunk go to ``data-r<rank>-0.bin``; a frozen
        tail goes to ``data-r<rank>-1.bin``, hard-linked from the last commit when unchanged."""
        native = self._native
        if snapshot.gate is None:
            snapshot.wait()
        plan = snapshot.plan
        split = plan.first_frozen_chunk
        reuse = snapshot.reuse if split < len(plan.chunks) else None
        if reuse is not None and reuse.signature != plan.frozen_signature:
            reuse = None
        names = [data_file_name(rank, 0), data_file_name(rank, 1)][:1 + (split < len(plan.chunks))]
        paths = [str(Path(directory) / n) for n in names]
        # Without a reuse candidate both files are written in one parallel pass; with one,
        # the frozen file waits until its bytes are staged and checksummed.
        upto = split if reuse is not None else len(plan.chunks)
        view = snapshot.view()
        jobs = [native.WriteJob(view[c.start:c.start + c.length], int(k >= split), self._codec, self._level,
                                c.shuffle)
                for k, c in enumerate(plan.chunks[:upto])]
        stop_watch = faults.watch_file("mid_write", paths[0])   # None unless a test armed it
        try:
            # The device checksums (and their flags) are filled in before the gate releases
            # their chunks; the writer reads each pair only after that.
            records = self._writer.write(paths[:1 + (upto > split)], jobs, self._fsync, snapshot.gate,
                                         snapshot.known_crcs[:upto], snapshot.crc_known[:upto].view(np.uint8),
                                         device_crc.mode() == "check")
        finally:
            if stop_watch is not None:
                stop_watch()
        chunks = [ChunkEntry(r.file, r.offset, r.length, r.raw_length, _CODEC_NAMES[r.codec],
                             r.shuffle, r.crc32c, r.raw_crc32c) for r in records]
        if reuse is not None:
            chunks += self._write_or_link_frozen(snapshot, paths[1], reuse)
        # The manifest records real sizes, padding included, so verify can compare them.
        return [FileEntry(n, os.path.getsize(p), rank) for n, p in zip(names, paths)], chunks

    def reuse_candidate(self, step_dir: Path, files: Sequence[FileEntry], chunks: Sequence[ChunkEntry],
                        plan) -> Optional[FrozenFile]:
        if plan.first_frozen_chunk >= len(plan.chunks) or len(files) != 2:
            return None
        return FrozenFile(Path(step_dir) / files[1].path, files[1].size,
                          tuple(c for c in chunks if c.file == 1), plan.frozen_signature)

    def _write_or_link_frozen(self, snapshot: Snapshot, path: str, reuse: FrozenFile) -> list[ChunkEntry]:
        """The frozen tail: hard-link ``reuse`` when every chunk is unchanged, else write it."""
        native = self._native
        snapshot.wait()
        plan, split, view = snapshot.plan, snapshot.plan.first_frozen_chunk, snapshot.view()
        frozen = plan.chunks[split:]
        crcs = snapshot.known_crcs[split:].copy()
        missing = [k for k in range(len(frozen)) if not snapshot.crc_known[split + k]]
        if missing:      # the host pass, on io_threads (crc32c releases the GIL)
            with ThreadPoolExecutor(min(len(missing), self._writer.threads)) as pool:
                crcs[missing] = list(pool.map(
                    lambda k: native.crc32c(view[frozen[k].start:frozen[k].start + frozen[k].length]), missing))
        if reuse.matches([c.length for c in frozen], crcs.tolist()):
            try:
                if not stat.S_ISREG(os.lstat(reuse.path).st_mode):
                    raise FileNotFoundError(reuse.path)
                os.link(reuse.path, path, follow_symlinks=False)
                if os.path.getsize(path) == reuse.size:
                    return [replace(c, file=1) for c in reuse.chunks]
                os.unlink(path)
            except OSError:
                # Gone (deleted, quarantined), another file system, no hard links: write it.
                if os.path.lexists(path):
                    os.unlink(path)
        jobs = [native.WriteJob(view[c.start:c.start + c.length], 0, self._codec, self._level, c.shuffle)
                for c in frozen]
        records = self._writer.write([path], jobs, self._fsync, None, crcs, np.ones(len(frozen), np.uint8),
                                     device_crc.mode() == "check")
        return [ChunkEntry(1, r.offset, r.length, r.raw_length, _CODEC_NAMES[r.codec], r.shuffle, r.crc32c,
                           r.raw_crc32c) for r in records]

    def read(self, directory: Path, manifest: Manifest, requests: Sequence[ReadRequest],
             collect_errors: bool = False) -> list[Optional[str]]:
        native = self._native
        paths = [str(Path(directory) / f.path) for f in manifest.files]
        jobs = []
        for index, dst in requests:
            c = manifest.chunks[index]
            codec = native.CODEC_RAW if c.codec == "raw" else native.CODEC_ZSTD
            jobs.append(native.ReadJob(c.file, c.offset, c.length, c.raw_length, codec, c.shuffle,
                                       c.crc32c, c.raw_crc32c, dst, index))
        return self._reader.read(paths, jobs, collect_errors)
