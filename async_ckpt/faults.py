"""Named fault points for crash-consistency tests; free when unused.

Set ``ASYNC_CKPT_FAULT=<point>`` (optionally ``<point>:<n>`` to fire on the n-th hit, 1-based)
and the process SIGKILLs itself when the save pipeline reaches that point. The points,
in pipeline order: ``after_staging``, ``mid_write`` (after the first chunk of a save,
inside the storage write), ``after_data``, ``after_manifest``, ``after_marker``,
``after_rename``, ``during_rotation``. Production code pays one dict lookup per point.
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = ("after_staging", "mid_write", "after_data", "after_manifest", "after_marker",
          "after_rename", "during_rotation")

_spec = os.environ.get("ASYNC_CKPT_FAULT", "")
_target, _, _nth = _spec.partition(":")
_remaining = int(_nth) if _nth.isdigit() else 1
_lock = threading.Lock()

if _target and _target not in POINTS:
    raise ValueError(f"ASYNC_CKPT_FAULT={_spec!r}: unknown fault point; known: {', '.join(POINTS)}")


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
