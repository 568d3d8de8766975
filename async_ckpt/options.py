"""Every knob of a CheckpointManager, in one place, validated when it is built.

Environment variables override the defaults (not explicit arguments), so an operator
can tune a job without editing code:

=============================  ==========================
``ASYNC_CKPT_IO_THREADS``      ``io_threads``
``ASYNC_CKPT_COMPRESSION``     ``compression`` (``none``, ``zstd``, ``auto``)
``ASYNC_CKPT_CHUNK_MB``        ``chunk_bytes`` in MiB
``ASYNC_CKPT_WRITER_NICE``     ``writer_nice``
``ASYNC_CKPT_HUGE_PAGES``      ``huge_pages`` (``0`` or ``1``)
=============================  ==========================

Process-wide switches, read at each save rather than stored here: ``ASYNC_CKPT_DEVICE_CRC``
(``0``: chunk checksums on the host only; ``check``: recompute every GPU checksum on the
host and fail the save on a mismatch; see :mod:`async_ckpt.device_crc`) and
``ASYNC_CKPT_FAULT`` (crash tests, :mod:`async_ckpt.faults`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

_UNSET = object()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"environment variable {name}={value!r} is not 0/1 (or true/false)")


def ranks_per_node() -> int:
    """Ranks sharing this node's cores (torchrun sets LOCAL_WORLD_SIZE; 1 otherwise)."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def _default_threads() -> int:
    # Ranks on one node share its cores: each gets its share.
    per_node = ranks_per_node()
    return _env_int("ASYNC_CKPT_IO_THREADS", max(1 if per_node > 1 else 2, min(8, os.cpu_count() or 2) // per_node))


def _default_compression() -> Optional[str]:
    value = os.environ.get("ASYNC_CKPT_COMPRESSION", "auto").lower()
    return None if value in ("", "none", "off") else value


def _default_chunk_bytes() -> int:
    return _env_int("ASYNC_CKPT_CHUNK_MB", 32) << 20


@dataclass
class CheckpointManagerOptions:
    """How a :class:`~async_ckpt.CheckpointManager` saves, keeps and writes checkpoints.

    Preservation (applied after each successful commit; the newest committed step is
    never deleted):

    - ``max_to_keep``: keep this many steps (the newest ones, or the best ones when
      ``best_metric`` is set). ``None`` keeps everything.
    - ``keep_every_n_steps``: additionally keep every step divisible by N, forever.
    - ``best_metric`` / ``best_mode``: rank steps by ``metrics[best_metric]`` passed to
      ``save_async``, lowest (``"min"``) or highest (``"max"``) first.

    Saving: ``save_interval_steps`` makes :meth:`should_save` (and non-forced saves) skip
    steps that are not multiples of it. ``compression`` is ``None`` (raw), ``"zstd"``
    (always), or ``"auto"`` (zstd per chunk only when a probe says it pays).
    ``max_inflight_saves`` bounds the snapshots held in memory: when that many saves are
    still writing, ``save_async`` blocks. ``snapshot="lazy"`` returns from ``save_async``
    before the copy to host memory is finished and fences the next optimizer step instead.
    ``handle_sigterm`` lets queued saves commit before the process stops on SIGTERM.
    ``reuse_frozen`` keeps parameters with ``requires_grad=False`` in a data file of their
    own and hard-links it from the previous step while they are unchanged (same memory,
    version counters and chunk crc32c); ``False`` writes every byte of every step. One file
    is shared by at most ``frozen_max_shared`` consecutive steps (then written afresh), so a
    bad sector in it reaches that many steps at most. ``max_pinned_bytes`` caps the pinned host
    memory of the staging pool (``None``: no cap); staging beyond it is pageable memory.
    The pool is allocated at the first save, reused by later ones and freed by ``close()``.
    ``writer_nice``: the threads that write in the background (the commit thread and the
    native writer's) run this much nicer than the thread that made the manager (Linux
    thread niceness, best effort; 0 leaves them alone), so the snapshot copy and training
    keep their cores while a save streams to disk. They still take every idle cycle.
    ``huge_pages`` (off by default): once a save's staging buffer has been idle for half a
    second, a niced thread moves it onto transparent huge pages (Linux 6.1+
    ``MADV_COLLAPSE``; elsewhere nothing happens), once per buffer, so later saves reach the
    disk in larger requests. It costs that thread about 0.3-2.5 s per GiB, once. Measured
    on the dev VM it shortened the commit of a transformer + AdamW state by 8-10 %, but in
    the IO benchmark's 1 GiB fp32 state it lengthened the stall (docs/PERFORMANCE.md), so
    it is opt-in.

    Several ranks (torch.distributed initialised, or ``process_group=`` given to the manager):
    ``collective_timeout_s`` bounds every collective of the manager's own gloo group, so a
    rank that dies or hangs in the middle of a save fails the others' saves within that
    time instead of blocking them forever.
    """

    max_to_keep: Optional[int] = 3
    keep_every_n_steps: Optional[int] = None
    best_metric: Optional[str] = None
    best_mode: Literal["min", "max"] = "min"
    save_interval_steps: int = 1
    compression: Optional[str] = field(default_factory=_default_compression)
    compression_level: int = 1
    io_threads: int = field(default_factory=_default_threads)
    max_inflight_saves: int = 1
    chunk_bytes: int = field(default_factory=_default_chunk_bytes)
    snapshot: Literal["eager", "lazy"] = "eager"
    fsync: bool = True
    save_rng: bool = True
    cleanup_leftovers: bool = True
    handle_sigterm: bool = True
    reuse_frozen: bool = True
    frozen_max_shared: int = 4
    max_pinned_bytes: Optional[int] = None
    collective_timeout_s: float = 120.0
    writer_nice: int = field(default_factory=lambda: _env_int("ASYNC_CKPT_WRITER_NICE", 10))
    huge_pages: bool = field(default_factory=lambda: _env_bool("ASYNC_CKPT_HUGE_PAGES", False))

    def __post_init__(self) -> None:
        if not 0 < self.collective_timeout_s <= 24 * 3600:
            raise ValueError(f"collective_timeout_s must be in (0, 86400], got {self.collective_timeout_s}")
        if self.max_to_keep is not None and self.max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {self.max_to_keep}")
        if self.keep_every_n_steps is not None and self.keep_every_n_steps < 1:
            raise ValueError(f"keep_every_n_steps must be >= 1 or None, got {self.keep_every_n_steps}")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")
        if self.save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {self.save_interval_steps}")
        if isinstance(self.compression, str) and self.compression.lower() in ("none", "raw", "off"):
            self.compression = None
        if self.compression not in (None, "zstd", "auto"):
            raise ValueError(f"compression must be None, 'zstd' or 'auto', got {self.compression!r}")
        if not -7 <= self.compression_level <= 22:
            raise ValueError(f"compression_level must be in [-7, 22], got {self.compression_level}")
        if not 1 <= self.io_threads <= 256:
            raise ValueError(f"io_threads must be in [1, 256], got {self.io_threads}")
        if self.frozen_max_shared < 1:
            raise ValueError(f"frozen_max_shared must be >= 1, got {self.frozen_max_shared}")
        if self.max_pinned_bytes is not None and self.max_pinned_bytes < 0:
            raise ValueError(f"max_pinned_bytes must be >= 0 or None, got {self.max_pinned_bytes}")
        if self.max_inflight_saves < 1:
            raise ValueError(f"max_inflight_saves must be >= 1, got {self.max_inflight_saves}")
        if self.chunk_bytes < (1 << 16) or self.chunk_bytes > (1 << 30) or self.chunk_bytes % 16:
            raise ValueError(f"chunk_bytes must be a multiple of 16 in [64 KiB, 1 GiB], got {self.chunk_bytes}")
        if not 0 <= self.writer_nice <= 19:
            raise ValueError(f"writer_nice must be in [0, 19], got {self.writer_nice}")
        if self.snapshot not in ("eager", "lazy"):
            raise ValueError(f"snapshot must be 'eager' or 'lazy', got {self.snapshot!r}")
