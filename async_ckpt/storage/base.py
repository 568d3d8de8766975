"""The storage interface: bytes in and out of one store, nothing else.

A backend knows locations (a step's folder or prefix), named objects in them, and how
chunk bytes reach the medium. It never learns what a tensor means, which step is
committed, or how many ranks there are: plans, snapshots, the commit protocol, rotation
and restore sit above it (:mod:`async_ckpt.storage.commit`, :mod:`async_ckpt.pipeline`).

Locations are strings built with :meth:`Storage.join` from a root and names; a local
backend maps them to paths, an object store to key prefixes.

Call sequence of one save (a single process is rank 0 of a world of one):

1. Training thread, in ``save_async``: :meth:`Storage.staging_gate` returns a gate the
   snapshot copy opens chunk by chunk (or None: the backend then writes after the copy).
2. Coordinator's background thread: the commit policy creates the step's location
   (:meth:`Storage.create_location`), or picks the final name directly (marker-last).
3. Every rank's background thread: :meth:`Storage.write_rank` writes that rank's chunks
   into the location, possibly while the copy is still running, and returns the file and
   chunk records (with crcs) the manifest needs.
4. Coordinator's background thread: the commit policy writes the manifest and the marker
   (:meth:`Storage.put`), makes them durable (:meth:`Storage.sync`) and publishes the step
   (:meth:`Storage.move` for rename-based commit).
5. Any thread, later: :meth:`Storage.read` for restore, ``load``, verify and fix alike;
   :meth:`Storage.get` / :meth:`Storage.list` / :meth:`Storage.stat` for the commit
   policy and verify; :meth:`Storage.remove` for rotation and leftovers.

Errors: a missing object or location raises ``FileNotFoundError``; IO failures raise
:class:`~async_ckpt.errors.StorageError` naming the object; bad chunk bytes raise
:class:`~async_ckpt.errors.ChecksumError` (or come back as messages with
``collect_errors``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..format.manifest import ChunkEntry, FileEntry


@dataclass(frozen=True)
class ChunkSource:
    """One chunk to write: a byte range of the staging buffer and its codec settings."""

    start: int
    length: int
    shuffle: int        # element size for byte-shuffle when compressing (0: none)


@dataclass
class KnownCrcs:
    """crc32c of chunks' raw bytes computed before the writer reads them (on the GPU):
    ``values[k]`` is valid where ``known[k]``. The snapshot fills a chunk's pair before its
    gate opens; the writer computes the rest itself."""

    values: np.ndarray      # uint32 per chunk
    known: np.ndarray       # bool per chunk

    @classmethod
    def none(cls, n: int) -> "KnownCrcs":
        return cls(np.zeros(n, dtype=np.uint32), np.zeros(n, dtype=bool))


@dataclass
class RankWrite:
    """Everything one rank hands the backend for one step.

    ``buffer`` holds the staged bytes. With a ``gate`` (from :meth:`Storage.staging_gate`)
    chunk k may be read once the gate has advanced past it; without one the backend calls
    ``wait()`` first. ``crcs`` holds the chunk checksums already computed (on the GPU).
    Chunks from ``stable_from`` on are expected to stay unchanged between saves (frozen
    parameters): a backend may reuse what it stored for them last time when
    ``stable_signature`` and every chunk's crc32c still match. ``wait()`` re-raises a copy
    error.
    """

    step: int
    rank: int
    buffer: memoryview
    chunks: Sequence[ChunkSource]
    wait: Callable[[], None]
    gate: Any = None
    crcs: Optional[KnownCrcs] = None
    stable_from: int = -1               # -1: len(chunks), no stable tail
    stable_signature: tuple = ()
    check_known_crcs: bool = False      # recompute known crcs on the host and compare (tests)

    def __post_init__(self) -> None:
        if self.crcs is None:
            self.crcs = KnownCrcs.none(len(self.chunks))

    @property
    def first_stable(self) -> int:
        return len(self.chunks) if self.stable_from < 0 else self.stable_from


@dataclass(frozen=True)
class WrittenFiles:
    """What :meth:`Storage.write_rank` stored: files in rank-local order and one chunk record
    per :class:`ChunkSource`, in order (``ChunkEntry.file`` indexes ``files``)."""

    files: tuple[FileEntry, ...]
    chunks: tuple[ChunkEntry, ...]
    reused_bytes: int = 0       # bytes not written again (reused from an earlier step)


# A piece of a chunk's decoded bytes: where they go, and where the bytes they overwrite are
# kept first (or None).
Piece = tuple[memoryview, Optional[memoryview]]


@dataclass(frozen=True)
class ReadRequest:
    """Read chunk ``index`` (``chunk`` is its record; ``chunk.file`` indexes the ``files``
    given to :meth:`Storage.read`). ``into`` receives the decoded bytes (exactly
    ``chunk.raw_length``), or None to check only. ``decode=False`` checks the stored bytes'
    crc32c without decoding (verify's disk-speed pass).

    ``pieces`` (instead of ``into``) scatters the decoded bytes in order over several
    buffers whose lengths sum to ``raw_length``. A piece with a backup holds bytes the
    caller may need back (a live tensor): the storage copies them into the backup before
    overwriting them, and when :meth:`Storage.read` raises, every backed-up piece holds its
    old bytes again. Pieces of different requests must not overlap."""

    index: int
    chunk: ChunkEntry
    into: Optional[memoryview] = None
    decode: bool = True
    pieces: tuple[Piece, ...] = ()


@dataclass(frozen=True)
class ObjectInfo:
    """What a name under a location is: ``kind`` is ``"file"`` (a plain regular object),
    ``"location"`` (a real folder or prefix) or ``"other"`` (a symlink, FIFO, device...);
    ``links`` counts the names sharing a file (hard links; 1 where the store has none)."""

    size: int
    kind: str = "file"
    links: int = 1

    @property
    def regular(self) -> bool:
        return self.kind == "file"


@dataclass(frozen=True)
class Entry:
    """A name directly under a location: ``is_location`` for folders/prefixes."""

    name: str
    is_location: bool


class Storage(abc.ABC):
    """Bytes in and out of one store; see the module docstring for the call sequence.

    ``supports_rename`` says whether :meth:`move` is atomic (POSIX rename): the commit
    module then publishes steps by renaming, else it uses the marker-last policy.
    """

    supports_rename: bool = False

    # ------------------------------------------------------------------ data
    def staging_gate(self) -> Any:
        """A gate the snapshot copy opens chunk by chunk, or None (write after the copy)."""
        return None

    @abc.abstractmethod
    def write_rank(self, location: str, request: RankWrite) -> WrittenFiles:
        """Write every chunk of ``request`` into new objects under ``location``."""

    @abc.abstractmethod
    def read(self, location: str, files: Sequence[FileEntry], requests: Sequence[ReadRequest],
             collect_errors: bool = False) -> list[Optional[str]]:
        """Check (and decode) each requested chunk. Raises the first error, or with
        ``collect_errors`` returns one message (or None) per request (see
        :class:`ReadRequest` for pieces and their backups)."""

    # ------------------------------------------------------------------ objects and locations
    @abc.abstractmethod
    def join(self, *parts: str) -> str:
        """A location or object name from a root and names."""

    @abc.abstractmethod
    def list(self, location: str) -> list[Entry]:
        """Names directly under ``location`` ([] when it does not exist)."""

    @abc.abstractmethod
    def stat(self, location: str, name: str) -> Optional[ObjectInfo]:
        """The object ``name`` under ``location``, or None when absent."""

    @abc.abstractmethod
    def get(self, location: str, name: str, cap: int) -> bytes:
        """A small object's bytes (manifest, marker). FileNotFoundError when absent;
        FormatError when larger than ``cap`` or not a regular object (never blocks)."""

    def sha256(self, location: str, name: str, cap: int) -> str:
        """The SHA-256 (hex) of a small object, with :meth:`get`'s rules. Backends may stream
        it instead of holding the bytes."""
        import hashlib
        return hashlib.sha256(self.get(location, name, cap)).hexdigest()

    @abc.abstractmethod
    def put(self, location: str, name: str, data: bytes, *, replace: bool = False) -> None:
        """Store a small object durably; without ``replace`` it must not exist yet. With
        ``replace`` the old object is swapped atomically where the store can."""

    @abc.abstractmethod
    def create_location(self, location: str) -> None:
        """Make a new, empty location (FileExistsError when it exists); parents as needed."""

    @abc.abstractmethod
    def move(self, src: str, dst: str) -> None:
        """Give location ``src`` the name ``dst`` (FileExistsError when ``dst`` exists);
        atomic when ``supports_rename``."""

    @abc.abstractmethod
    def remove(self, location: str, name: Optional[str] = None) -> None:
        """Delete one object, or the whole location when ``name`` is None. Missing is fine."""

    def sync(self, location: str) -> None:
        """Make the names under ``location`` durable (directory fsync); a no-op by default."""

    def lock(self, root: str) -> Optional[Callable[[], None]]:
        """Take the root's exclusive lock against other managers; return its release function,
        or None where the store has no locks. Raises RootBusyError when held."""
        return None

    def describe(self, location: str, name: Optional[str] = None) -> str:
        """How messages name a location or object (a path or URL)."""
        return self.join(location, name) if name else location
