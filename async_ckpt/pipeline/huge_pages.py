"""Idle staging buffers moved onto transparent huge pages, on a thread of their own.

Why: the native writer's O_DIRECT writes go straight from the staging buffer to the device,
and one block request carries a bounded number of memory segments (254 on the dev VM's virtio
disk). From scattered 4 KiB pages a request holds about 1 MiB; from 2 MiB pages it reaches the
queue's 4 MiB limit. Measured on the 2-core dev VM (``save_async`` to committed over a raw
O_DIRECT write of the same bytes in the same process, transformer + AdamW, 253 MiB, median
of 8 per process, 3 alternating processes each): 0.66-0.72 from a 4 KiB-page staging
buffer, 0.75-0.81 once it was collapsed. Inside the IO benchmark, though, the 1 GiB fp32
state's stall was longer with it (docs/PERFORMANCE.md), so the manager uses it only with
``huge_pages=True``.

Huge pages are not asked for at allocation (``MADV_HUGEPAGE`` before the first copy): a
512 MiB buffer's first copy then took 43 to 611 ms against 120 ms on small pages, inside the
save's stall. So buffers start on small pages, and once a save has given one back and it has
stayed idle for ``QUIET`` seconds, this thread collapses it (``MADV_COLLAPSE``, Linux 6.1+) a
piece at a time, once per buffer. That costs one core 0.3-2.5 s per GiB here, and while it
ran between back-to-back saves of 1 GiB their stall went from 69 to 128 ms: hence
the quiet period, which back-to-back saves never leave, and a save that takes the buffer
stops the collapse after the piece in progress, without waiting for it (the collapse keeps
the bytes and their addresses; a page being written waits only for its own 2 MiB). Only the
bytes saves have used are collapsed, so the pool's headroom stays unpopulated.

Where those costs come from on the dev VM: not compaction (``compact_stall`` in
/proc/vmstat stays 0) but the hypervisor. Its balloon device reports free 2 MiB blocks to
the host about 2 s after they are freed, and the host drops their memory; a huge page taken
from such a block waits for the host to back it again (``tools/fresh_memory_cost.py``, 512
MiB: fresh huge pages 22 ms right after others were freed, 588-834 ms after 5 s idle; a
collapse 109-110 ms and 938-1,028 ms; small pages 156-160 ms either way). A machine without
free page reporting (bare metal) should pay the fast figures; that has not been measured.

Threads: ``StagingPool.release`` (the commit thread) calls :meth:`HugePageTidier.offer`;
``StagingPool.acquire`` (the training thread) calls :meth:`~HugePageTidier.claim`; the
tidier's own thread makes the madvise calls. Best effort throughout: a kernel that cannot
do it turns the tidier off, and a piece that fails once is left on small pages.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import torch

from .. import native

# Bytes per madvise call (rounded up to whole huge pages): how far a collapse runs on after a
# save took its buffer back.
PIECE = 8 << 20
QUIET = 0.5        # seconds a released buffer stays untouched before its collapse starts
_FORGOTTEN = -1    # _busy when the buffer of the piece in progress was freed meanwhile


class HugePageTidier:
    """Collapses released staging buffers onto huge pages while they sit idle."""

    def __init__(self, on_thread_start: Callable[[], None] = lambda: None) -> None:
        self._on_thread_start = on_thread_start
        self._huge = native.huge_page_size()
        self._cond = threading.Condition()
        self._queue: list[tuple[torch.Tensor, int, float]] = []   # (buffer, bytes to cover, start after)
        self._done: dict[int, int] = {}      # data_ptr → buffer offset up to which pieces were tried
        self._busy: Optional[int] = None     # data_ptr of the buffer a piece is being collapsed in
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.collapsed_bytes = 0             # tests and benchmarks watch it

    @property
    def enabled(self) -> bool:
        return self._huge > 0 and not self._closed

    def offer(self, buffer: torch.Tensor, used: int) -> None:
        """``buffer`` is idle now; its first ``used`` bytes were written by saves."""
        if not self.enabled:
            return
        ptr = buffer.data_ptr()
        with self._cond:
            if self._done.get(ptr, 0) >= self._last_boundary(buffer, used):
                return
            self._queue.append((buffer, used, time.monotonic() + QUIET))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="async_ckpt-huge-pages", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def claim(self, buffer: torch.Tensor) -> None:
        """``buffer`` is about to be used: no further pieces of it (one may still be running)."""
        ptr = buffer.data_ptr()
        with self._cond:
            self._queue = [q for q in self._queue if q[0].data_ptr() != ptr]
            self._cond.notify_all()            # wait_idle may be waiting for an empty queue

    def forget(self, buffer: torch.Tensor) -> None:
        """``buffer`` is being freed; a later buffer may get its address. A piece still running
        on it is harmless: unmapping waits for the madvise call to return."""
        with self._cond:
            self.claim(buffer)
            self._done.pop(buffer.data_ptr(), None)
            if self._busy == buffer.data_ptr():
                self._busy = _FORGOTTEN        # the piece's outcome is not recorded

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until nothing is queued or in progress (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: (not self._queue and self._busy is None)
                                       or self._thread is None or not self._thread.is_alive(), timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _first_boundary(self, buffer: torch.Tensor) -> int:
        return -buffer.data_ptr() % self._huge

    def _last_boundary(self, buffer: torch.Tensor, used: int) -> int:
        return (buffer.data_ptr() + min(used, buffer.numel())) // self._huge * self._huge - buffer.data_ptr()

    def _run(self) -> None:
        self._on_thread_start()
        # Pieces hold whole huge pages whatever their size (2 MiB on x86-64, up to 512 MiB on arm64).
        step = -(-PIECE // self._huge) * self._huge
        while True:
            buffer = None      # no reference while waiting: a freed buffer's memory goes at once
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                buffer, used, after = self._queue[0]
                wait = after - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)      # claims and offers wake it early: look again
                    continue
                ptr = buffer.data_ptr()
                start = max(self._done.get(ptr, 0), self._first_boundary(buffer))
                last = self._last_boundary(buffer, used)
                if start >= last:
                    self._queue.pop(0)
                    self._cond.notify_all()    # wait_idle may be waiting for exactly this
                    continue
                self._busy = ptr
            # Piece ends on a huge-page boundary of the address space, so no page straddles two calls.
            end = min(last, start + step)
            try:
                result = native.collapse_huge_pages(buffer[start:end].numpy())
            except Exception:       # noqa: BLE001 - best effort: never let tidying fail a save
                result = "unsupported"
            with self._cond:
                forgotten, self._busy = self._busy != ptr, None
                if result == "unsupported":
                    self._closed = True
                    self._queue.clear()
                elif not forgotten:
                    self._done[ptr] = end
                    if result == "done":
                        self.collapsed_bytes += end - start
                self._cond.notify_all()
