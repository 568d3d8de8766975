"""The compiled core (``async_ckpt._native``), with zstd loaded at import.

zstd is looked for in this order: ``libzstd.so.1`` (every mainstream Linux ships it), then
the shared object inside the ``zstandard`` package (its ``_cffi`` module exports the whole
ZSTD_* API). ``ASYNC_CKPT_FORCE_ZSTD_FALLBACK=1`` skips the system library (tests use it).
When neither loads, raw chunks still work, ``CODEC_AUTO`` stores raw, and ``CODEC_ZSTD``
raises ``CodecError``; ``ZSTD_ERROR`` says why.

API: see ``async_ckpt/_native.pyi``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import List, Optional

from . import _native
from ._native import (CODEC_AUTO, CODEC_RAW, CODEC_ZSTD, MAX_RAW_LENGTH, ChunkRecord, Gate, Reader,
                      ReadJob, StageQueue, WriteJob, Writer, collapse_huge_pages, copy_all, crc32c, crc32c_hardware,
                      fsync_dir, fsync_file, huge_page_size,
                      shuffle, stage, unshuffle, write_file_durable, zstd_backend, zstd_compress,
                      zstd_decompress, zstd_load)

__all__ = [
    "CODEC_AUTO", "CODEC_RAW", "CODEC_ZSTD", "MAX_RAW_LENGTH", "ChunkRecord", "Reader", "ReadJob",
    "Gate", "StageQueue", "WriteJob", "Writer", "collapse_huge_pages", "copy_all", "crc32c", "crc32c_hardware",
    "fsync_dir", "fsync_file", "huge_page_size", "shuffle",
    "stage", "unshuffle", "write_file_durable", "zstd_backend", "zstd_compress", "zstd_decompress",
    "zstd_load", "zstd_fallback_paths", "ZSTD_ERROR",
]

FORCE_FALLBACK_ENV = "ASYNC_CKPT_FORCE_ZSTD_FALLBACK"


def zstd_fallback_paths() -> List[str]:
    """Shared objects of the installed ``zstandard`` package that may export ZSTD_*."""
    try:
        spec = importlib.util.find_spec("zstandard")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    paths: List[str] = []
    for folder in spec.submodule_search_locations:
        paths += sorted(glob.glob(os.path.join(folder, "_cffi*.so")))
        paths += sorted(glob.glob(os.path.join(folder, "backend_c*.so")))
    return paths


def _load_zstd() -> Optional[str]:
    """Loads zstd; returns None on success, else the reasons every candidate failed."""
    candidates: List[Optional[str]] = []
    if os.environ.get(FORCE_FALLBACK_ENV, "") not in ("1", "true", "yes"):
        candidates.append(None)  # libzstd.so.1
    candidates += zstd_fallback_paths()
    reasons = []
    for path in candidates:
        try:
            _native.zstd_load(path)
            return None
        except Exception as exc:  # CodecError: not found, or lacks a symbol
            reasons.append(str(exc))
    return "; ".join(reasons) or "no zstd library found"


ZSTD_ERROR: Optional[str] = _load_zstd()
