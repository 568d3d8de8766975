"""Host staging memory and the snapshot copy (the fence between training and IO).

``StagingPool`` hands out reusable uint8 host buffers (pinned when CUDA is present,
so device-to-host copies are real DMA). ``take_snapshot`` copies every planned array
into one buffer: CPU tensors and ndarrays with a plain copy, CUDA tensors on a side
stream. Both run on the training thread inside ``save_async``; the pool is also
touched by the background writer thread (``release``), hence the lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from .plan import SavePlan
from .tree import parse_array_dtype


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
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin_memory)
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
    """A plan plus the staging buffer that holds its bytes; ``ready`` fires when copies land."""

    plan: SavePlan
    buffer: torch.Tensor
    cuda_event: Optional["torch.cuda.Event"] = None
    _done: bool = field(default=False)

    def wait(self) -> None:
        """Block until every copy into the buffer is complete (idempotent)."""
        if not self._done and self.cuda_event is not None:
            self.cuda_event.synchronize()
        self._done = True

    def view(self) -> memoryview:
        """The staging bytes as a writable memoryview, for the IO layer."""
        return memoryview(self.buffer.numpy()).cast("B")


_side_streams: dict[int, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def take_snapshot(plan: SavePlan, buffer: torch.Tensor, wait: bool = True) -> Snapshot:
    """Copy every array of ``plan`` into ``buffer``. With ``wait`` the copies are complete
    on return; otherwise ``Snapshot.wait()`` (or the returned event) says when."""
    host = buffer.numpy()
    event = None
    streams_used = []
    for ref, offset in zip(plan.arrays, plan.offsets):
        if ref.nbytes == 0:
            continue
        kind, dtype, _ = parse_array_dtype(ref.dtype)
        value = ref.value
        if kind == "numpy":
            dst = host[offset:offset + ref.nbytes].view(dtype).reshape(ref.shape)
            np.copyto(dst, value, casting="no")
            continue
        dst = buffer[offset:offset + ref.nbytes].view(dtype).view(ref.shape)
        if value.device.type == "cuda":
            stream = _side_stream(value.device)
            if stream not in streams_used:
                # Copies must see every kernel already queued on the training stream.
                stream.wait_stream(torch.cuda.current_stream(value.device))
                streams_used.append(stream)
            with torch.cuda.stream(stream):
                dst.copy_(value.detach(), non_blocking=True)
                # The caching allocator must not hand this memory to the training
                # stream until the side-stream copy has read it.
                value.record_stream(stream)
        else:
            dst.copy_(value.detach())
    if streams_used:
        event = torch.cuda.Event()
        for s in streams_used[1:]:
            streams_used[0].wait_stream(s)
        event.record(streams_used[0])
    snap = Snapshot(plan, buffer, event)
    if wait:
        snap.wait()
    return snap
