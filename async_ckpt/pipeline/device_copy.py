"""Device-to-host copies of a snapshot's CUDA tensors, in groups the writer can start on.

Called by :func:`async_ckpt.snapshot.copy_into` on the training thread inside ``save_async``.
The CUDA arrays of a plan are cut into groups of about ``GROUP_BYTES`` that end on chunk
boundaries. For each group the copy side stream of the device (which first waits for the
training stream) copies the arrays into the pinned staging buffer while, where the CUDA
checksum module is usable, a second side stream computes the crc32c of every chunk made
only of this group's bytes from the same device tensors (:mod:`async_ckpt.device_crc`);
the copy stream then waits for those checksums (long done: the kernel outruns PCIe) and
records an event. Each group becomes a
:class:`CudaMark`; the snapshot's finisher waits for the marks in order and opens the
writer's gate behind each one, so writing starts after the first group instead of after
the last, and chunks with device checksums skip the host checksum pass.

The grouping and the chunk bookkeeping are plain functions of the plan so that they are
tested without a GPU (tests/test_device_copy.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import device_crc
from .plan import SavePlan

GROUP_BYTES = 64 << 20


@dataclass
class CudaMark:
    """One group of queued copies: once ``event`` fired, every CUDA byte below ``front``
    in the staging buffer is copied and ``crcs`` (pinned words, one per entry of ``chunks``)
    hold the device checksums of ``chunks``."""

    event: Any
    front: float
    crcs: Any = None
    chunks: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    keep: Any = None        # pinned memory the stream still reads until ``event``


def plan_groups(plan: SavePlan, indices: Sequence[int], group_bytes: int = GROUP_BYTES) -> list[list[int]]:
    """Split ``indices`` (arrays with bytes, ascending offsets) into groups of at least
    ``group_bytes`` (the last may be smaller) that never split a chunk between two groups."""
    groups: list[list[int]] = []
    current: list[int] = []
    size = 0
    for pos, i in enumerate(indices):
        current.append(i)
        size += plan.arrays[i].nbytes
        nxt = indices[pos + 1] if pos + 1 < len(indices) else None
        if nxt is None:
            break
        if size >= group_bytes and plan.parts[i][-1][0] != plan.parts[nxt][0][0]:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def device_checked_chunks(plan: SavePlan, groups: Sequence[Sequence[int]],
                          eligible: set[int]) -> list[list[int]]:
    """Per group, the chunks whose every byte comes from ``eligible`` arrays of that group."""
    owner: dict[int, int] = {}
    group_of = {i: g for g, group in enumerate(groups) for i in group}
    for i, parts in enumerate(plan.parts):
        g = group_of.get(i, -1) if i in eligible else -1
        for chunk, _, _ in parts:
            owner[chunk] = g if owner.get(chunk, g) == g else -1
    per_group: list[list[int]] = [[] for _ in groups]
    for chunk, g in sorted(owner.items()):
        if g >= 0:
            per_group[g].append(chunk)
    return per_group


def chunk_pieces(plan: SavePlan, chunks: Sequence[int], group: Sequence[int],
                 sources: dict[int, int]) -> tuple[list, list[tuple[int, int]]]:
    """Pieces [address, length, offset in chunk, local chunk index] of ``chunks`` (made only of
    arrays in ``group``, at device addresses ``sources``), and the staging ranges of those
    chunks that no piece covers (alignment padding, to be zeroed)."""
    local = {c: k for k, c in enumerate(chunks)}
    rows: list[tuple[int, int, int, int]] = []
    covered: dict[int, list[tuple[int, int]]] = {c: [] for c in chunks}
    for i in group:
        pos = 0
        for chunk, offset, length in plan.parts[i]:
            if chunk in local:
                rows.append((sources[i] + pos, length, offset, local[chunk]))
                covered[chunk].append((offset, offset + length))
            pos += length
    gaps = []
    for c in chunks:
        start, cursor = plan.chunks[c].start, 0
        for a, b in sorted(covered[c]):
            if a > cursor:
                gaps.append((start + cursor, start + a))
            cursor = max(cursor, b)
        if cursor < plan.chunks[c].length:
            gaps.append((start + cursor, start + plan.chunks[c].length))
    return rows, gaps


_side_streams: dict[tuple[int, str], Any] = {}


def side_stream(device, role: str = "copy") -> Any:
    """The process's side stream of ``device`` for ``role`` ("copy": device-to-host copies,
    "crc": checksum kernels, which then overlap the copies instead of queueing behind them)."""
    import torch
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (index, role) not in _side_streams:
        _side_streams[(index, role)] = torch.cuda.Stream(device=index)
    return _side_streams[(index, role)]


def _plain(t) -> bool:
    """Its device memory holds exactly its bytes, in order (the kernel reads it directly)."""
    return t.is_contiguous() and not t.is_conj() and not t.is_neg()


def enqueue(plan: SavePlan, host: np.ndarray, indices: Sequence[int], destination,
            clone: Callable[[int], bool], group_bytes: int = GROUP_BYTES) -> list[CudaMark]:
    """Queue the copies (and device checksums) of CUDA arrays ``indices``; return the marks.

    ``destination(i)`` is the staging view array ``i`` is copied into; arrays for which
    ``clone(i)`` is true are first cloned on the training stream (their tensors may change
    before the copy runs). Must run on the training thread: the side streams wait for the
    current stream of each device here.
    """
    import torch

    sources: dict[int, Any] = {}
    for i in indices:
        src = plan.arrays[i].value.detach()
        sources[i] = src.clone() if clone(i) else src
    devices = sorted({plan.arrays[i].value.device.index or 0 for i in indices})
    streams = {d: side_stream(torch.device("cuda", d)) for d in devices}
    for d, s in streams.items():
        # After the clones: the copies must see them and every kernel queued before.
        s.wait_stream(torch.cuda.current_stream(d))
    # Several devices share one ordering point (the first stream): one group, host checksums.
    single = len(devices) == 1
    groups = plan_groups(plan, indices, group_bytes) if single else [list(indices)]
    use_crc = single and device_crc.available(devices[0])
    eligible = {i for i in indices if _plain(sources[i])} if use_crc else set()
    checked = device_checked_chunks(plan, groups, eligible) if use_crc else [[] for _ in groups]
    crc_stream = None
    if use_crc:
        crc_stream = side_stream(torch.device("cuda", devices[0]), "crc")
        crc_stream.wait_stream(torch.cuda.current_stream(devices[0]))

    marks: list[CudaMark] = []
    first = streams[devices[0]]
    try:
        for g in range(len(groups)):
            marks.append(_enqueue_group(plan, host, groups, g, sources, streams, first, destination,
                                        checked[g] if use_crc else [], devices[0], crc_stream))
            if marks[-1].crcs is None and len(checked[g]):
                use_crc = False                       # the launch failed: host checksums from here
    except BaseException:
        # Nothing may still be writing into the staging buffer once the caller releases it.
        for s in list(streams.values()) + ([crc_stream] if crc_stream is not None else []):
            with contextlib.suppress(Exception):
                s.synchronize()
        raise
    return marks


def _enqueue_group(plan: SavePlan, host: np.ndarray, groups, g: int, sources: dict, streams: dict, first,
                   destination, checked: Sequence[int], device: int, crc_stream) -> CudaMark:
    """Copies of group ``g`` on the copy stream(s); checksums on ``crc_stream``, overlapping
    them (both read the device tensors); the mark's event on ``first`` follows both."""
    import torch

    group = groups[g]
    for i in group:
        src = sources[i]
        stream = streams[src.device.index or 0]
        with torch.cuda.stream(stream):
            destination(i).copy_(src, non_blocking=True)
        # The caching allocator must not hand this memory to the training stream until the
        # side stream has read it.
        src.record_stream(stream)
    crcs, keep, chunks = None, None, np.asarray(checked, dtype=np.int64)
    if len(chunks):
        launched = _launch_crc(plan, host, chunks, group, sources, crc_stream, device)
        if launched is None:
            chunks = np.zeros(0, np.int64)
        else:
            crcs, keep = launched
            for i in group:
                sources[i].record_stream(crc_stream)
            first.wait_stream(crc_stream)
    for s in list(streams.values())[1:]:
        first.wait_stream(s)
    event = torch.cuda.Event()
    event.record(first)
    front = plan.offsets[groups[g + 1][0]] if g + 1 < len(groups) else float("inf")
    return CudaMark(event, front, crcs, chunks, keep)


def _launch_crc(plan: SavePlan, host: np.ndarray, chunks: np.ndarray, group: Sequence[int],
                sources: dict, stream, device: int):
    """Queue the device checksums of ``chunks``: (words, workspace), or None (and the device
    path off) on failure."""

    rows, gaps = chunk_pieces(plan, chunks.tolist(), group, {i: sources[i].data_ptr() for i in group})
    for a, b in gaps:        # alignment padding between arrays counts as zeros on both sides
        host[a:b] = 0
    try:
        return device_crc.launch(device_crc.pieces_array(rows), [plan.chunks[c].length for c in chunks],
                                 stream, device)
    except Exception as exc:
        device_crc.disable(device, str(exc))
        return None

