"""The default backend: local files through the compiled writer/reader (parallel
pwrite/pread, crc32c, byte-shuffle, zstd, O_DIRECT where aligned, fsync).

Locations are directory paths. ``move`` is ``rename(2)``, so steps commit by renaming
(:class:`~async_ckpt.storage.commit.RenameCommit`). Small objects are opened without
following symlinks and without blocking, and must be regular files.

Frozen-file reuse lives entirely here. A rank's chunks from ``stable_from`` on (frozen
parameters) go to a second data file. After writing one, the backend remembers it under
the step's *final* name; a later save whose stable chunks have the same signature and
crc32c hard-links that file instead of writing the bytes again, provided the remembered
file still exists (the step committed and was not rotated away). A file is shared by at
most ``frozen_max_shared`` steps, then written afresh, so one bad sector reaches a
bounded number of steps.

Threads: ``write_rank`` runs on the manager's background thread (native threads below
it, GIL released); ``read`` on the caller's thread; the rest on either.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import numpy as np

from .. import faults
from ..errors import FormatError, RootBusyError, StorageError
from ..format.manifest import CODECS, ChunkEntry, FileEntry
from ..format.names import LOCK_NAME, data_file_name, step_dir_name
from .base import Entry, ObjectInfo, RankWrite, ReadRequest, Storage, WrittenFiles


@dataclass(frozen=True)
class _FrozenFile:
    """A data file holding only a rank's stable chunks, as last written or linked."""

    path: str                     # under the step's final name
    size: int
    chunks: tuple[ChunkEntry, ...]
    signature: tuple
    shared_by: int = 1            # steps holding this very file

    def matches(self, lengths: Sequence[int], crcs: Sequence[int]) -> bool:
        return len(lengths) == len(self.chunks) and all(
            c.raw_length == n and c.raw_crc32c == crc for c, n, crc in zip(self.chunks, lengths, crcs))


def _storage_error(e: OSError, path: str, what: str) -> StorageError:
    """The OSError as a StorageError that names the file and the operation (ENOSPC, EIO...)."""
    return StorageError(e.errno, f"{e.strerror} ({what})", path)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _storage_error(e, path, "fsync of the directory") from e


