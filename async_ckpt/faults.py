"""Named fault points for crash-consistency tests; free when unused.

Set ``ASYNC_CKPT_FAULT=<point>`` (optionally ``<point>:<n>`` to fire on the n-th hit, 1-based)
and the process SIGKILLs itself when the save pipeline reaches that point. The points,
in pipeline order:

=================== ==================================================================
``after_staging``   the snapshot is complete, nothing written yet (tmp dir exists)
``mid_write``       inside the storage write, once the data file holds bytes
``after_data``      every chunk written and fsync'd, no manifest
``after_manifest``  manifest durable, no commit marker
``after_marker``    marker durable, tmp dir not yet fsync'd nor renamed
``after_rename``    renamed to ``checkpoint-<step>``, root not yet fsync'd
``during_rotation`` an old step renamed to its hidden name, not yet deleted
=================== ==================================================================

Production code pays one string comparison per point. Tests that fork a prepared
process (``tests/crash_worker.py``) arm a point with :func:`arm` instead of the
environment. Nothing here runs unless a point is armed.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Callable, Optional

POINTS = ("after_staging", "mid_write", "after_data", "after_manifest", "after_marker",
          "after_rename", "during_rotation")

_target = ""
_remaining = 1
_lock = threading.Lock()


def arm(spec: str) -> None:
    """Arm ``<point>[:<n>]`` (``""`` disarms). Raises ValueError for an unknown point."""
    global _target, _remaining
    target, _, nth = spec.partition(":")
    if target and target not in POINTS:
        raise ValueError(f"ASYNC_CKPT_FAULT={spec!r}: unknown fault point; known: {', '.join(POINTS)}")
    if nth and (not nth.isdigit() or int(nth) < 1):
        raise ValueError(f"ASYNC_CKPT_FAULT={spec!r}: the hit count must be a positive integer")
    with _lock:
        _target = target
        _remaining = int(nth) if nth else 1


def armed(point: str) -> bool:
    """Whether ``point`` is the armed fault point (lets callers skip test-only work)."""
    return point == _target


def hit(point: str) -> None:
    """Kill this process with SIGKILL if ``point`` is the armed fault point."""
    global _remaining
    if point != _target:
        return
    with _lock:
        _remaining -= 1
        if _remaining > 0:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def watch_file(point: str, path: str) -> Optional[Callable[[], None]]:
    """While an opaque writer (the native one) runs, hit ``point`` once ``path`` has bytes.

    Returns None unless ``point`` is armed; else a function that stops the watcher. A
    write that completes before the watcher saw a byte (a loaded machine may not schedule
    the watcher in time) is hit when the watcher is stopped, still inside the storage
    write: the file is then whole but nothing after it exists, so the point always fires.
    """
    if point != _target:
        return None
    stop = threading.Event()
    seen = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                if os.stat(path).st_size > 0 and not stop.is_set():
                    seen.set()
                    hit(point)
                    return
            except FileNotFoundError:
                pass
            stop.wait(0.0001)

    thread = threading.Thread(target=poll, name="async_ckpt-fault-watch", daemon=True)
    thread.start()

    def stop_watching() -> None:
        stop.set()
        thread.join()
        if not seen.is_set() and os.path.exists(path) and os.stat(path).st_size > 0:
            hit(point)

    return stop_watching


arm(os.environ.get("ASYNC_CKPT_FAULT", ""))
