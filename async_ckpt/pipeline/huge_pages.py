"""Idle staging buffers moved onto transparent huge pages, on a thread of their own.

Why: the native writer's O_DIRECT writes go straight from the staging buffer to the device,
and one block request carries a bounded number of memory segments (254 on the dev VM's virtio
disk). From scattered 4 KiB pages a request holds about 1 MiB; from 2 MiB pages it reaches the
queue's 4 MiB limit. Measured on the 2-core dev VM (``save_async`` to committed over a raw
O_DIRECT write of the same bytes from a 4 KiB-page buffer, transformer + AdamW, 253 MiB,
median of 8 per process, 4 alternating processes each): 0.70 from a 4 KiB-page staging
buffer, 1.11 once it was collapsed. The snapshot copy into the buffer did not change.

Huge pages are not asked for at allocation (``MADV_HUGEPAGE`` before the first copy): the
kernel then compacts memory inside that first copy, the save's stall, and a 512 MiB buffer's
first copy took 43 to 611 ms against 120 ms on small pages. So buffers start on small pages,
and once a save has given one back, this thread collapses it (``MADV_COLLAPSE``, Linux 6.1+)
a piece at a time while nobody uses it: 72-286 ms of one core per 256-512 MiB, once per buffer.
Only the bytes saves have used are collapsed, so the pool's headroom stays unpopulated.

Threads: ``StagingPool.release`` (the commit thread, or the restoring thread) calls
:meth:`HugePageTidier.offer`; ``StagingPool.acquire`` (the training thread) calls
:meth:`~HugePageTidier.claim`, which waits at most for the piece in progress; the tidier's
own thread makes the madvise calls. Best effort throughout: a kernel that cannot do it
turns the tidier off, and a piece that fails once is left on small pages.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

import torch

from .. import native

PIECE = 32 << 20   # bytes per madvise call: the most a claim can wait for (about 10-40 ms)


class HugePageTidier:
    """Collapses released staging buffers onto huge pages while they sit idle."""

    def __init__(self, on_thread_start: Callable[[], None] = lambda: None) -> None:
        self._on_thread_start = on_thread_start
        self._huge = native.huge_page_size()
        self._cond = threading.Condition()
        self._queue: list[tuple[torch.Tensor, int]] = []   # (buffer, bytes to cover), oldest first
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
            self._queue.append((buffer, used))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="async_ckpt-huge-pages", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def claim(self, buffer: torch.Tensor) -> None:
        """``buffer`` is about to be used: drop it from the queue, wait for its piece in progress."""
        ptr = buffer.data_ptr()
        with self._cond:
            self._queue = [q for q in self._queue if q[0].data_ptr() != ptr]
            while self._busy == ptr and self._thread is not None and self._thread.is_alive():
                self._cond.wait()

    def forget(self, buffer: torch.Tensor) -> None:
        """``buffer`` is being freed; a later buffer may get its address."""
        self.claim(buffer)
        with self._cond:
            self._done.pop(buffer.data_ptr(), None)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until nothing is queued or in progress (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._busy is None, timeout)

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
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                buffer, used = self._queue[0]
                ptr = buffer.data_ptr()
                start = max(self._done.get(ptr, 0), self._first_boundary(buffer))
                last = self._last_boundary(buffer, used)
                if start >= last:
                    self._queue.pop(0)
                    continue
                self._busy = ptr
            # Piece ends on a huge-page boundary of the address space, so no page straddles two calls.
            end = min(last, start + PIECE)
            try:
                result = native.collapse_huge_pages(buffer[start:end].numpy())
            except Exception:       # noqa: BLE001 - best effort: never let tidying fail a save
                result = "unsupported"
            with self._cond:
                self._busy = None
                if result == "unsupported":
                    self._closed = True
                    self._queue.clear()
                else:
                    self._done[ptr] = end
                    if result == "done":
                        self.collapsed_bytes += end - start
                self._cond.notify_all()
