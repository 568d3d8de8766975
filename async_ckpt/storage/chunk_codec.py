"""One chunk at a time, in Python: crc32c, byte-shuffle and zstd through the native
primitives (each releases the GIL). For backends whose medium is not a local file
(memory, object stores): they encode a chunk to bytes, store them, and decode on read.
The bytes are exactly what the native writer produces, so every backend stores the same
format and verify judges them alike.

Errors mirror the native reader's: a ChecksumError naming the object, offset and chunk,
or, with ``collect_errors`` in the caller, the same text prefixed by the error's kind.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import ChecksumError, CodecError, FormatError
from ..format.manifest import CODECS, ChunkEntry
from .base import ReadRequest

# "auto" stores a chunk compressed only when that saves at least half (as the native writer).
AUTO_MIN_SAVING = 0.5


def encode(raw: memoryview, codec: Optional[str], level: int, shuffle: int,
           raw_crc: Optional[int] = None) -> tuple[bytes, str, int, int, int]:
    """``(stored bytes, codec name, shuffle used, crc32c of stored, crc32c of raw)``."""
    from .. import native

    raw_crc = native.crc32c(raw) if raw_crc is None else raw_crc
    if codec in ("zstd", "auto") and len(raw):
        src = raw
        if shuffle:
            shuffled = np.empty(len(raw), dtype=np.uint8)
            native.shuffle(raw, shuffled, shuffle)
            src = memoryview(shuffled)
        try:
            frame = native.zstd_compress(src, level)
        except CodecError:
            if codec == "zstd":
                raise
            frame = None
        if frame is not None and (codec == "zstd" or len(frame) <= len(raw) * AUTO_MIN_SAVING):
            return frame, "zstd", shuffle, native.crc32c(frame), raw_crc
    return bytes(raw), "raw", 0, raw_crc, raw_crc


def check_and_decode(stored: memoryview, chunk: ChunkEntry, index: int, where: str,
                     into: Optional[memoryview], decode: bool) -> None:
    """Check ``stored`` against the chunk's crcs and decode it into ``into`` (if given)."""
    from .. import native

    place = f"chunk {index} ('{where}', offset {chunk.offset}, length {chunk.length})"
    if len(stored) != chunk.length:
        raise FormatError(f"{place}: object ended after {len(stored)} bytes of the chunk (truncated)")
    got = native.crc32c(stored)
    if got != chunk.crc32c:
        raise ChecksumError(f"{place}: stored bytes crc32c mismatch (record 0x{chunk.crc32c:08x}, "
                            f"computed 0x{got:08x})", where, chunk.offset, index)
    if not decode or (into is None and chunk.codec == "raw"):
        return
    out = into if into is not None else memoryview(np.empty(chunk.raw_length, dtype=np.uint8))
    if len(out) != chunk.raw_length:
        raise FormatError(f"{place}: destination holds {len(out)} bytes, the chunk {chunk.raw_length}")
    if chunk.codec == CODECS[0]:
        out[:] = stored
    else:
        target = out if not chunk.shuffle else memoryview(np.empty(chunk.raw_length, dtype=np.uint8))
        try:
            n = native.zstd_decompress(stored, target)
        except (CodecError, FormatError) as e:
            raise FormatError(f"{place}: {e}") from None
        if n != chunk.raw_length:
            raise FormatError(f"{place}: frame decoded to {n} bytes, expected {chunk.raw_length}")
        if chunk.shuffle:
            native.unshuffle(target, out, chunk.shuffle)
    got = native.crc32c(out)
    if got != chunk.raw_crc32c:
        raise ChecksumError(f"{place}: decoded bytes crc32c mismatch (record 0x{chunk.raw_crc32c:08x}, "
                            f"computed 0x{got:08x})", where, chunk.offset, index)


def check_and_deliver(stored: memoryview, request: ReadRequest, where: str,
                      delivered: list[ReadRequest]) -> None:
    """:func:`check_and_decode` for any request. One with pieces is checked and decoded into
    memory of its own, then appended to ``delivered`` once its pieces are backed up, and
    scattered over them; the caller hands ``delivered`` to :func:`roll_back` if its read
    fails. Called from the backend's reading threads."""
    chunk = request.chunk
    if not request.pieces:
        check_and_decode(stored, chunk, request.index, where, request.into, request.decode)
        return
    total = sum(len(dst) for dst, _ in request.pieces)
    if total != chunk.raw_length:
        raise FormatError(f"chunk {request.index}: pieces hold {total} bytes, raw_length is {chunk.raw_length}")
    decoded = stored if chunk.codec == CODECS[0] else memoryview(np.empty(chunk.raw_length, dtype=np.uint8))
    check_and_decode(stored, chunk, request.index, where, None if decoded is stored else decoded, True)
    for dst, backup in request.pieces:
        if backup is not None:
            backup[:] = dst
    delivered.append(request)
    pos = 0
    for dst, _ in request.pieces:
        dst[:] = decoded[pos:pos + len(dst)]
        pos += len(dst)


def roll_back(delivered: Sequence[ReadRequest]) -> None:
    """Put every backed-up piece of ``delivered`` requests back (their read failed)."""
    for request in delivered:
        for dst, backup in request.pieces:
            if backup is not None:
                dst[:] = backup


def describe(error: BaseException) -> str:
    """The collect-errors text of an error: ``"<Kind>: message"``, as the native reader writes."""
    return f"{type(error).__name__}: {error}"
