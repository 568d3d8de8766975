"""Turn a state mapping into an immutable save plan: tree, items, staging layout, chunks.

Planning never touches storage and storage never learns what a tensor means: the
plan maps every array to a byte range of one staging buffer and cuts that buffer
into size-bounded chunks (large arrays split across chunks, small ones packed
into slabs). Called on the training thread inside ``save_async``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ..format.manifest import ItemEntry
from ..format.tree import ArrayObserver, ArrayRef, ArrayTable, encode_table

# Every array starts at a multiple of this in the staging buffer, so a byte view of it can
# be reinterpreted as any dtype (complex128 has the largest item size, 16).
ALIGN = 16
CHUNK_ALIGN = 4096

_NAME_KINDS = {
    "model": "model", "module": "model", "net": "model",
    "optimizer": "optimizer", "optim": "optimizer",
    "scheduler": "scheduler", "lr_scheduler": "scheduler", "sched": "scheduler",
    "progress": "progress", "trainer_state": "progress", "training_state": "progress",
    "data": "data", "sampler": "data", "dataloader": "data", "data_loader": "data",
    "rng": "rng", "config": "config", "tokenizer": "tokenizer", "scaler": "scaler",
}


def item_kind(name: str, value: Any) -> str:
    """The manifest kind of a top-level item: from its type first, then its name."""
    if isinstance(value, torch.nn.Module):
        return "model"
    if isinstance(value, torch.optim.Optimizer):
        return "optimizer"
    if isinstance(value, torch.optim.lr_scheduler.LRScheduler):
        return "scheduler"
    if isinstance(value, (torch.utils.data.Sampler, torch.utils.data.DataLoader)):
        return "data"
    type_name = type(value).__name__
    if "GradScaler" in type_name:
        return "scaler"
    if "DataLoader" in type_name or "Sampler" in type_name:
        return "data"
    return _NAME_KINDS.get(name.lower(), "other")


def _type_name(value: Any) -> str:
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}"


@dataclass(frozen=True)
class ChunkPlan:
    start: int          # byte offset in the staging buffer
    length: int
    shuffle: int        # element size for byte-shuffle when compressing, 0 for mixed slabs


@dataclass(frozen=True)
class SavePlan:
    tree: Any
    items: dict[str, ItemEntry]
    arrays: Sequence[ArrayRef]                       # an ArrayTable from plan_save (columns: .values, ...)
    offsets: tuple[int, ...]                         # staging offset of each array
    chunks: tuple[ChunkPlan, ...]
    parts: tuple[tuple[tuple[int, int, int], ...], ...]   # per array: (chunk, offset, length)
    staging_bytes: int
    chunk_ends: tuple[int, ...] = ()                 # staging end offset of each chunk, ascending
    # Chunks [frozen_from, len(chunks)) hold only frozen parameters (requires_grad=False), laid
    # out last so storage can keep them in a file of their own and reuse it while unchanged;
    # len(chunks) when there are none.
    frozen_from: int = 0
    frozen_signature: tuple = ()                     # (address, version, nbytes) of each, in order
    frozen_arrays: tuple[int, ...] = ()              # indices of those arrays, in layout order
    # Several ranks: arrays another rank writes (identical replicas), as index → (rank, index
    # there). They are neither staged nor written here.
    stored_by: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    # The layout this plan uses, shared by every plan the LayoutCache hands it to: the copy's
    # index arrays and the writer's manifest entries hang off it (see _Layout).
    layout: Optional[_Layout] = field(default=None, compare=False, repr=False)

    @property
    def raw_bytes(self) -> int:
        arrays = self.arrays
        return sum(arrays.nbytes if isinstance(arrays, ArrayTable) else (a.nbytes for a in arrays))


def _itemsize(nbytes: int, shape: tuple[int, ...]) -> int:
    return nbytes // max(1, _numel(shape)) if nbytes else 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan_save(state: Mapping[str, Any], chunk_bytes: int,
              item_meta: Optional[Mapping[str, ItemEntry]] = None, separate_frozen: bool = True,
              cache: Optional[LayoutCache] = None,
              replicas: Optional[Any] = None, observer: Optional[ArrayObserver] = None) -> SavePlan:
    """Encode ``state`` and lay its arrays out in staging memory and chunks.

    With ``separate_frozen``, parameters with ``requires_grad=False`` of the modules in
    ``state`` are laid out last, from chunk ``frozen_from`` on (storage may reuse them).

    ``replicas(state, arrays)``, with several ranks, returns the arrays another rank writes
    (index → (rank, index)): they are left out of the layout.

    ``observer`` is told as the array table grows (see :class:`~async_ckpt.format.tree.ArrayObserver`).

    Raises TypeError naming the path of any value the format cannot hold.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping of item names to objects, got {type(state).__name__}")
    for name in state:
        if not isinstance(name, str) or not name:
            raise TypeError(f"state item names must be non-empty strings, got {name!r}")
    items = {}
    for name, value in state.items():
        meta = (item_meta or {}).get(name)
        items[name] = meta or ItemEntry(item_kind(name, value), _type_name(value))
    tree, arrays = encode_table(dict(state), observer=observer)
    n = len(arrays)
    frozen = _frozen_parameters(state) if separate_frozen else {}
    if frozen:
        is_frozen = [isinstance(v, torch.Tensor) and b > 0 and _key(v) in frozen
                     for v, b in zip(arrays.values, arrays.nbytes)]
        order = [i for i in range(n) if not is_frozen[i]]
        tail = [i for i in range(n) if is_frozen[i]]
    else:       # the common case costs nothing per array
        order, tail = list(range(n)), []

    stored_by = dict(replicas(state, arrays)) if replicas is not None else {}
    if stored_by:
        order = [i for i in order if i not in stored_by]
        tail = [i for i in tail if i not in stored_by]
    # Shards of distributed tensors get chunks of their own, apart from plain arrays: a rank
    # that reads another rank's replicas (small, plain) then never reads its shards too.
    split = len(order)
    shards = arrays.globals
    if shards and any(i in shards for i in order):
        plain = [i for i in order if i not in shards]
        order = plain + [i for i in order if i in shards]
        split = len(plain)
    # order and tail say which arrays are laid out where (frozen, replicas, shards);
    # dtypes and shapes give every size.
    key = (chunk_bytes, arrays.dtypes, arrays.shapes, order, tail, split)
    layout = cache.get(key) if cache is not None else None
    if layout is None:
        layout = _lay_out(arrays.nbytes, arrays.shapes, order, tail, chunk_bytes, split)
        if cache is not None:
            cache.put(key, layout)
    values = arrays.values
    signature = tuple((values[i].data_ptr(), values[i]._version, arrays.nbytes[i]) for i in tail)
    return SavePlan(tree, items, arrays, layout.offsets, layout.chunks, layout.parts, layout.staging_bytes,
                    layout.chunk_ends, layout.frozen_from, signature, tuple(tail), stored_by, layout)


