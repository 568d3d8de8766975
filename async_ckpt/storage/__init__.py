"""Storage: backends that move bytes (:mod:`.base`, :mod:`.native_files`, :mod:`.memory`,
:mod:`.kvstore`) and the commit policies that decide when a step is visible (:mod:`.commit`).

:func:`open_root` turns what a user passes (a local path, a URL or a TensorStore kvstore
spec) into a backend and the root location on it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping, Optional, Union

from .base import ChunkSource, Entry, KnownCrcs, ObjectInfo, RankWrite, ReadRequest, Storage, WrittenFiles
from .commit import CommitPolicy, CommitStatus, MarkerLastCommit, MarkerState, RenameCommit, policy_for

__all__ = ["ChunkSource", "CommitPolicy", "CommitStatus", "Entry", "KnownCrcs", "MarkerLastCommit", "MarkerState",
           "ObjectInfo", "RankWrite", "ReadRequest", "RenameCommit", "Storage", "WrittenFiles",
           "is_url", "open_root", "policy_for"]

KV_SCHEMES = ("s3", "gs", "ts-memory")     # through TensorStore (.kvstore)
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)


def is_url(target: Union[str, "os.PathLike[str]"]) -> bool:
    return isinstance(target, str) and _URL.fullmatch(target) is not None


def open_root(target: Union[str, "os.PathLike[str]", Mapping[str, Any]],
              make_native: Optional[Callable[[], Storage]] = None, *, compression: Optional[str] = "auto",
              level: int = 1, io_threads: int = 4) -> tuple[Storage, str]:
    """``(backend, root location)`` for a local path, a URL or a kvstore spec.

    Local paths (and ``file://`` URLs) use the native files backend (built by
    ``make_native`` when given, so the caller's options apply); ``memory://name`` a
    process-wide in-memory store. ``s3://bucket/prefix``, ``gs://bucket/prefix`` and
    ``ts-memory://name/prefix`` (TensorStore's memory driver), and a dict (a TensorStore
    kvstore spec such as ``{"driver": "s3", "bucket": "b", "path": "run"}``) use the
    TensorStore backend with ``compression``, ``level`` and ``io_threads``
    (:mod:`.kvstore`). Any other scheme is an error, never a local folder named after it.
    """
    from .memory import MemoryStorage
    from .native_files import NativeStorage

    kv_options = {"compression": compression, "level": level, "io_threads": io_threads}
    if isinstance(target, Mapping):
        from .kvstore import open_spec
        return open_spec(target, **kv_options)
    make_native = make_native or NativeStorage
    if not is_url(target):
        return make_native(), os.fspath(target)
    m = _URL.fullmatch(str(target))
    assert m is not None
    scheme, rest = m.group(1).lower(), m.group(2)
    if scheme == "file":
        if not rest.startswith("/"):
            raise ValueError(f"{target!r}: a file:// URL needs an absolute path (file:///...)")
        return make_native(), os.path.abspath(rest)
    if scheme == "memory":
        name, _, root = rest.partition("/")
        if not name:
            raise ValueError(f"{target!r}: a memory:// URL needs a store name (memory://name/prefix)")
        return MemoryStorage.shared(name), root.strip("/")
    if scheme in KV_SCHEMES:
        from .kvstore import open_url
        return open_url(scheme, rest, str(target), **kv_options)
    raise ValueError(f"{target!r}: unsupported storage URL scheme {scheme!r} "
                     "(local paths, file://, memory://, s3://, gs:// and ts-memory:// are supported)")
