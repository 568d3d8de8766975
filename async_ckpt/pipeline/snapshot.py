"""Host staging memory and the snapshot copy (the fence between training and IO).

``StagingPool`` hands out reusable uint8 host buffers (pinned when CUDA is present,
so device-to-host copies are real DMA). :func:`copy_into` copies every planned array of
a :class:`Snapshot` into its buffer: CPU tensors and ndarrays with a plain copy (or the
native stager), CUDA tensors on a side stream in groups. The manager's ``save_async``
builds the Snapshot and calls ``copy_into`` on the training thread, after queueing the
write: the writer takes the chunks that thread staged as soon as its copy is done, CUDA
groups as their events fire, and in lazy mode the rest of the copy, which finishes on the
manager's copier thread, chunk by chunk. The pool is also touched by the background
writer thread (``release``), hence its lock. ``take_snapshot`` is the one-call form for
synchronous writers (fix, tests).
"""

from __future__ import annotations

import bisect
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from ..format.dtypes import parse_array_dtype
from ..format.tree import ArrayTable
from ..options import ranks_per_node
from ..storage.base import KnownCrcs
from . import device_copy
from .huge_pages import HugePageTidier
from .plan import SavePlan

if TYPE_CHECKING:
    from .early_stage import EarlyStage


PAGE = 4096