def write_durable(path: str, data: bytes) -> None:
    """Create ``path`` (it must not exist, a planted symlink included), write all of
    ``data``, fsync, close. OS errors other than FileExistsError become StorageError."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise
    except OSError as e:
        raise _storage_error(e, path, "create") from e
    try:
        view = memoryview(data)
        what = "write"
        while view:
            n = os.write(fd, view)
            view = view[n:]
        what = "fsync"
        os.fsync(fd)
    except OSError as e:
        raise _storage_error(e, path, what) from e
    finally:
        os.close(fd)


def open_regular_file(path: str, what: str) -> tuple[int, os.stat_result]:
    """A read descriptor of a regular file and its stat, refusing symlinks (ELOOP), FIFOs and
    devices (FormatError) without blocking on them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FormatError(f"{what}: {path} is a symlink; refusing to follow it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{what}: {path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_regular_file(path: str, cap: int, what: str) -> bytes:
    """All of a small regular file, refusing symlinks, FIFOs and devices without blocking
    on them, and files over ``cap`` bytes (FormatError)."""
    fd, st = open_regular_file(path, what)
    try:
        if st.st_size > cap:
            raise FormatError(f"{what}: {st.st_size} bytes exceeds the cap of {cap}")
        parts = []
        total = 0
        while True:
            # Ask for what fstat promised (plus a little, in case the file grew), never for
            # the whole cap: os.read allocates the full request up front.
            b = os.read(fd, min(cap + 1 - total, max(st.st_size - total, 0) + 65536))
            if not b:
                break
            parts.append(b)
            total += len(b)
            if total > cap:
                raise FormatError(f"{what}: exceeds the cap of {cap} bytes")
        return b"".join(parts)
    finally:
        os.close(fd)


class NativeStorage(Storage):
    """Local files through the compiled extension (the default for local paths)."""

    supports_rename = True

    def __init__(self, io_threads: int = 4, compression: Optional[str] = "auto", level: int = 1,
                 fsync: bool = True, frozen_max_shared: int = 4, writer_nice: int = 0) -> None:
        from .. import native  # loads the extension and zstd lazily
        self._native = native
        self._codec = {None: native.CODEC_RAW, "zstd": native.CODEC_ZSTD,
                       "auto": native.CODEC_AUTO}[compression]
        self._level = level
        self._fsync = fsync
        self._frozen_max_shared = frozen_max_shared
        self._writer = native.Writer(io_threads, writer_nice)
        # One reader thread more than io_threads: one at a time holds its file's turn and
        # waits on the disk, the others checksum and back up. A 512 MiB file in 32 MiB raw
        # chunks, cold cache, dev VM (2 cores), median of 6: 252 ms with 2 threads, 236 ms
        # with 3 and with 4, against 210-220 ms for one plain 8 MiB-pread loop.
        self._reader = native.Reader(min(io_threads + 1, 256))
        self._frozen: dict[int, _FrozenFile] = {}     # rank → its last stable-chunk file
        self._frozen_lock = threading.Lock()

    # ------------------------------------------------------------------ data

    def staging_gate(self):
        return self._native.Gate()

    def write_rank(self, location: str, request: RankWrite) -> WrittenFiles:
        """Chunks before ``stable_from`` go to ``data-r<rank>-0.bin``; a stable tail goes to
        ``data-r<rank>-1.bin``, hard-linked from the last step while unchanged."""
        native = self._native
        if request.gate is None:
            request.wait()
        rank, chunks, split = request.rank, request.chunks, request.first_stable
        has_tail = split < len(chunks)
        with self._frozen_lock:
            reuse = self._frozen.get(rank) if has_tail else None
        if reuse is not None and (reuse.signature != request.stable_signature
                                  or reuse.shared_by >= self._frozen_max_shared):
            reuse = None
        names = [data_file_name(rank, 0), data_file_name(rank, 1)][:1 + has_tail]
        paths = [os.path.join(location, n) for n in names]
        # Without a reuse candidate both files are written in one parallel pass; with one,
        # the stable file waits until its bytes are staged and checksummed.
        upto = split if reuse is not None else len(chunks)
        view = request.buffer
        jobs = [native.WriteJob(view[c.start:c.start + c.length], int(k >= split), self._codec, self._level,
                                c.shuffle)
                for k, c in enumerate(chunks[:upto])]
        stop_watch = faults.watch_file("mid_write", paths[0])   # None unless a test armed it
        try:
            # The device checksums (and their flags) are filled in before the gate releases
            # their chunks; the writer reads each pair only after that.
            records = self._writer.write(paths[:1 + (upto > split)], jobs, self._fsync, request.gate,
                                         request.crcs.values[:upto], request.crcs.known[:upto].view(np.uint8),
                                         request.check_known_crcs)
        finally:
            if stop_watch is not None:
                stop_watch()
        entries = [ChunkEntry(r.file, r.offset, r.length, r.raw_length, CODECS[r.codec],
                              r.shuffle, r.crc32c, r.raw_crc32c) for r in records]
        reused = 0
        if reuse is not None:
            tail, linked = self._write_or_link_stable(request, paths[1], reuse)
            entries += tail
            reused = reuse.size if linked else 0
        # The manifest records real sizes, padding included, so verify can compare them.
        files = tuple(FileEntry(n, os.path.getsize(p), rank) for n, p in zip(names, paths))
        if has_tail:
            final = os.path.join(os.path.dirname(location), step_dir_name(request.step), names[1])
            shared = reuse.shared_by + 1 if reused else 1
            with self._frozen_lock:
                self._frozen[rank] = _FrozenFile(final, files[1].size, tuple(c for c in entries if c.file == 1),
                                                 request.stable_signature, shared)
        return WrittenFiles(files, tuple(entries), reused)

    def _write_or_link_stable(self, request: RankWrite, path: str, reuse: _FrozenFile
                              ) -> tuple[list[ChunkEntry], bool]:
        """The stable tail: hard-link ``reuse`` when every chunk is unchanged, else write it."""
        native = self._native
        request.wait()
        split, view = request.first_stable, request.buffer
        stable = request.chunks[split:]
        crcs = request.crcs.values[split:].copy()
        missing = [k for k in range(len(stable)) if not request.crcs.known[split + k]]
        if missing:      # the host pass, on io_threads (crc32c releases the GIL)
            with ThreadPoolExecutor(min(len(missing), self._writer.threads)) as pool:
                crcs[missing] = list(pool.map(
                    lambda k: native.crc32c(view[stable[k].start:stable[k].start + stable[k].length]), missing))
        if reuse.matches([c.length for c in stable], crcs.tolist()):
            try:
                if not stat.S_ISREG(os.lstat(reuse.path).st_mode):
                    raise FileNotFoundError(reuse.path)
                os.link(reuse.path, path, follow_symlinks=False)
                if os.path.getsize(path) == reuse.size:
                    return [replace(c, file=1) for c in reuse.chunks], True
                os.unlink(path)
            except OSError:
                # Gone (deleted, quarantined), another file system, no hard links: write it.
                if os.path.lexists(path):
                    os.unlink(path)
        jobs = [native.WriteJob(view[c.start:c.start + c.length], 0, self._codec, self._level, c.shuffle)
                for c in stable]
        records = self._writer.write([path], jobs, self._fsync, None, crcs, np.ones(len(stable), np.uint8),
                                     request.check_known_crcs)
        return [ChunkEntry(1, r.offset, r.length, r.raw_length, CODECS[r.codec], r.shuffle, r.crc32c,
                           r.raw_crc32c) for r in records], False

    def read(self, location: str, files: Sequence[FileEntry], requests: Sequence[ReadRequest],
             collect_errors: bool = False) -> list[Optional[str]]:
        native = self._native
        paths = [os.path.join(location, f.path) for f in files]
        jobs = []
        for r in requests:
            c = r.chunk
            if r.decode:
                jobs.append(native.ReadJob(c.file, c.offset, c.length, c.raw_length, CODECS.index(c.codec),
                                           c.shuffle, c.crc32c, c.raw_crc32c, r.into, r.index,
                                           r.pieces or None))
            else:       # the stored bytes as one raw range: pread + crc at disk speed
                jobs.append(native.ReadJob(c.file, c.offset, c.length, c.length, native.CODEC_RAW, 0,
                                           c.crc32c, c.crc32c, None, r.index))
        return self._reader.read(paths, jobs, collect_errors)

    @property
    def io_threads(self) -> int:
        return self._writer.threads

    # ------------------------------------------------------------------ objects and locations

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def list(self, location: str) -> list[Entry]:
        try:
            return [Entry(e.name, e.is_dir(follow_symlinks=False)) for e in os.scandir(location)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def stat(self, location: str, name: str) -> Optional[ObjectInfo]:
        try:
            st = os.lstat(os.path.join(location, name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        kind = "file" if stat.S_ISREG(st.st_mode) else "location" if stat.S_ISDIR(st.st_mode) else "other"
        return ObjectInfo(st.st_size, kind, st.st_nlink)

    def get(self, location: str, name: str, cap: int) -> bytes:
        return read_regular_file(os.path.join(location, name), cap, name)

    def sha256(self, location: str, name: str, cap: int) -> str:
        """Streamed in 1 MiB reads: memory stays flat whatever the manifest's size."""
        path = os.path.join(location, name)
        fd, st = open_regular_file(path, name)
        try:
            if st.st_size > cap:
                raise FormatError(f"{name}: {st.st_size} bytes exceeds the cap of {cap}")
            h = hashlib.sha256()
            total = 0
            while True:
                b = os.read(fd, 1 << 20)
                if not b:
                    return h.hexdigest()
                total += len(b)
                if total > cap:
                    raise FormatError(f"{name}: exceeds the cap of {cap} bytes")
                h.update(b)
        finally:
            os.close(fd)

    def put(self, location: str, name: str, data: bytes, *, replace: bool = False) -> None:
        path = os.path.join(location, name)
        if not replace:
            write_durable(path, data)
            return
        tmp = os.path.join(location, f".{name}.tmp-{os.getpid()}-{threading.get_ident()}")
        if os.path.lexists(tmp):
            os.unlink(tmp)
        write_durable(tmp, data)
        os.replace(tmp, path)     # replaces a planted symlink itself, never its target
        fsync_dir(location)

    def create_location(self, location: str) -> None:
        parent = os.path.dirname(location)
        if parent:
            os.makedirs(parent, exist_ok=True)
        os.mkdir(location)

    def move(self, src: str, dst: str) -> None:
        if os.path.lexists(dst):
            # Never replace anything: a committed step is sacred, and a folder without our
            # marker is somebody else's (e.g. a Hugging Face checkpoint).
            raise FileExistsError(f"{dst} already exists; refusing to overwrite it")
        os.rename(src, dst)

    def remove(self, location: str, name: Optional[str] = None) -> None:
        path = location if name is None else os.path.join(location, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path, ignore_errors=True)    # rmtree never follows symlinks inside
        else:
            os.unlink(path)

    def sync(self, location: str) -> None:
        fsync_dir(location)

    def lock(self, root: str) -> Optional[Callable[[], None]]:
        """``flock`` on ``<root>/.async_ckpt.lock``: released by the kernel when the holder
        dies, so a killed run never blocks the next one. A planted symlink is refused."""
        path = os.path.join(root, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise StorageError(e.errno, "the lock file is a symlink; refusing to follow it", path) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StorageError(errno.EINVAL, "the lock file is not a regular file", path)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RootBusyError(f"{root} is in use by another live CheckpointManager or fix "
                                f"(lock {LOCK_NAME})") from None
        except BaseException:
            os.close(fd)
            raise
        return lambda: os.close(fd)