@dataclass(frozen=True, eq=False)
class _Layout:
    """Where every array goes; shared by the plans of every save the LayoutCache matches."""

    offsets: tuple[int, ...]
    chunks: tuple[ChunkPlan, ...]
    parts: tuple[tuple[tuple[int, int, int], ...], ...]
    staging_bytes: int
    chunk_ends: tuple[int, ...]
    frozen_from: int
    # For the snapshot's copy, as int64: the arrays it copies (laid out, with bytes) in
    # staging order, which is ascending offset; every array's offset and length.
    staged: np.ndarray
    offset_array: np.ndarray
    nbytes_array: np.ndarray
    # Filled by the writer thread (saving.array_entries): (what else the entries depend on,
    # the manifest's ArrayEntry tuple), reused while that part matches.
    entries: list = field(default_factory=list)
    # Filled by the writer thread (saving.manifest_tree): (the tree's scalar kinds, the tree).
    tree: list = field(default_factory=list)


class LayoutCache:
    """The last staging layout and what it was computed from, for reuse across saves.

    A training run saves the same structure every time; the layout (offsets, chunks,
    parts) is a pure function of the arrays' dtypes and shapes, the order they are laid
    out in (which ones are frozen, stored by another rank or shards) and ``chunk_bytes``.
    :func:`plan_save` compares exactly those (C-speed list equality) and lays out afresh on
    any difference, so a stale layout is never used. The tree and items are always encoded
    afresh (they hold the step's scalars). Owned by one manager; used from the training
    thread only.
    """

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.layout: Optional[_Layout] = None
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Optional[_Layout]:
        if self.key is not None and self.key == key:
            self.hits += 1
            return self.layout
        self.misses += 1
        return None

    def put(self, key: tuple, layout: _Layout) -> None:
        self.key, self.layout = key, layout


