"""A tiny, dependency-free progress bar on stderr.

It draws only when the stream is a TTY (so logs, pipes and CI stay clean), redraws
at most ten times a second, and erases itself on :meth:`Progress.close`. Safe to call
from one thread at a time; callers on several threads must serialise ``update``.

    with Progress(total_bytes, "verify") as bar:
        for n in work():
            bar.update(n)
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.50 KiB'``; exact integers below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in _UNITS[1:]:
        n /= 1024.0
        if n < 1024 or unit == _UNITS[-1]:
            return f"{n:.2f} {unit}"
    return f"{n:.2f} {_UNITS[-1]}"  # pragma: no cover - loop always returns


class Progress:
    """Byte-counting bar: ``label [#####.....]  42%  1.20 GiB/2.80 GiB  950 MiB/s``."""

    WIDTH = 30
    INTERVAL = 0.1

    def __init__(self, total: int, label: str = "", stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.total = max(0, int(total))
        self.label = label
        self.done = 0
        self._start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= self.INTERVAL or self.done >= self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(1.0, self.done / self.total) if self.total else 1.0
        fill = int(frac * self.WIDTH)
        rate = self.done / max(now - self._start, 1e-9)
        line = (f"\r{self.label} [{'#' * fill}{'.' * (self.WIDTH - fill)}] {frac * 100:5.1f}%  "
                f"{human_bytes(self.done)}/{human_bytes(self.total)}  {human_bytes(rate)}/s")
        try:
            self.stream.write(line)
            self.stream.flush()
            self._drawn = True
        except (OSError, ValueError):
            self.enabled = False

    def close(self) -> None:
        if self.enabled and self._drawn:
            try:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
            except (OSError, ValueError):
                pass
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
