"""Host staging memory and the snapshot copy (the fence between training and IO).

``StagingPool`` hands out reusable uint8 host buffers (pinned when CUDA is present,
so device-to-host copies are real DMA). ``take_snapshot`` copies every planned array
into one buffer: CPU tensors and ndarrays with a plain copy, CUDA tensors on a side
stream. Both run on the training thread inside ``save_async``; the pool is also
touched by the background writer thread (``release``), hence the lock.
"""

from __future__ import annotations

import threading
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .plan import SavePlan
from .tree import parse_array_dtype


PAGE = 4096


class StagingPool:
    """A small set of reusable host buffers; at most one per in-flight save."""

    def __init__(self, pin_memory: Optional[bool] = None, slack: float = 0.125) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._slack = slack
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.allocations = 0          # how many buffers were ever allocated (tests watch growth)
        self.allocated_bytes = 0

    def acquire(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fitting = [b for b in self._free if b.numel() >= nbytes]
            if fitting:
                buf = min(fitting, key=lambda b: b.numel())
                self._free.remove(buf)
                return buf
            if self._free:
                # Too small for this state: drop the largest so memory stays bounded.
                old = max(self._free, key=lambda b: b.numel())
                self._free.remove(old)
                self.allocated_bytes -= old.numel()
        # Headroom so a state that grows a little (a new optimizer moment) reuses the buffer.
        size = max(1, int(nbytes * (1 + self._slack)))
        # Page-aligned start: the native writer's O_DIRECT path then writes straight from the
        # buffer instead of copying every slice through an aligned bounce buffer (measured on
        # the 2-core dev VM: 0.28 -> 0.15 s of writer CPU per GiB, benchmarks/io.py).
        base = torch.empty(size + PAGE, dtype=torch.uint8, pin_memory=self.pin_memory)
        skip = -base.data_ptr() % PAGE
        buf = base[skip:skip + size]
        with self._lock:
            self.allocations += 1
            self.allocated_bytes += size
        return buf

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)

    def clear(self) -> None:
        with self._lock:
            for b in self._free:
                self.allocated_bytes -= b.numel()
            self._free.clear()


@dataclass
class Snapshot:
    """A plan plus the staging buffer that holds its bytes.

    Copies may still be running: ``cpu_copies`` (a future of the background copier, lazy
    mode) and ``cuda_event`` (recorded after the side-stream copies). ``wait`` blocks the
    host until both are done (the background writer calls it); ``fence`` is what the
    training thread calls before mutating fenced tensors (optimizer step pre-hook): it
    blocks on CPU copies but only orders the current CUDA stream after the copy event.
    """

    plan: SavePlan
    buffer: torch.Tensor
    cuda_event: Optional["torch.cuda.Event"] = None
    cpu_copies: Optional[Future] = None
    _done: bool = field(default=False)

    def wait(self) -> None:
        """Block until every copy into the buffer is complete (idempotent); re-raise copy errors."""
        if self._done:
            return
        if self.cpu_copies is not None:
            self.cpu_copies.result()
        if self.cuda_event is not None:
            self.cuda_event.synchronize()
        self._done = True

    def fence(self) -> None:
        """Make later work on the training thread/stream unable to race the copies."""
        if self.cpu_copies is not None:
            self.cpu_copies.result()
        if self.cuda_event is not None and not self._done:
            torch.cuda.current_stream().wait_event(self.cuda_event)

    def view(self) -> memoryview:
        """The staging bytes as a writable memoryview, for the IO layer."""
        return memoryview(self.buffer.numpy()).cast("B")


_side_streams: dict[int, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def _host_destination(plan: SavePlan, buffer: torch.Tensor, host: np.ndarray, index: int):
    ref, offset = plan.arrays[index], plan.offsets[index]
    kind, dtype, _ = parse_array_dtype(ref.dtype)
    if kind == "numpy":
        return kind, host[offset:offset + ref.nbytes].view(dtype).reshape(ref.shape)
    return kind, buffer[offset:offset + ref.nbytes].view(dtype).view(ref.shape)


def _copy_cpu(plan: SavePlan, buffer: torch.Tensor, indices: list[int]) -> None:
    host = buffer.numpy()
    for i in indices:
        kind, dst = _host_destination(plan, buffer, host, i)
        value = plan.arrays[i].value
        if kind == "numpy":
            np.copyto(dst, value, casting="no")
        else:
            dst.copy_(value.detach())


def take_snapshot(plan: SavePlan, buffer: torch.Tensor, wait: bool = True,
                  deferred: frozenset[int] = frozenset(), copier: Optional[Executor] = None) -> Snapshot:
    """Copy every array of ``plan`` into ``buffer``.

    Eager (default): every copy is complete on return. Lazy: CPU arrays whose index is in
    ``deferred`` are copied by ``copier`` in the background and CUDA copies are left
    running on a side stream; the caller must ``fence`` the snapshot before anything
    mutates a deferred array. CUDA arrays not in ``deferred`` are first cloned on the
    training stream, so kernels queued later (e.g. BatchNorm statistics) cannot race.
    """
    now: list[int] = []
    later: list[int] = []
    streams_used: list = []
    host = buffer.numpy()
    for i, ref in enumerate(plan.arrays):
        if ref.nbytes == 0:
            continue
        value = ref.value
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            stream = _side_stream(value.device)
            if stream not in streams_used:
                # Copies must see every kernel already queued on the training stream.
                stream.wait_stream(torch.cuda.current_stream(value.device))
                streams_used.append(stream)
            src = value.detach() if wait or i in deferred else value.detach().clone()
            _, dst = _host_destination(plan, buffer, host, i)
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            # The caching allocator must not hand this memory to the training stream
            # until the side-stream copy has read it.
            src.record_stream(stream)
        elif not wait and i in deferred and copier is not None:
            later.append(i)
        else:
            now.append(i)
    _copy_cpu(plan, buffer, now)
    event = None
    if streams_used:
        event = torch.cuda.Event()
        for s in streams_used[1:]:
            streams_used[0].wait_stream(s)
        event.record(streams_used[0])
    future = copier.submit(_copy_cpu, plan, buffer, later) if later else None
    snap = Snapshot(plan, buffer, event, future)
    if wait:
        snap.wait()
    return snap
