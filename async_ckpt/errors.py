"""One exception family for everything async_ckpt raises on purpose.

The native extension maps its C++ exceptions onto these classes (see
``csrc/bindings.cpp``), so callers catch ``CheckpointError`` and never a bare
``RuntimeError`` from the core.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error async_ckpt raises deliberately."""


class FormatError(CheckpointError, ValueError):
    """A manifest, marker, chunk record or tree is malformed or lies about sizes."""


class ChecksumError(CheckpointError):
    """Stored bytes do not match their CRC-32C. ``path``, ``offset`` and ``chunk`` name the place."""

    def __init__(self, message: str, path: str | None = None, offset: int | None = None,
                 chunk: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.chunk = chunk


class CodecError(CheckpointError):
    """zstd is unavailable, or a frame failed to (de)compress."""


class StorageError(CheckpointError, OSError):
    """An OS-level IO failure (ENOSPC, EIO, short write...). ``errno`` and ``filename`` are set."""


class SaveError(CheckpointError):
    """A background save failed; ``step`` names it and ``__cause__`` holds the original error."""

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class RestoreError(CheckpointError):
    """A restore cannot proceed: no such step, an item missing, or a shape/dtype mismatch."""


class NotCommittedError(RestoreError):
    """The requested step exists only as an uncommitted or invalid directory."""


class RootBusyError(CheckpointError):
    """Another live process (a CheckpointManager or fix) holds the checkpoint root's lock."""


class UnsafeFileError(CheckpointError):
    """A legacy file holds something the weights-only loader refuses (e.g. a pickled object)."""
