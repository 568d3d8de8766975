"""Host staging memory and the snapshot copy (the fence between training and IO).

``StagingPool`` hands out reusable uint8 host buffers (pinned when CUDA is present,
so device-to-host copies are real DMA). :func:`copy_into` copies every planned array of
a :class:`Snapshot` into its buffer: CPU tensors and ndarrays with a plain copy (or the
native stager), CUDA tensors on a side stream in groups. The manager's ``save_async``
builds the Snapshot and calls ``copy_into`` on the training thread, after queueing the
write, so the writer streams chunks as the copy stages them; in lazy mode the rest of the
copy finishes on the manager's copier thread. The pool is also touched by the background
writer thread (``release``), hence its lock. ``take_snapshot`` is the one-call form for
synchronous writers (fix, tests).
"""

from __future__ import annotations

import bisect
import threading
import warnings
from concurrent.futures import Executor
from typing import Any, Optional

import numpy as np
import torch

from ..format.dtypes import parse_array_dtype
from ..storage.base import KnownCrcs
from . import device_copy
from .plan import SavePlan


PAGE = 4096


class StagingPool:
    """A small set of reusable host buffers; at most one per in-flight save.

    Buffers are pinned when CUDA is present, up to ``pinned_limit`` bytes in all: a buffer
    that would pass the limit is allocated in pageable memory instead (its device-to-host
    copies are then synchronous), with one warning.
    """

    def __init__(self, pin_memory: Optional[bool] = None, slack: float = 0.125,
                 pinned_limit: Optional[int] = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.pinned_limit = pinned_limit
        self._slack = slack
        self._free: list[torch.Tensor] = []
        self._pinned: set[int] = set()     # data_ptr of every live pinned buffer
        self._lock = threading.Lock()
        self._warned = False
        self.allocations = 0          # how many buffers were ever allocated (tests watch growth)
        self.allocated_bytes = 0
        self.pinned_bytes = 0

    def acquire(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fitting = [b for b in self._free if b.numel() >= nbytes]
            if fitting:
                buf = min(fitting, key=lambda b: b.numel())
                self._free.remove(buf)
                return buf
            if self._free:
                # Too small for this state: drop the largest so memory stays bounded.
                self._forget(max(self._free, key=lambda b: b.numel()))
            # Headroom so a state that grows a little (a new optimizer moment) reuses the buffer.
            size = max(1, int(nbytes * (1 + self._slack)))
            pin = self.pin_memory and (self.pinned_limit is None or self.pinned_bytes + size <= self.pinned_limit)
            warn = self.pin_memory and not pin and not self._warned
            self._warned |= warn
        if warn:
            warnings.warn(f"async_ckpt: staging {size} bytes in pageable memory: max_pinned_bytes="
                          f"{self.pinned_limit} would be exceeded, so device-to-host copies of such "
                          "saves are synchronous", RuntimeWarning, stacklevel=3)
        # Page-aligned start: the native writer's O_DIRECT path then writes straight from the
        # buffer instead of copying every slice through an aligned bounce buffer (measured on
        # the 2-core dev VM: 0.28 -> 0.15 s of writer CPU per GiB, benchmarks/io.py).
        base = self._allocate(size + PAGE, pin)
        skip = -base.data_ptr() % PAGE
        buf = base[skip:skip + size]
        with self._lock:
            self.allocations += 1
            self.allocated_bytes += size
            if pin:
                self._pinned.add(buf.data_ptr())
                self.pinned_bytes += size
        return buf

    @staticmethod
    def _allocate(nbytes: int, pin: bool) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def _forget(self, buf: torch.Tensor) -> None:
        """Drop a free buffer (lock held)."""
        self._free.remove(buf)
        self.allocated_bytes -= buf.numel()
        if buf.data_ptr() in self._pinned:
            self._pinned.discard(buf.data_ptr())
            self.pinned_bytes -= buf.numel()

    def release(self, buf: torch.Tensor) -> None:
        with self._lock:
            self._free.append(buf)

    def clear(self) -> None:
        with self._lock:
            for b in list(self._free):
                self._forget(b)


class Snapshot:
    """A plan, the staging buffer that receives its bytes, and the state of the copy.

    Copies may still be running when ``save_async`` returns: in lazy mode the background
    copier finishes the CPU copies, and CUDA copies run on a side stream in groups, each
    ending with the event of a :class:`~async_ckpt.device_copy.CudaMark`. ``gate`` (a native
    Gate) tells the writer which chunks are staged, so writing starts while copying goes on.
    ``crcs`` carries the chunk checksums computed on the GPU (the writer skips its pass
    for those chunks). ``wait`` blocks until every byte is staged (the
    background writer and ``wait_for_snapshot`` call it); ``fence`` is what the training
    thread calls before mutating fenced tensors (optimizer step pre-hook): it blocks on CPU
    copies but only orders the current CUDA stream after the last copy event.
    """

    def __init__(self, plan: SavePlan, buffer: torch.Tensor, gate=None) -> None:
        self.plan = plan
        self.buffer = buffer
        self.gate = gate
        self.cuda_marks: list = []                      # device_copy.CudaMark, in stream order
        self.crcs = KnownCrcs.none(len(plan.chunks))     # filled by _finish, group by group
        self._cpu_done = threading.Event()
        self._all_done = threading.Event()
        self._error: Optional[BaseException] = None

    def wait(self) -> None:
        """Block until every copy into the buffer is complete; re-raise a copy error."""
        self._all_done.wait()
        if self._error is not None:
            raise self._error

    def fence(self) -> None:
        """Make later work on the training thread/stream unable to race the copies."""
        self._cpu_done.wait()
        if self._error is not None:
            raise self._error
        if self.cuda_marks and not self._all_done.is_set():
            torch.cuda.current_stream().wait_event(self.cuda_marks[-1].event)

    def view(self) -> memoryview:
        """The staging bytes as a writable memoryview, for the IO layer."""
        return memoryview(self.buffer.numpy()).cast("B")

    def _fail(self, error: BaseException) -> None:
        self._error = error
        if self.gate is not None:
            self.gate.cancel()
        self._cpu_done.set()
        self._all_done.set()

    def _finish(self) -> None:
        """Runs once every CPU copy is done: release CUDA groups to the writer as they land."""
        self._cpu_done.set()
        ends = self.plan.chunk_ends
        for mark in self.cuda_marks:
            mark.event.synchronize()
            if mark.crcs is not None:   # words first, flags second, then the gate
                self.crcs.values[mark.chunks] = mark.crcs.numpy().view(np.uint32)
                self.crcs.known[mark.chunks] = True
            mark.keep = None                 # the stream is past it: pinned memory may go
            if self.gate is not None:
                self.gate.advance(bisect.bisect_right(ends, mark.front))
        if self.gate is not None:
            self.gate.advance(len(self.plan.chunks))
        self._all_done.set()


def _host_destination(plan: SavePlan, buffer: torch.Tensor, host: np.ndarray, index: int):
    ref, offset = plan.arrays[index], plan.offsets[index]
    kind, dtype, _ = parse_array_dtype(ref.dtype)
    if kind == "numpy":
        return kind, host[offset:offset + ref.nbytes].view(dtype).reshape(ref.shape)
    return kind, buffer[offset:offset + ref.nbytes].view(dtype).view(ref.shape)


def _is_plain_host(value: Any) -> bool:
    """Contiguous host memory whose bytes are the value (the native stager can memcpy it)."""
    if isinstance(value, torch.Tensor):
        return (value.device.type == "cpu" and value.is_contiguous() and not value.is_conj()
                and not value.is_neg())
    return isinstance(value, np.ndarray) and value.flags.c_contiguous


def _copy_cpu(plan: SavePlan, buffer: torch.Tensor, indices: list[int], gate=None,
              floor: float = float("inf")) -> None:
    """Copy ``indices`` (ascending offsets) and open the gate behind the copy front.

    Small contiguous host arrays go to the native stager in batches (a memcpy each, GIL
    released, no per-tensor Python views); large ones go through torch/numpy, whose copy
    is multi-threaded; strided views are copied first. Everything below the next array
    still to copy, and below ``floor`` (the first byte somebody else still has to copy),
    is staged, so those chunks may be written.
    """
    from .. import native

    host = buffer.numpy()
    ends = plan.chunk_ends
    ordered: list[int] = []
    for i in indices:
        if _is_plain_host(plan.arrays[i].value):
            ordered.append(i)
        else:
            _copy_one(plan, buffer, host, i)
    batch: list[int] = []

    def flush(front: float) -> None:
        if not batch:
            return
        srcs = np.fromiter((_data_ptr(plan.arrays[i].value) for i in batch), np.uint64, len(batch))
        offsets = np.fromiter((plan.offsets[i] for i in batch), np.uint64, len(batch))
        lengths = np.fromiter((plan.arrays[i].nbytes for i in batch), np.uint64, len(batch))
        limit = min(front, floor)
        native.stage(host, srcs, offsets, lengths, ends if gate is not None else [], gate,
                     _UINT64_MAX if limit == float("inf") else int(limit))
        batch.clear()

    for pos, i in enumerate(ordered):
        if plan.arrays[i].nbytes < _NATIVE_BELOW:
            batch.append(i)
            continue
        flush(plan.offsets[i])
        _copy_one(plan, buffer, host, i)
        if gate is not None:
            front = plan.offsets[ordered[pos + 1]] if pos + 1 < len(ordered) else floor
            gate.advance(bisect.bisect_right(ends, min(front, floor)))
    flush(floor)


# Below this size the per-tensor cost of torch's copy (views, dispatch) dominates and one
# native memcpy batch wins; above it torch's multi-threaded copy is faster than one memcpy.
_NATIVE_BELOW = 1 << 20


def _copy_one(plan: SavePlan, buffer: torch.Tensor, host: np.ndarray, index: int) -> None:
    kind, dst = _host_destination(plan, buffer, host, index)
    value = plan.arrays[index].value
    if kind == "numpy":
        np.copyto(dst, value, casting="no")
    else:
        dst.copy_(value.detach())


_UINT64_MAX = (1 << 64) - 1


def _data_ptr(value: Any) -> int:
    return value.data_ptr() if isinstance(value, torch.Tensor) else value.ctypes.data


def _finish_later(snap: Snapshot, later: list[int], floor: float) -> None:
    try:
        _copy_cpu(snap.plan, snap.buffer, later, snap.gate, floor)
        snap._finish()
    except BaseException as e:
        snap._fail(e)


def take_snapshot(plan: SavePlan, buffer: torch.Tensor, wait: bool = True,
                  deferred: frozenset[int] = frozenset(), copier: Optional[Executor] = None,
                  gate=None) -> Snapshot:
    """Build a Snapshot of ``plan`` in ``buffer`` and run :func:`copy_into` on it."""
    snap = Snapshot(plan, buffer, gate)
    copy_into(snap, wait, deferred, copier)
    return snap


def copy_into(snap: Snapshot, wait: bool = True, deferred: frozenset[int] = frozenset(),
              copier: Optional[Executor] = None) -> None:
    """Copy every array of the snapshot's plan into its buffer.

    Eager (``wait``): every copy is complete on return. Lazy: CPU arrays whose index is in
    ``deferred`` are copied by ``copier`` in the background and CUDA copies are left
    running on a side stream; the caller must ``fence`` the snapshot before anything
    mutates a deferred array. CUDA arrays not in ``deferred`` are first cloned on the
    training stream, so kernels queued later (e.g. BatchNorm statistics) cannot race.
    With a gate, chunks are released to the writer as soon as their bytes are staged.
    Raises the copy's error after cancelling the gate.
    """
    plan, buffer, gate = snap.plan, snap.buffer, snap.gate
    now: list[int] = []
    later: list[int] = []
    on_device: list[int] = []
    host = buffer.numpy()
    try:
        stored_elsewhere = plan.stored_by
        for i, ref in enumerate(plan.arrays):
            if ref.nbytes == 0 or i in stored_elsewhere:
                continue
            value = ref.value
            if isinstance(value, torch.Tensor) and value.device.type == "cuda":
                on_device.append(i)
            elif not wait and i in deferred and copier is not None:
                later.append(i)
            else:
                now.append(i)
        # Copies advance the gate front to back: walk the staging layout in offset order
        # (the plan puts frozen parameters last, whatever their index).
        by_offset = plan.offsets.__getitem__
        now.sort(key=by_offset)
        later.sort(key=by_offset)
        on_device.sort(key=by_offset)
        cuda_floor = float(plan.offsets[on_device[0]]) if on_device else float("inf")
        if on_device:
            snap.cuda_marks = device_copy.enqueue(
                plan, host, on_device, lambda i: _host_destination(plan, buffer, host, i)[1],
                clone=lambda i: not wait and i not in deferred)
        later_floor = min(cuda_floor, plan.offsets[later[0]]) if later else cuda_floor
        _copy_cpu(plan, buffer, now, gate, later_floor)
    except BaseException as e:
        snap._fail(e)
        raise
    if wait or (not later and not snap.cuda_marks):
        snap._finish()
    elif copier is None:         # lazy without a background thread: finish here
        _finish_later(snap, later, cuda_floor)
    else:
        copier.submit(_finish_later, snap, later, cuda_floor)
