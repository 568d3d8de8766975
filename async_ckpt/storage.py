"""Storage backends: write a snapshot's chunks into a directory, read chunks back.

IO sees only (file, offset, bytes): the plan decides what goes where, the backend
decides how bytes reach the disk. Call sequence:

1. The manager's training thread calls ``staging_gate()`` when a save starts; a backend
   that returns a gate can write chunks while the snapshot copy is still filling the
   staging buffer (the copy opens the gate chunk by chunk).
2. The manager's background thread calls ``write(directory, rank, snapshot)`` once per
   save, possibly before the snapshot copy has completed; a backend without a gate must
   ``snapshot.wait()`` before reading the buffer. It returns the files and chunk records
   the manifest needs. On error the caller removes ``directory``.
3. ``restore``/``load``/``verify`` call ``read(directory, manifest, requests)`` on the
   caller's thread; each request is (chunk index, destination or None to check only).
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import device_crc, faults
from .layout import ChunkEntry, FileEntry, Manifest, data_file_name
from .snapshot import Snapshot

ReadRequest = tuple[int, Optional[memoryview]]


class Storage(abc.ABC):
    def staging_gate(self):
        """A gate object the snapshot copy opens chunk by chunk, or None (write after the copy)."""
        return None

    @abc.abstractmethod
    def write(self, directory: Path, rank: int, snapshot: Snapshot) -> tuple[list[FileEntry], list[ChunkEntry]]:
        """Write every planned chunk; return file entries and one chunk record per planned chunk."""

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
        native = self._native
        if snapshot.gate is None:
            snapshot.wait()
        name = data_file_name(rank, 0)
        view = snapshot.view()
        jobs = [native.WriteJob(view[c.start:c.start + c.length], 0, self._codec, self._level, c.shuffle)
                for c in snapshot.plan.chunks]
        path = str(Path(directory) / name)
        stop_watch = faults.watch_file("mid_write", path)   # None unless a test armed it
        try:
            # The device checksums (and their flags) are filled in before the gate releases
            # their chunks; the writer reads each pair only after that.
            records = self._writer.write([path], jobs, self._fsync, snapshot.gate, snapshot.known_crcs,
                                         snapshot.crc_known.view(np.uint8),
                                         device_crc.mode() == "check")
        finally:
            if stop_watch is not None:
                stop_watch()
        chunks = [ChunkEntry(r.file, r.offset, r.length, r.raw_length, _CODEC_NAMES[r.codec],
                             r.shuffle, r.crc32c, r.raw_crc32c) for r in records]
        # The manifest records the real size, padding included, so verify can compare it.
        size = os.path.getsize(Path(directory) / name)
        return [FileEntry(name, size, rank)], chunks

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
