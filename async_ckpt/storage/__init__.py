"""Storage: backends that move bytes (:mod:`.base`, :mod:`.native_files`, :mod:`.memory`) and
the commit policies that decide when a step is visible (:mod:`.commit`).

:func:`open_root` turns what a user passes (a local path or a URL) into a backend and
the root location on it.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional, Union

from .base import ChunkSource, Entry, KnownCrcs, ObjectInfo, RankWrite, ReadRequest, Storage, WrittenFiles
from .commit import CommitPolicy, CommitStatus, MarkerLastCommit, MarkerState, RenameCommit, policy_for

__all__ = ["ChunkSource", "CommitPolicy", "CommitStatus", "Entry", "KnownCrcs", "MarkerLastCommit", "MarkerState",
           "ObjectInfo", "RankWrite", "ReadRequest", "RenameCommit", "Storage", "WrittenFiles",
           "is_url", "open_root", "policy_for"]

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)


def is_url(target: Union[str, "os.PathLike[str]"]) -> bool:
    return isinstance(target, str) and _URL.fullmatch(target) is not None


def open_root(target: Union[str, "os.PathLike[str]"], make_native: Optional[Callable[[], Storage]] = None
              ) -> tuple[Storage, str]:
    """``(backend, root location)`` for a local path or a URL.

    Local paths (and ``file://`` URLs) use the native files backend (built by
    ``make_native`` when given, so the caller's options apply); ``memory://name`` a
    process-wide in-memory store. Any other scheme is an error, never a local folder
    named after it.
    """
    from .memory import MemoryStorage
    from .native_files import NativeStorage

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
    raise ValueError(f"{target!r}: unsupported storage URL scheme {scheme!r} "
                     "(local paths, file:// and memory:// are supported)")