def _lay_out(sizes: Sequence[int], shapes: Sequence[tuple[int, ...]], order: list[int], tail: list[int],
            chunk_bytes: int, split: int) -> _Layout:
    """Offsets in staging memory, size-bounded chunks and each array's parts (arrays not in
    ``order`` or ``tail`` keep offset 0 and no parts). A chunk starts at ``order[split]``."""
    n_arrays = len(sizes)
    offsets: list[int] = [0] * n_arrays
    chunks: list[ChunkPlan] = []
    parts: list[tuple[tuple[int, int, int], ...]] = [()] * n_arrays
    frozen_from: Optional[int] = None
    cursor = 0
    slab_start = 0        # start of the open slab chunk
    slab_sizes: set[int] = set()
    staged: list[int] = []    # laid out with bytes, in staging order

    def close_slab(end: int) -> None:
        nonlocal slab_start, slab_sizes
        if end > slab_start:
            shuffle = next(iter(slab_sizes)) if len(slab_sizes) == 1 else 0
            chunks.append(ChunkPlan(slab_start, end - slab_start, shuffle if shuffle in (2, 4, 8) else 0))
        slab_start = end
        slab_sizes = set()

    def start_chunk() -> None:
        # Chunks start on a page so the writer's O_DIRECT path can DMA straight from staging.
        nonlocal cursor, slab_start
        close_slab(cursor)
        cursor = -(-cursor // CHUNK_ALIGN) * CHUNK_ALIGN
        slab_start = cursor

    for pos, i in enumerate(order + tail):
        nbytes = sizes[i]
        if pos == split and 0 < split < len(order):
            start_chunk()
        if pos == len(order):
            start_chunk()                 # the frozen tail starts a chunk of its own
            frozen_from = len(chunks)
        cursor = -(-cursor // ALIGN) * ALIGN
        itemsize = _itemsize(nbytes, shapes[i])
        if nbytes == 0:
            offsets[i] = cursor
            continue
        staged.append(i)
        if nbytes > chunk_bytes:
            # A large array gets chunks of its own so restore can decode straight into it.
            start_chunk()
            offsets[i] = cursor
            own = []
            for piece in range(0, nbytes, chunk_bytes):
                length = min(chunk_bytes, nbytes - piece)
                own.append((len(chunks), 0, length))
                chunks.append(ChunkPlan(cursor + piece, length, itemsize if itemsize in (2, 4, 8) else 0))
            parts[i] = tuple(own)
            cursor += nbytes
            slab_start = cursor
            continue
        if cursor + nbytes - slab_start > chunk_bytes:
            start_chunk()
        offsets[i] = cursor
        parts[i] = ((len(chunks), cursor - slab_start, nbytes),)
        slab_sizes.add(itemsize)
        cursor += nbytes
    close_slab(cursor)
    return _Layout(tuple(offsets), tuple(chunks), tuple(parts), cursor, tuple(c.start + c.length for c in chunks),
                   len(chunks) if frozen_from is None else frozen_from, np.array(staged, dtype=np.int64),
                   np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64))


def _key(t: torch.Tensor) -> tuple:
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))


def _frozen_parameters(state: Mapping[str, Any]) -> dict:
    """Parameters with requires_grad=False of the modules in ``state``, by memory identity
    (state_dict() hands out detached views of the same memory)."""
    found: dict = {}
    for value in state.values():
        if isinstance(value, torch.nn.Module):
            for p in value.parameters():
                if not p.requires_grad:
                    found[_key(p)] = p
    return found
