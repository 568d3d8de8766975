"""Let an in-flight commit finish when the job is asked to stop (SIGTERM).

Schedulers (SLURM, Kubernetes) send SIGTERM before SIGKILL. The handler installed
here runs on the main thread, waits (bounded) for every live manager's queued saves
to commit, then re-delivers SIGTERM with the previous disposition, so the process
still stops as the sender expects. Installed by ``CheckpointManager`` when
``handle_sigterm`` is on and it is constructed on the main thread.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import weakref

_managers: "weakref.WeakSet" = weakref.WeakSet()
_installed = False
_previous = signal.SIG_DFL
GRACE_SECONDS = 120.0


def register(manager) -> None:
    global _installed, _previous
    _managers.add(manager)
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGTERM)
    if current not in (signal.SIG_DFL, None):
        return      # the application handles SIGTERM itself; do not take it over
    _previous = current
    signal.signal(signal.SIGTERM, _on_sigterm)
    _installed = True


def _on_sigterm(signum, frame) -> None:
    global _installed
    for manager in list(_managers):
        try:
            manager._drain_for_shutdown(GRACE_SECONDS)
        except Exception as e:     # never let a save error swallow the stop request
            print(f"async_ckpt: save failed while stopping: {e}", file=sys.stderr)
    signal.signal(signal.SIGTERM, _previous)
    _installed = False
    os.kill(os.getpid(), signal.SIGTERM)
