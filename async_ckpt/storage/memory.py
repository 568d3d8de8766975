"""A backend that keeps objects in process memory: the second real implementation of the
storage interface, and the model of an object store.

It has no rename (``supports_rename = False``), so steps commit marker-last, exactly as on
S3. Data files are single objects holding the rank's encoded chunks back to back, the same
bytes a local data file holds. ``MemoryStorage.shared(name)`` returns one store per name
per process, so a second manager (or verify) on ``memory://name`` sees the same objects.

Threads: every method takes one lock around the dictionary; encoding runs outside it.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Sequence

from ..errors import FormatError, RootBusyError
from ..format.manifest import ChunkEntry, FileEntry
from ..format.names import data_file_name
from . import chunk_codec
from .base import Entry, ObjectInfo, RankWrite, ReadRequest, Storage, WrittenFiles


class MemoryStorage(Storage):
    """Objects in a dict keyed by ``location/name``; locations are ``/``-joined strings."""

    supports_rename = False
    _registry: dict[str, "MemoryStorage"] = {}
    _registry_lock = threading.Lock()

    def __init__(self, compression: Optional[str] = "auto", level: int = 1) -> None:
        self._objects: dict[str, bytes] = {}
        self._locations: set[str] = set()
        self._lock = threading.Lock()
        self._locked_roots: set[str] = set()
        self._compression = compression
        self._level = level

    @classmethod
    def shared(cls, name: str) -> "MemoryStorage":
        """The process-wide store called ``name`` (``memory://name``)."""
        with cls._registry_lock:
            store = cls._registry.get(name)
            if store is None:
                store = cls._registry[name] = cls()
            return store

    # ------------------------------------------------------------------ data

    def write_rank(self, location: str, request: RankWrite) -> WrittenFiles:
        request.wait()      # no gate: encode after the copy
        if not self._has_location(location):
            raise FileNotFoundError(f"location {location} does not exist")
        names = [data_file_name(request.rank, 0)]
        split = request.first_stable
        if split < len(request.chunks):
            names.append(data_file_name(request.rank, 1))
        blobs: list[list[bytes]] = [[] for _ in names]
        sizes = [0] * len(names)
        entries: list[ChunkEntry] = []
        for k, c in enumerate(request.chunks):
            f = int(k >= split)
            known = int(request.crcs.values[k]) if request.crcs.known[k] else None
            stored, codec, shuffle, crc, raw_crc = chunk_codec.encode(
                request.buffer[c.start:c.start + c.length], self._compression, self._level, c.shuffle, known)
            entries.append(ChunkEntry(f, sizes[f], len(stored), c.length, codec, shuffle, crc, raw_crc))
            blobs[f].append(stored)
            sizes[f] += len(stored)
        with self._lock:
            for name, parts in zip(names, blobs):
                key = self.join(location, name)
                if key in self._objects:
                    raise FileExistsError(key)
                self._objects[key] = b"".join(parts)
        files = tuple(FileEntry(n, s, request.rank) for n, s in zip(names, sizes))
        return WrittenFiles(files, tuple(entries))

    def read(self, location: str, files: Sequence[FileEntry], requests: Sequence[ReadRequest],
             collect_errors: bool = False) -> list[Optional[str]]:
        errors: list[Optional[str]] = []
        delivered: list[ReadRequest] = []
        for r in requests:
            try:
                if not 0 <= r.chunk.file < len(files):
                    raise FormatError(f"chunk {r.index}: file index {r.chunk.file} out of range")
                key = self.join(location, files[r.chunk.file].path)
                with self._lock:
                    blob = self._objects.get(key)
                if blob is None:
                    raise FileNotFoundError(f"{key}: no such object")
                stored = memoryview(blob)[r.chunk.offset:r.chunk.offset + r.chunk.length]
                chunk_codec.check_and_deliver(stored, r, key, delivered)
                errors.append(None)
            except Exception as e:  # noqa: BLE001 - collected per chunk, re-raised otherwise
                if not collect_errors:
                    chunk_codec.roll_back(delivered)
                    raise
                errors.append(chunk_codec.describe(e))
        return errors

    # ------------------------------------------------------------------ objects and locations

    def join(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in parts if p.strip("/"))

    def _has_location(self, location: str) -> bool:
        location = self.join(location)
        with self._lock:
            return location in self._locations or any(k.startswith(location + "/") for k in self._objects)

    def list(self, location: str) -> list[Entry]:
        prefix = self.join(location)
        prefix = prefix + "/" if prefix else ""
        found: dict[str, bool] = {}
        with self._lock:
            for key in list(self._objects) + list(self._locations):
                if key.startswith(prefix) and key != prefix.rstrip("/"):
                    head, sep, _ = key[len(prefix):].partition("/")
                    found[head] = found.get(head, False) or bool(sep) or key in self._locations
        return [Entry(n, d) for n, d in sorted(found.items())]

    def stat(self, location: str, name: str) -> Optional[ObjectInfo]:
        key = self.join(location, name)
        with self._lock:
            blob = self._objects.get(key)
        if blob is not None:
            return ObjectInfo(len(blob))
        return ObjectInfo(0, "location") if self._has_location(key) else None

    def get(self, location: str, name: str, cap: int) -> bytes:
        key = self.join(location, name)
        with self._lock:
            blob = self._objects.get(key)
        if blob is None:
            raise FileNotFoundError(f"{key}: no such object")
        if len(blob) > cap:
            raise FormatError(f"{name}: {len(blob)} bytes exceeds the cap of {cap}")
        return blob

    def put(self, location: str, name: str, data: bytes, *, replace: bool = False) -> None:
        key = self.join(location, name)
        with self._lock:
            if not replace and key in self._objects:
                raise FileExistsError(key)
            self._objects[key] = bytes(data)

    def create_location(self, location: str) -> None:
        if self._has_location(location):
            raise FileExistsError(location)
        with self._lock:
            self._locations.add(self.join(location))

    def move(self, src: str, dst: str) -> None:
        src, dst = self.join(src), self.join(dst)
        if self._has_location(dst):
            raise FileExistsError(dst)
        with self._lock:
            for key in [k for k in self._objects if k.startswith(src + "/")]:
                self._objects[dst + key[len(src):]] = self._objects.pop(key)
            if src in self._locations:
                self._locations.discard(src)
                self._locations.add(dst)

    def remove(self, location: str, name: Optional[str] = None) -> None:
        with self._lock:
            if name is not None:
                self._objects.pop(self.join(location, name), None)
                return
            prefix = self.join(location)
            for key in [k for k in self._objects if k.startswith(prefix + "/")]:
                del self._objects[key]
            self._locations = {k for k in self._locations if k != prefix and not k.startswith(prefix + "/")}

    def lock(self, root: str) -> Optional[Callable[[], None]]:
        root = self.join(root)
        with self._lock:
            if root in self._locked_roots:
                raise RootBusyError(f"memory://{root} is in use by another live CheckpointManager")
            self._locked_roots.add(root)

        def release() -> None:
            with self._lock:
                self._locked_roots.discard(root)
        return release

    def describe(self, location: str, name: Optional[str] = None) -> str:
        return "memory://" + (self.join(location, name) if name else self.join(location))