class StagingPool:
    """A small set of reusable host buffers; at most one per in-flight save.

    Buffers are pinned when CUDA is present, up to ``pinned_limit`` bytes in all: a buffer
    that would pass the limit is allocated in pageable memory instead (its device-to-host
    copies are then synchronous), with one warning. With a ``tidier``, pageable buffers move
    onto huge pages while they are free (see :mod:`.huge_pages`).
    """

    def __init__(self, pin_memory: Optional[bool] = None, slack: float = 0.125,
                 pinned_limit: Optional[int] = None, tidier: Optional[HugePageTidier] = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.pinned_limit = pinned_limit
        self._slack = slack
        self._free: list[torch.Tensor] = []
        self._pinned: set[int] = set()     # data_ptr of every live pinned buffer
        self._used: dict[int, int] = {}     # data_ptr → most bytes any user asked of the buffer
        self._tidier = tidier
        self._lock = threading.Lock()
        self._warned = False
        self.allocations = 0          # how many buffers were ever allocated (tests watch growth)
        self.allocated_bytes = 0
        self.pinned_bytes = 0

    def acquire(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fitting = [b for b in self._free if b.numel() >= nbytes]
            buf = min(fitting, key=lambda b: b.numel()) if fitting else None
            if buf is not None:
                self._unfree(buf)
                self._used[buf.data_ptr()] = max(self._used.get(buf.data_ptr(), 0), nbytes)
                if self._tidier is not None:
                    self._tidier.claim(buf)
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
            self._used[buf.data_ptr()] = nbytes
            if pin:
                self._pinned.add(buf.data_ptr())
                self.pinned_bytes += size
        return buf

    @staticmethod
    def _allocate(nbytes: int, pin: bool) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def _unfree(self, buf: torch.Tensor) -> None:
        """Take ``buf`` out of the free list (lock held). By identity: ``list.remove``
        compares tensors with ``==``, element by element, and raises on another size."""
        for i, b in enumerate(self._free):
            if b is buf:
                del self._free[i]
                return
        raise ValueError("buffer is not in the free list")

    def _forget(self, buf: torch.Tensor) -> None:
        """Drop a free buffer (lock held)."""
        self._unfree(buf)
        self.allocated_bytes -= buf.numel()
        self._used.pop(buf.data_ptr(), None)
        if self._tidier is not None:
            self._tidier.forget(buf)
        if buf.data_ptr() in self._pinned:
            self._pinned.discard(buf.data_ptr())
            self.pinned_bytes -= buf.numel()

    def release(self, buf: torch.Tensor, tidy: bool = True) -> None:
        """Give ``buf`` back; ``tidy=False`` keeps it off the huge-page tidier for now (a
        restore's scratch: the tidying would compete with the training that follows it)."""
        with self._lock:
            self._free.append(buf)
            # Offered under the lock: a save that takes the buffer right after claims it back.
            if tidy and self._tidier is not None and buf.data_ptr() not in self._pinned:
                self._tidier.offer(buf, self._used.get(buf.data_ptr(), 0))

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

    @property
    def copied(self) -> bool:
        """Every copy has landed without error: fencing it would do nothing."""
        return self._all_done.is_set() and self._error is None

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


def _values(plan: SavePlan) -> Sequence[Any]:
    arrays = plan.arrays
    return arrays.values if isinstance(arrays, ArrayTable) else [a.value for a in arrays]


def _host_addresses(plan: SavePlan, indices: np.ndarray) -> np.ndarray:
    """Per index, the address of the array's bytes if it is plain host memory, else -1,
    read now from the values (not from what encoding saw)."""
    values = _values(plan)
    found = (values[i] for i in indices.tolist())
    return np.fromiter((_data_ptr(v) if _is_plain_host(v) else -1 for v in found), np.int64, len(indices))


def _offsets_and_lengths(plan: SavePlan) -> tuple[np.ndarray, np.ndarray]:
    """Every array's staging offset and length, as int64 (the layout's, computed once)."""
    if plan.layout is not None:
        return plan.layout.offset_array, plan.layout.nbytes_array
    return np.array(plan.offsets, np.int64), np.array([a.nbytes for a in plan.arrays], np.int64)


def _copy_cpu(plan: SavePlan, buffer: torch.Tensor, indices: Sequence[int], gate=None,
              floor: float = float("inf"), addresses: Optional[np.ndarray] = None) -> None:
    """Copy ``indices`` (ascending offsets) and open the gate behind the copy front.

    ``addresses[k]`` is where array ``indices[k]``'s bytes are when they are plain host
    memory, else -1: what encoding saw, valid only on the training thread before the
    caller's code runs again; without it (the copier thread) they are read here. Plain
    arrays go to the native stager in one batch (a memcpy each, shared among
    ``_STAGE_THREADS`` threads, GIL released, no per-tensor Python views); the rest
    (strided views) are copied first, through torch/numpy. Everything below the next
    array still to copy, and below ``floor`` (the first byte somebody else still has to
    copy), is staged, so those chunks may be written.
    """
    index = np.asarray(indices, dtype=np.int64)
    if addresses is None:
        addresses = _host_addresses(plan, index)
    host = buffer.numpy()
    for i in index[addresses < 0].tolist():
        _copy_one(plan, buffer, host, i)
    plain = addresses >= 0
    index = index[plain]
    all_offsets, all_lengths = _offsets_and_lengths(plan)
    batch = _Batch(host, addresses[plain], all_offsets[index], all_lengths[index], plan.chunk_ends, gate, floor)
    batch.stage(0, len(index))


def _stage_threads() -> int:
    """Copiers for one snapshot: this rank's share of the node's cores, at most 4."""
    return max(1, min(4, (os.cpu_count() or 1) // ranks_per_node()))


# Every plain array, small or large, goes to the native stager, shared among this many
# threads (GIL released, no per-tensor Python). On the 2-core dev VM, eager saves while the
# writer streams (interleaved, median of 5-8): a transformer + AdamW state (1-7 MiB tensors)
# stalled 34 ms on one thread, 26 ms on two; 32 MiB bf16 tensors 54 ms through torch's
# per-tensor multi-threaded copy, 50 ms natively on two threads; 64 MiB fp32 tensors 97
# vs 88 ms.
_STAGE_THREADS = _stage_threads()


class _Batch:
    """Plain host arrays in staging order, handed to the native stager a run at a time."""

    def __init__(self, host: np.ndarray, addresses: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                 chunk_ends: Sequence[int], gate, floor: float) -> None:
        self.host, self.gate, self.floor = host, gate, floor
        self.offsets, self.lengths = offsets, lengths
        self.chunk_ends = chunk_ends if gate is not None else []
        self._regions = (addresses.astype(np.uint64), offsets.astype(np.uint64), lengths.astype(np.uint64))

    def stage(self, a: int, b: int) -> None:
        """memcpy arrays [a, b); the gate opens up to the next array's offset (or floor)."""
        from .. import native

        if a >= b:
            return
        limit = min(int(self.offsets[b]), self.floor) if b < len(self.offsets) else self.floor
        srcs, offsets, lengths = self._regions
        native.stage(self.host, srcs[a:b], offsets[a:b], lengths[a:b], self.chunk_ends, self.gate,
                     _UINT64_MAX if limit == float("inf") else int(limit), _STAGE_THREADS)


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
              copier: Optional[Executor] = None, recorded_addresses: bool = True,
              early: Optional[EarlyStage] = None) -> None:
    """Copy every array of the snapshot's plan into its buffer.

    Eager (``wait``): every copy is complete on return. Lazy: CPU arrays whose index is in
    ``deferred`` are copied by ``copier`` in the background and CUDA copies are left
    running on a side stream; the caller must ``fence`` the snapshot before anything
    mutates a deferred array. CUDA arrays not in ``deferred`` are first cloned on the
    training stream, so kernels queued later (e.g. BatchNorm statistics) cannot race.
    With a gate, the chunks this thread staged are released to the writer once its copy is
    done; CUDA groups and the lazy copier's chunks are released as they land.
    Raises the copy's error after cancelling the gate.

    Runs on the training thread right after ``plan_save``, with none of the caller's code
    in between: the host addresses encoding recorded are still those of the arrays' bytes.
    A caller that may have let other code run since (it waited for a free staging slot)
    passes ``recorded_addresses=False``, and they are read again.

    ``early`` is the copy that ran while the plan was being made: what it staged is not
    copied again if its guessed layout was the plan's, and is overwritten otherwise. It
    has finished when this returns or raises.
    """
    plan, buffer, gate = snap.plan, snap.buffer, snap.gate
    host = buffer.numpy()
    later = np.zeros(0, np.int64)
    try:
        already = early.finish(plan) if early is not None else None
        if early is not None and already is None:
            early.wait()        # a wrong guess: its copies land before the right ones
        staged, addresses = _staged(plan, recorded_addresses)
        # Whatever is not plain host memory is looked at one by one: CUDA, strided, lazy bits.
        cuda = np.zeros(len(staged), bool)
        values = _values(plan)
        for k in np.flatnonzero(addresses < 0).tolist():
            v = values[staged[k]]
            cuda[k] = isinstance(v, torch.Tensor) and v.device.type == "cuda"
        deferring = not wait and copier is not None and bool(deferred)
        postponed = _members(staged, deferred, len(plan.arrays)) & ~cuda if deferring else np.zeros_like(cuda)
        now = ~(cuda | postponed)
        if already is not None:
            now &= ~already[staged]
        on_device, later = staged[cuda].tolist(), staged[postponed]
        offsets, _ = _offsets_and_lengths(plan)
        cuda_floor = float(offsets[on_device[0]]) if on_device else float("inf")
        if on_device:
            snap.cuda_marks = device_copy.enqueue(
                plan, host, on_device, lambda i: _host_destination(plan, buffer, host, i)[1],
                clone=lambda i: not wait and i not in deferred)
        later_floor = min(cuda_floor, float(offsets[later[0]])) if len(later) else cuda_floor
        # The training thread's copy opens no chunk while it runs: writers streaming behind it
        # take memory bandwidth and cores from it. A trade measured on the 2-core dev VM:
        # interleaved in one process (median of 6-10), the stall drops by 3.4 ms on a
        # transformer + AdamW (24.5 -> 21.1) and 3.7 ms on bf16 weights (47.0 -> 43.3), and
        # the commit grows by 8 and 18 ms (157 -> 165, 310 -> 328): the writer's checksums
        # no longer overlap the copy. Separate runs: fp32 stall 62 -> 49 ms. Training waits
        # for the stall; only the background waits for the commit.
        _copy_cpu(plan, buffer, staged[now], None, later_floor, addresses[now])
    except BaseException as e:
        if early is not None:
            early.wait()
        snap._fail(e)
        raise
    if early is not None:
        early.wait()
    if wait or (not len(later) and not snap.cuda_marks):
        snap._finish()
        return
    if gate is not None:         # what the training thread staged, below the first byte still to come
        gate.advance(bisect.bisect_right(plan.chunk_ends, later_floor))
    if copier is None:           # lazy without a background thread: finish here
        _finish_later(snap, later, cuda_floor)
    else:
        copier.submit(_finish_later, snap, later, cuda_floor)


def _staged(plan: SavePlan, recorded: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The arrays to copy (with bytes, laid out on this rank) in ascending offset, and
    where each one's bytes are when they are plain host memory (else -1): as encoding
    recorded them when ``recorded``, else read now."""
    arrays = plan.arrays
    if plan.layout is not None and isinstance(arrays, ArrayTable):    # plan_save's plans
        staged = plan.layout.staged
        if not recorded:
            return staged, _host_addresses(plan, staged)
        return staged, np.array(arrays.host, dtype=np.int64)[staged]
    stored_elsewhere = plan.stored_by
    staged = np.array(sorted((i for i, a in enumerate(arrays) if a.nbytes and i not in stored_elsewhere),
                             key=plan.offsets.__getitem__), dtype=np.int64)
    return staged, _host_addresses(plan, staged)


def _members(index: np.ndarray, chosen: frozenset[int], n: int) -> np.ndarray:
    """Per entry of ``index``: whether it is in ``chosen`` (indices below ``n``)."""
    mask = np.zeros(n, bool)
    mask[np.fromiter(chosen, np.int64, len(chosen))] = True
    return mask[index]
