"""Read a committed step back: arrays from chunks, the typed tree, and in-place restore.

Runs on the caller's thread (``CheckpointManager.restore`` / ``load`` call
:func:`restore_state` / :func:`load_items`). The manifest has already been validated
(:mod:`async_ckpt.format.manifest`); here the storage backend checks every chunk before
a byte of it reaches a tensor. This module matches saved arrays to live destinations and
decodes into them; it knows nothing of steps or save policy.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import (Any, Callable, Collection, ContextManager, Iterable, Iterator, Mapping, NamedTuple, Optional,
                    Sequence)

import numpy as np
import torch

from .. import native, rng
from ..errors import RestoreError
from ..format.dtypes import parse_array_dtype
from ..format.manifest import Manifest
from ..format.tree import decode_tree, is_stateful
from ..storage.base import ReadRequest, Storage
from ..storage.inspect import check_data_files
from . import reshard

RNG_ITEM = "rng"

# Exact types whose in-place copy needs no further checks beyond the shape (subclasses
# such as DTensor take the general path).
_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})
_ARRAY_TAGS = frozenset({"tensor", "ndarray"})


class ChunkBytes(NamedTuple):
    """Where an array's bytes are once its shared chunk is read: ``buffer[offset:]``."""
    buffer: torch.Tensor
    offset: int


def _empty_bytes(nbytes: int) -> torch.Tensor:
    """``nbytes`` uninitialised bytes (the reader's buffered preads need no alignment)."""
    return torch.empty(max(nbytes, 1), dtype=torch.uint8)[:nbytes]


def _allocate(dtype: str, shape: Sequence[int], nbytes: int) -> tuple[Any, np.ndarray]:
    """A fresh array of the declared dtype/shape and a flat uint8 view of its bytes."""
    kind, dt, _ = parse_array_dtype(dtype)
    try:
        if kind == "torch":
            raw = _empty_bytes(nbytes)
            return raw.view(dt).view(tuple(shape)), raw.numpy()
        raw_np = _empty_bytes(nbytes).numpy()
    except (MemoryError, RuntimeError) as e:   # torch reports a failed allocation as RuntimeError
        raise RestoreError(f"cannot allocate the {nbytes} bytes the manifest declares for an array "
                           f"({str(e).splitlines()[0][:200]})") from None
    return raw_np.view(dt).reshape(tuple(shape)), raw_np


def _byte_view(value: Any) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor or ndarray."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(-1).view(torch.uint8).numpy()
    return value.reshape(-1).view(np.uint8)


def read_arrays(storage: Storage, location: str, manifest: Manifest, rank: int = 0,
                indices: Optional[Iterable[int]] = None,
                destinations: Optional[Mapping[int, Any]] = None,
                backups: Optional[Mapping[int, np.ndarray]] = None,
                meanwhile: Optional[Callable[[dict[int, Any]], None]] = None,
                bytes_only: Collection[int] = (),
                scratch: Optional[Callable[[int], Optional[torch.Tensor]]] = None) -> dict[int, Any]:
    """Materialise the requested arrays of ``rank`` (all when ``indices`` is None) on CPU.

    An array made of whole chunks is decoded straight into its own fresh memory. A chunk
    shared by several arrays (a slab of small tensors) is decoded once into a buffer of its
    own, and each array inside it is a view of that buffer: no per-tensor allocation or
    copy, and a caller keeping one small tensor keeps at most one chunk alive.
    ``destinations`` maps array indices to existing contiguous CPU tensors/ndarrays of the
    right dtype and shape (see :func:`match_destinations`), whose memory must not overlap:
    their bytes are read straight into them, a shared chunk's scattered over its arrays.
    ``backups`` maps some of those indices to scratch bytes as long as the array: the
    destination's current bytes are kept there before they are overwritten, and when
    reading fails the storage has put them back. A destination without a backup may hold
    partial data after a failure.

    The chunks are read on a thread of their own (the GIL released in native reads) while
    the calling thread makes the views of the shared chunks' arrays and then runs
    ``meanwhile(arrays)``, with the arrays whose bytes are not there yet: work that needs
    only their dtypes and shapes. If the read fails, its error is raised once that is
    done; ``meanwhile`` should not raise.

    An array in ``bytes_only`` that lies inside a shared chunk gets no array object: its
    value is :class:`ChunkBytes`, where its bytes will be once the read is done (the caller
    copies them out with :func:`copy_out`). A shared chunk holding nothing but such arrays
    is decoded into ``scratch(nbytes)`` when that lends a buffer (None: fresh memory).
    """
    check_data_files(storage, location, manifest)   # before allocating what the manifest declares
    section = manifest.section(rank)
    wanted = sorted(set(range(len(section.arrays)) if indices is None else indices))
    destinations = destinations or {}
    backups = backups or {}
    chunks = manifest.chunks
    out: dict[int, Any] = {}
    requests: list[ReadRequest] = []
    slabs: dict[int, torch.Tensor] = {}                      # shared chunk → its own buffer
    # shared chunk → (offset, destination bytes, backup bytes or None) read straight there
    scattered: dict[int, list[tuple[int, np.ndarray, Optional[np.ndarray]]]] = {}
    direct: set[int] = set()                                  # chunks decoded straight into an array

    claimed: dict[int, int] = {}
    typed: dict[tuple[int, Any], torch.Tensor] = {}           # (id of a slab, dtype) → typed view of it
    # Arrays that are views of their chunk's buffer, made while the chunks are read (they
    # need none of its bytes): (index, chunk, offset, entry, parsed dtype).
    views: list[tuple[int, int, int, Any, tuple[str, Any, int]]] = []
    parsed: dict[str, tuple[str, Any, int]] = {}              # dtype string → parse_array_dtype's answer
    located: list[tuple[int, int, int]] = []                  # (index, shared chunk, offset): bytes only

    def slab(chunk: int) -> torch.Tensor:
        buf = slabs.get(chunk)
        if buf is None:
            _check_claimed(manifest, chunk, claimed)
            buf = slabs[chunk] = _chunk_buffer(chunks[chunk].raw_length, f"chunk {chunk}")
        return buf

    for index in wanted:
        entry = section.arrays[index]
        if entry.stored_by is not None:        # a replica another rank wrote: read its bytes
            entry = manifest.section(entry.stored_by[0]).arrays[entry.stored_by[1]]
        parts = entry.parts
        keep = None
        if index in destinations:
            value = destinations[index]
            raw = _byte_view(value)
            keep = backups.get(index)
        elif len(parts) == 1 and (parts[0][1] or parts[0][2] != chunks[parts[0][0]].raw_length):
            # Inside a shared chunk: a view of the chunk's buffer when the start suits the dtype.
            chunk, offset = parts[0][0], parts[0][1]
            if index in bytes_only:
                located.append((index, chunk, offset))
                continue
            dtype = parsed.get(entry.dtype)
            if dtype is None:
                dtype = parsed[entry.dtype] = parse_array_dtype(entry.dtype)
            if entry.nbytes and offset % dtype[2] == 0:
                slab(chunk)
                views.append((index, chunk, offset, entry, dtype))
                continue
            value, raw = _allocate(entry.dtype, entry.shape, entry.nbytes)
        else:
            value, raw = _allocate(entry.dtype, entry.shape, entry.nbytes)
        out[index] = value
        cursor = 0
        for chunk, offset, length in parts:
            piece = raw[cursor:cursor + length]
            backup = None if keep is None else keep[cursor:cursor + length]
            cursor += length
            if (offset == 0 and length == chunks[chunk].raw_length and chunk not in slabs
                    and chunk not in scattered and chunk not in direct):
                direct.add(chunk)      # the chunk is exactly this piece: decode straight into the array
                if backup is None:
                    requests.append(ReadRequest(chunk, chunks[chunk], memoryview(piece)))
                else:
                    requests.append(ReadRequest(chunk, chunks[chunk], pieces=((memoryview(piece), memoryview(backup)),)))
            elif length:
                scattered.setdefault(chunk, []).append((offset, piece, backup))
    for index, chunk, offset in located:
        buf = slabs.get(chunk)
        if buf is None:           # no array of this chunk escapes as a view: scratch will do
            _check_claimed(manifest, chunk, claimed)
            raw = chunks[chunk].raw_length
            buf = scratch(raw) if scratch is not None else None
            slabs[chunk] = buf if buf is not None else _chunk_buffer(raw, f"chunk {chunk}")
        out[index] = ChunkBytes(slabs[chunk], offset)
    copies: list[tuple[np.ndarray, Optional[np.ndarray], int, int]] = []   # (dst, backup, chunk, offset)
    for chunk in sorted(set(slabs) | set(scattered)):
        places = sorted(scattered.get(chunk, ()), key=lambda p: p[0])
        pieces: list[tuple[memoryview, Optional[memoryview]]] = []
        pos = 0
        for offset, dst, backup in places:
            if offset < pos:           # arrays overlapping in the chunk (not what this library writes)
                pieces = []
                copies.extend((d, b, chunk, o) for o, d, b in places)
                break
            if offset > pos:
                pieces.append((memoryview(slab(chunk).numpy()[pos:offset]), None))
            pieces.append((memoryview(dst), None if backup is None else memoryview(backup)))
            pos = offset + len(dst)
        if not pieces:
            requests.append(ReadRequest(chunk, chunks[chunk], memoryview(slab(chunk).numpy())))
            continue
        if pos < chunks[chunk].raw_length:
            pieces.append((memoryview(slab(chunk).numpy()[pos:]), None))
        requests.append(ReadRequest(chunk, chunks[chunk], pieces=tuple(pieces)))

    def make_views() -> None:
        for index, chunk, offset, entry, dtype in views:
            out[index] = _view(slabs[chunk], offset, entry, dtype, typed)
        if meanwhile is not None:
            meanwhile(out)

    if requests:
        _read_while(lambda: storage.read(location, manifest.files, requests), make_views)
    else:
        make_views()
    for dst, backup, chunk, offset in copies:
        if backup is not None:
            backup[:] = dst
        dst[:] = slabs[chunk].numpy()[offset:offset + len(dst)]
    return out


def _read_while(read: Callable[[], Any], work: Callable[[], None]) -> None:
    """Run ``read`` on a thread of its own while ``work`` runs here; raise the read's error
    (after ``work`` is done), else ``work``'s."""
    failed: list[BaseException] = []
    started = threading.Event()

    def reading() -> None:
        started.set()
        try:
            read()
        except BaseException as e:  # noqa: BLE001 - re-raised on the calling thread
            failed.append(e)

    reader = threading.Thread(target=reading, name="async_ckpt-restore-read", daemon=True)
    reader.start()
    try:
        # Let the reader reach the native read (which releases the GIL) before ``work``
        # takes the GIL: otherwise the read waits for Python's switch interval (5 ms) to
        # begin. Inside the try: an interrupt here still waits for the reader to finish.
        started.wait()
        work()
    finally:
        reader.join()
        if failed:
            raise failed[0]


# A shared chunk is decoded whole; its raw bytes beyond what its arrays claim are padding
# (at most ALIGN - 1 per array in what this library writes). More than this is a manifest
# asking for memory it does not use.
_SLACK_BYTES = 1 << 20


def _check_claimed(manifest: Manifest, chunk: int, claimed: dict[int, int]) -> None:
    """Refuse to allocate a shared chunk whose arrays claim far less than its raw length."""
    if not claimed:
        for section in manifest.ranks:
            for a in section.arrays:
                for c, _, n in a.parts:
                    claimed[c] = claimed.get(c, 0) + n
    raw = manifest.chunks[chunk].raw_length
    use = claimed.get(chunk, 0)
    if raw > 2 * use + _SLACK_BYTES:
        raise RestoreError(f"chunk {chunk} declares {raw} raw bytes but its arrays hold {use}: refusing to "
                           "allocate memory the manifest does not use")


def _chunk_buffer(nbytes: int, what: str) -> torch.Tensor:
    try:
        return _empty_bytes(nbytes)
    except (MemoryError, RuntimeError) as e:   # torch reports a failed allocation as RuntimeError
        raise RestoreError(f"cannot allocate the {nbytes} bytes the manifest declares for {what} "
                           f"({str(e).splitlines()[0][:200]})") from None


def _view(buf: torch.Tensor, offset: int, entry: Any, dtype: tuple[str, Any, int],
          typed: dict[tuple[int, Any], torch.Tensor]) -> Any:
    """The array as a view of a chunk's decoded bytes (``buf``); its start suits its dtype
    (``dtype``: what :func:`parse_array_dtype` says of ``entry.dtype``).

    ``typed`` caches one view of each slab per dtype, so an array costs one slice (and a
    reshape unless it is 1-D): thousands of small tensors share a few slabs."""
    kind, dt, itemsize = dtype
    if kind != "torch":
        return buf.numpy()[offset:offset + entry.nbytes].view(dt).reshape(tuple(entry.shape))
    base = typed.get((id(buf), dt))
    if base is None:
        usable = buf.numel() - buf.numel() % itemsize
        base = typed[(id(buf), dt)] = buf[:usable].view(dt)
    start = offset // itemsize
    flat = base[start:start + entry.nbytes // itemsize]
    shape = entry.shape
    return flat if len(shape) == 1 else flat.view(tuple(shape))


def _fits(target: Any, dtype: str, shape: tuple[int, ...]) -> bool:
    if isinstance(target, torch.Tensor):
        if type(target) not in (torch.Tensor, torch.nn.Parameter):
            return False        # a DTensor or other subclass: its local bytes are not its value
        return (target.device.type == "cpu" and target.is_contiguous() and not target.is_conj()
                and not target.is_neg() and tuple(target.shape) == tuple(shape)
                and str(target.dtype) == dtype and target.numel() > 0)
    if isinstance(target, np.ndarray):
        return (target.flags.c_contiguous and target.flags.writeable and target.shape == tuple(shape)
                and target.dtype.str == dtype and target.size > 0)
    return False


def match_destinations(target: Any, node: Any, arrays: Sequence[Any], out: dict[int, Any]) -> None:
    """Find target tensors that a saved array can be decoded straight into.

    Walks ``target`` (the caller's live objects) beside ``node`` (the saved typed tree):
    module parameters and buffers and an optimizer's existing state (through
    ``state_dict()``, which shares their memory; ``Optimizer.load_state_dict`` keeps a
    tensor that already has its parameter's dtype and device), tensors and ndarrays inside
    dicts and lists. Restoring then copies each of them onto itself, which torch and numpy
    skip, so a restore reads each byte once.
    """
    if not isinstance(node, dict):
        return
    tag = node.get("$")
    if isinstance(target, (torch.nn.Module, torch.optim.Optimizer)):
        if tag == "state":
            match_destinations(target.state_dict(), node.get("v"), arrays, out)
        return
    if tag in ("tensor", "ndarray"):
        index = node.get("array")
        if type(index) is int and 0 <= index < len(arrays) and index not in out:
            entry = arrays[index]
            if _fits(target, entry.dtype, entry.shape):
                out[index] = target
        return
    if tag == "dict" and isinstance(target, Mapping):
        for key, value in zip(node.get("keys", ()), node.get("values", ())):
            if key in target:
                match_destinations(target[key], value, arrays, out)
    elif tag in ("list", "tuple") and isinstance(target, (list, tuple)):
        values = node.get("v", ())
        if len(values) == len(target):
            for t, v in zip(target, values):
                match_destinations(t, v, arrays, out)


def cover(target: Any, node: Any, arrays: Sequence[Any], manifest: Manifest, now: list[tuple[int, torch.Tensor]],
          later: list[tuple[int, torch.Tensor, int]], dtypes: dict[str, Any]) -> bool:
    """Whether restoring the saved ``node`` into ``target`` may be nothing but copying
    bytes into live tensors: ``target`` is a dict (nested dicts too) that has every saved
    key, and each saved tensor's live counterpart is a plain tensor. Such an item needs no
    tree decoding and no per-tensor ``copy_``: the restore copies its bytes in one native
    call.

    Appends (array index, live tensor) to ``now`` for the large arrays and those filling
    whole chunks, which must also pass :func:`fits` (checked here: they are read in place),
    and (index, live tensor, shared chunk) to ``later`` for the small arrays inside shared
    chunks, whose :func:`fits` the caller checks while the chunks are read (about 1 us
    each; the walk itself costs about half that). ``dtypes`` as for :func:`fits`.
    """
    if not isinstance(target, dict) or type(node) is not dict or node.get("$") != "dict":
        return False
    n = len(arrays)
    for key, value in zip(node["keys"], node["values"]):
        if type(value) is not dict:
            return False
        tag = value.get("$")
        if tag == "dict":
            if not cover(target.get(key), value, arrays, manifest, now, later, dtypes):
                return False
            continue
        live = target.get(key)
        index = value.get("array")
        if tag != "tensor" or type(live) not in _PLAIN_TENSORS or type(index) is not int or not 0 <= index < n:
            return False
        entry = arrays[index]
        if entry.global_shape is not None:
            return False
        chunk = _shared_chunk(entry, manifest)
        if chunk is not None and entry.nbytes < _MATCH_MEAN_FROM:
            later.append((index, live, chunk))
        elif fits(live, entry, dtypes):
            now.append((index, live))
        else:
            return False
    return True


def fits(live: torch.Tensor, entry: Any, dtypes: dict[str, Any]) -> bool:
    """Whether the saved array's bytes can be written into the plain tensor ``live`` as
    they are: a CPU tensor of its dtype and shape, contiguous, with no conjugate or
    negative bit. ``dtypes`` caches the torch dtype of each dtype string (None: not torch)."""
    dtype = dtypes.get(entry.dtype, _UNPARSED)
    if dtype is _UNPARSED:
        kind, dt, _ = parse_array_dtype(entry.dtype)
        dtype = dtypes[entry.dtype] = dt if kind == "torch" else None
    return (live.dtype is dtype and live.shape == entry.shape and live.is_cpu and live.is_contiguous()
            and not live.is_conj() and not live.is_neg())


_UNPARSED = object()


def copy_plan(pairs: Sequence[tuple[int, torch.Tensor]], arrays: Mapping[int, Any],
              entries: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source addresses, destination addresses, lengths) that copy each array's bytes
    (``arrays[index]``: a tensor or :class:`ChunkBytes`) into its live tensor. The caller
    keeps both alive until :func:`copy_out` has run."""
    bases: dict[int, int] = {}
    srcs, dsts, lengths = [], [], []
    for index, live in pairs:
        nbytes = entries[index].nbytes
        if not nbytes:
            continue
        value = arrays[index]
        if type(value) is ChunkBytes:
            buf = value.buffer
            base = bases.get(id(buf))
            if base is None:
                base = bases[id(buf)] = buf.data_ptr()
            srcs.append(base + value.offset)
        else:
            srcs.append(value.data_ptr())
        dsts.append(live.data_ptr())
        lengths.append(nbytes)
    return (np.array(srcs, dtype=np.uint64), np.array(dsts, dtype=np.uint64),
            np.array(lengths, dtype=np.uint64))


def copy_out(plan: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Run a :func:`copy_plan` (native, GIL released, the bytes shared by up to four threads)."""
    if len(plan[0]):
        native.copy_all(*plan, threads=_COPY_THREADS)


_COPY_THREADS = max(1, min(4, os.cpu_count() or 1))


def _tagged_nodes(node: Any) -> Iterator[dict]:
    """Every tagged node of a subtree of a rank's tree (validated when its manifest was
    parsed: walked without validating again). An array node's children are not walked."""
    stack = [node]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            tag = item.get("$")
            if tag is not None:
                yield item
            if tag not in _ARRAY_TAGS:
                stack.extend(v for v in item.values() if type(v) in (dict, list))
        elif type(item) is list:
            stack.extend(v for v in item if type(v) in (dict, list))


def item_arrays(tree: Any, names: Iterable[str]) -> set[int]:
    """Array indices referenced by the named top-level items of a rank's tree."""
    wanted = set(names)
    return {node["array"] for key, root in zip(tree["keys"], tree["values"]) if key in wanted
            for node in _tagged_nodes(root) if node["$"] in _ARRAY_TAGS}


def decoded_from_bytes(tree: Any, names: Iterable[str]) -> set[str]:
    """The named items whose decoding reads their arrays' bytes, not only their dtypes and
    shapes: those holding random generators (torch, numpy), built from their saved state.
    They are decoded once their chunks are read; the others may be decoded while the
    chunks are read."""
    wanted = set(names)
    return {key for key, root in zip(tree["keys"], tree["values"]) if key in wanted
            and any(node["$"] in _BYTES_READ_TAGS for node in _tagged_nodes(root))}


_BYTES_READ_TAGS = frozenset({"torch.generator", "np.generator", "np.randomstate"})


def _decode_checked(tree: Any, arrays: Mapping[int, Any], names: Iterable[str], state: Mapping[str, Any],
                    saved: dict[str, Any]) -> None:
    """Decode the named items into ``saved`` and precheck those ``state`` holds against
    their live objects (see :func:`_precheck`)."""
    names = list(names)
    if not names:
        return
    decoded = decode_items(tree, arrays, names)
    saved.update(decoded)
    for name, value in decoded.items():
        if name in state:
            _precheck(state[name], value, name)


def decode_items(tree: Any, arrays: Mapping[int, Any], names: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """Decode the named top-level items (all when None) into plain Python values."""
    keys, values = tree["keys"], tree["values"]
    wanted = None if names is None else set(names)
    return {k: decode_tree(v, _LazyArrays(arrays)) for k, v in zip(keys, values)
            if wanted is None or k in wanted}


class _LazyArrays(Sequence):
    """Lets decode_tree index a sparse dict of materialised arrays."""

    def __init__(self, arrays: Mapping[int, Any]) -> None:
        self._arrays = arrays

    def __getitem__(self, index):  # type: ignore[override]
        try:
            return self._arrays[index]
        except KeyError:
            raise IndexError(index) from None

    def __len__(self) -> int:
        return max(self._arrays, default=-1) + 1


# ----------------------------------------------------------------------------- in place

def restore_into(target: Any, saved: Any, path: str) -> Any:
    """Load ``saved`` into ``target`` in place where it can; return the value to store.

    Stateful objects get ``load_state_dict``; tensors and ndarrays are copied into;
    dicts and lists are updated member by member; immutable values are replaced
    (the caller stores the returned value). The caller runs it under ``torch.no_grad()``
    (parameters are copied into in place).
    """
    if isinstance(target, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            raise RestoreError(f"{path}: checkpoint holds {type(saved).__name__}, target is a tensor")
        if saved.shape != target.shape:
            raise RestoreError(f"{path}: shape {tuple(saved.shape)} in checkpoint, "
                               f"{tuple(target.shape)} in target")
        target.copy_(saved)
        return target
    if isinstance(target, np.ndarray):
        saved_arr = np.asarray(saved)
        if saved_arr.shape != target.shape:
            raise RestoreError(f"{path}: shape {saved_arr.shape} in checkpoint, {target.shape} in target")
        np.copyto(target, saved_arr)
        return target
    if isinstance(target, np.random.Generator):
        if not isinstance(saved, np.random.Generator):
            raise RestoreError(f"{path}: checkpoint holds {type(saved).__name__}, target is a numpy Generator")
        target.bit_generator.state = saved.bit_generator.state
        return target
    if isinstance(target, torch.Generator):
        if not isinstance(saved, torch.Generator):
            raise RestoreError(f"{path}: checkpoint holds {type(saved).__name__}, target is a torch.Generator")
        target.set_state(saved.get_state())
        return target
    if is_stateful(target):
        try:
            target.load_state_dict(saved)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise RestoreError(f"{path}: load_state_dict failed for {type(target).__name__}: {e}") from e
        return target
    if isinstance(target, dict) and isinstance(saved, dict):
        for key in list(target):
            if key not in saved:
                continue
            t, v = target[key], saved[key]
            # A state dict is mostly tensors: copy same-shaped ones inline, everything else
            # through the general path.
            if type(t) in _PLAIN_TENSORS and type(v) in _PLAIN_TENSORS and t.shape == v.shape:
                if t is not v:         # v is t when its bytes were already copied in
                    t.copy_(v)
            else:
                target[key] = restore_into(t, v, f"{path}[{key!r}]")
        for key in saved:
            if key not in target:
                target[key] = saved[key]
        return target
    if isinstance(target, list) and isinstance(saved, list):
        if len(target) == len(saved):
            for i, (t, s) in enumerate(zip(target, saved)):
                target[i] = restore_into(t, s, f"{path}[{i}]")
        else:
            target[:] = saved
        return target
    return saved


# ----------------------------------------------------------------------------- orchestration

def load_items(storage: Storage, location: str, manifest: Manifest, rank: int = 0,
               world_size: Optional[int] = None) -> dict[str, Any]:
    """The raw tree that ``rank`` of a world of ``world_size`` (default: the saver's) reads:
    state dicts, tensors on CPU, RNG states. Sharded arrays come back whole."""
    src = _source_rank(manifest, rank, world_size)
    section = manifest.section(src)
    arrays = _read_items(storage, location, manifest, src, section.tree, None, {}, {})
    return decode_items(section.tree, arrays)


def _source_rank(manifest: Manifest, rank: int, world_size: Optional[int]) -> int:
    """The section a reader uses for the tree and per-rank items: its own when the world
    sizes match, else the same rank if the saver had it, else rank 0 (with a warning)."""
    if world_size is None or world_size == manifest.world_size:
        return rank
    src = rank if rank < manifest.world_size else 0
    warnings.warn(f"async_ckpt: step {manifest.step} was saved by {manifest.world_size} rank(s) and is restored "
                  f"into {world_size}: rank {rank} takes the per-rank items (RNG streams, data position) of "
                  f"saved rank {src}, so random streams (dropout, per-rank shuffling) will not repeat an "
                  f"uninterrupted {manifest.world_size}-rank run (a sampler drawing global batches, such as "
                  "ResumableSampler.next_batch_for, keeps its order); sharded and replicated tensors are "
                  "resharded exactly",
                  RuntimeWarning, stacklevel=4)
    return src


def _read_items(storage: Storage, location: str, manifest: Manifest, src: int, tree: Any,
                indices: Optional[set[int]], destinations: Mapping[int, Any], live: Mapping[Any, Any],
                backups: Optional[Mapping[int, np.ndarray]] = None,
                meanwhile: Optional[Callable[[dict[int, Any]], None]] = None,
                bytes_only: Collection[int] = (),
                scratch: Optional[Callable[[int], Optional[torch.Tensor]]] = None) -> dict[int, Any]:
    """The arrays ``indices`` (all when None) of section ``src``: ordinary ones as they are,
    sharded ones assembled to the box the live value needs (its local shard, or the whole
    array). ``meanwhile``, ``bytes_only`` and ``scratch`` as for :func:`read_arrays` (with
    sharded arrays ``meanwhile`` runs after the read)."""
    section = manifest.section(src)
    if indices is None:
        indices = set(range(len(section.arrays)))
    sharded = [j for j in indices if section.arrays[j].global_shape is not None]
    if not sharded:
        return read_arrays(storage, location, manifest, src, indices=indices, destinations=destinations,
                           backups=backups, meanwhile=meanwhile, bytes_only=bytes_only, scratch=scratch)
    plain = {j for j in indices if section.arrays[j].global_shape is None}
    paths = reshard.array_paths(tree)
    wanted, templates = [], {}
    for j in sharded:
        entry = section.arrays[j]
        template = reshard.template_for(live, paths[j], entry.global_shape)
        if template is not None:
            offset, shape = reshard.local_box(template)
            templates[j] = template
        else:
            offset, shape = (0,) * len(entry.global_shape), tuple(entry.global_shape)
        wanted.append((j, paths[j], entry.dtype, offset, shape))
    need, plan = reshard.Pieces(manifest).needs(wanted)
    # One read per rank: this rank's plain arrays and every piece it needs together, so no
    # chunk is read twice.
    arrays: dict[int, Any] = {}
    got: dict[tuple[int, int], Any] = {}
    for r in sorted(set(need) | {src}):
        idx = need.get(r, set()) | (plain if r == src else set())
        values = read_arrays(storage, location, manifest, r, indices=idx,
                             destinations=destinations if r == src else None,
                             backups=backups if r == src else None,
                             bytes_only=bytes_only if r == src else (), scratch=scratch if r == src else None)
        for j, v in values.items():
            got[(r, j)] = v
            if r == src and j in plain:
                arrays[j] = v
    for j, box in reshard.Pieces.assemble(plan, got).items():
        arrays[j] = reshard.shard_like(templates[j], box) if j in templates else box
    if meanwhile is not None:
        meanwhile(arrays)
    return arrays


def _precheck(target: Any, saved: Any, path: str) -> None:
    """Refuse, before anything is applied, what restore_into would fail on half way:
    tensor shape mismatches and a module whose keys or shapes differ from the saved ones
    (``Module.load_state_dict`` copies parameters as it goes and raises at the end)."""
    if isinstance(target, torch.Tensor):
        if isinstance(saved, torch.Tensor) and tuple(saved.shape) != tuple(target.shape):
            raise RestoreError(f"{path}: shape {tuple(saved.shape)} in checkpoint, "
                               f"{tuple(target.shape)} in target")
        if not isinstance(saved, torch.Tensor):
            raise RestoreError(f"{path}: checkpoint holds {type(saved).__name__}, target is a tensor")
        return
    if isinstance(target, torch.nn.Module) and isinstance(saved, Mapping):
        live = target.state_dict()
        missing = [k for k in live if k not in saved]
        unexpected = [k for k in saved if k not in live]
        if missing or unexpected:
            raise RestoreError(f"{path}: load_state_dict would fail for {type(target).__name__}: "
                               f"missing key(s) {missing[:5]}, unexpected key(s) {unexpected[:5]}")
        for k, v in live.items():
            s = saved[k]
            if isinstance(v, torch.Tensor) and isinstance(s, torch.Tensor) and tuple(s.shape) != tuple(v.shape):
                raise RestoreError(f"{path}[{k!r}]: shape {tuple(s.shape)} in checkpoint, {tuple(v.shape)} in target")
        return
    if isinstance(target, torch.optim.Optimizer) and isinstance(saved, Mapping):
        groups = saved.get("param_groups")
        if isinstance(groups, list):
            want = [len(g["params"]) for g in target.param_groups]
            got = [len(g.get("params", ())) if isinstance(g, Mapping) else -1 for g in groups]
            if want != got:
                raise RestoreError(f"{path}: the checkpoint's optimizer has parameter groups of sizes {got}, "
                                   f"the target's {want} (build the optimizer the way the run did)")
        return
    if isinstance(target, dict) and isinstance(saved, dict):
        for key, t in target.items():
            if key not in saved:
                continue
            v = saved[key]
            if not (type(t) in _PLAIN_TENSORS and type(v) in _PLAIN_TENSORS and t.shape == v.shape):
                _precheck(t, v, f"{path}[{key!r}]")
    elif isinstance(target, list) and isinstance(saved, list) and len(target) == len(saved):
        for i, (t, v) in enumerate(zip(target, saved)):
            _precheck(t, v, f"{path}[{i}]")


Borrow = Callable[[int], ContextManager[torch.Tensor]]


def restore_state(storage: Storage, location: str, manifest: Manifest, state: Mapping[str, Any], *,
                  rank: int = 0, world_size: Optional[int] = None, restore_rng: bool = True,
                  atomic: bool = True, borrow: Optional[Borrow] = None) -> None:
    """Restore the items ``state`` names in place (see ``CheckpointManager.restore``).

    Items the checkpoint holds but ``state`` does not name are left alone; an item
    ``state`` names that the checkpoint lacks raises RestoreError. RNG streams are
    restored last.

    ``atomic`` (the default): a restore that raises on bad data or a mismatched target
    leaves the caller's objects as they were. Live CPU tensors that match a saved array
    are read into directly, but the reader first copies their bytes into a scratch buffer
    that ``borrow(nbytes)`` lends (the manager lends its staging buffer, asking for the
    whole state's size so that its next save reuses it; without ``borrow`` it is fresh
    memory), while the previous chunk is still being read, so the copy overlaps the disk.
    A failed read puts those bytes back before it raises; so does a shape or module-key
    mismatch found before any item is applied, and a failure while applying item k puts
    back the tensors of items k and after. Nothing keeps a reference to the scratch buffer
    afterwards. Without ``atomic`` there are no backups: if that restore raises, matching
    tensors may hold partial data.

    An item that is a dict of live CPU tensors matching the saved ones (see :func:`cover`)
    is restored by copying bytes alone: its arrays inside shared chunks are read into the
    scratch buffer and copied into the live tensors in one native call when the item's
    turn comes, after every check has passed; so a failed read or check leaves them as
    they were, in either mode. It is not decoded, and the tensors it restores are the
    caller's own.

    A state of small arrays (mean under 64 KiB) is read first instead (see
    :func:`_read_first_plan`): every chunk into scratch, while the matching, checking and
    planning run beside the read; then covered items are copied in and the others get
    their own copies of their chunks. Nothing live changes before that read is complete,
    in either mode.
    """
    src = _source_rank(manifest, rank, world_size)
    section = manifest.section(src)
    tree = section.tree
    saved_names = set(tree["keys"])
    missing = [name for name in state if name not in saved_names]
    if missing:
        raise RestoreError(f"checkpoint step {manifest.step} has no item(s) {missing}; "
                           f"it holds {sorted(saved_names)}")
    names = list(state)
    want_rng = restore_rng and RNG_ITEM in saved_names and RNG_ITEM not in state
    if want_rng:
        names.append(RNG_ITEM)
    first = _read_first_plan(section, manifest, names)
    if first is not None:
        saved = _restore_read_first(storage, location, manifest, src, state, names, first, borrow)
    else:
        saved = _restore_matched(storage, location, manifest, src, state, names, atomic, borrow)
    if want_rng:
        rng.restore(saved[RNG_ITEM])


class _ReadFirst(NamedTuple):
    wanted: list[int]       # the array indices the named items reference
    chunks: list[int]       # the chunks holding them, each read whole into scratch
    claimed: dict[int, int]  # bytes each chunk's arrays claim, when they are all known here


def _read_first_plan(section: Any, manifest: Manifest, names: Sequence[str]) -> Optional[_ReadFirst]:
    """Whether to read first and match later: for a state of small arrays (where matching
    live tensors does not pay, see :func:`_worth_matching`), each in one chunk, none
    sharded or stored by another rank. The chunks are then read into scratch before the
    live objects are looked at, so the per-tensor work (the covering walk, the checks,
    the copy plan: tens of milliseconds for 20,000 tensors) runs while the disk reads."""
    arrays = section.arrays
    if not arrays or _mean_at_least(arrays, _READ_FIRST_MEAN_BELOW):
        return None
    tree = section.tree
    wanted = (list(range(len(arrays))) if set(names) >= set(tree["keys"])
              else sorted(item_arrays(tree, names)))
    claimed: dict[int, int] = {}
    for index in wanted:
        entry = arrays[index]
        if entry.global_shape is not None or entry.stored_by is not None or len(entry.parts) > 1:
            return None
        if entry.parts:
            chunk, _, length = entry.parts[0]
            claimed[chunk] = claimed.get(chunk, 0) + length
    chunks = sorted(claimed)
    # Every array of the checkpoint was counted: _check_claimed need not count them again.
    return _ReadFirst(wanted, chunks, claimed if manifest.world_size == 1 and len(wanted) == len(arrays) else {})


def _restore_read_first(storage: Storage, location: str, manifest: Manifest, src: int, state: Mapping[str, Any],
                        names: list[str], first: _ReadFirst, borrow: Optional[Borrow]) -> dict[str, Any]:
    """restore_state for a state of small arrays (see :func:`_read_first_plan`).

    Every chunk is read whole into the scratch buffer on a thread of its own. Meanwhile
    this thread finds the covered items (:func:`cover`) and plans their copies, and gives
    the other items' arrays memory of their own, decodes and prechecks them (those holding
    random generators, built from their bytes, once the read is done: see
    :func:`decoded_from_bytes`). Once the read is done, their chunks are copied out of
    scratch, then each item is applied. No live byte changes before every chunk has been
    read and checked and every item prechecked, whatever ``atomic`` says. Returns the
    decoded (uncovered) items."""
    section = manifest.section(src)
    tree, entries = section.tree, section.arrays
    chunks = manifest.chunks
    check_data_files(storage, location, manifest)   # before allocating what the manifest declares
    claimed = dict(first.claimed)
    for chunk in first.chunks:
        _check_claimed(manifest, chunk, claimed)
    total = sum(_aligned(chunks[c].raw_length) for c in first.chunks)
    if borrow is not None and total:      # the whole state, so that the next save reuses it
        total = max(total, sum(a.nbytes for a in entries if a.stored_by is None))
    with _borrowed(borrow, total) as scratch:
        arena = _Arena(scratch, 0)
        slabs = {c: arena.take(chunks[c].raw_length) for c in first.chunks}
        requests = [ReadRequest(c, chunks[c], memoryview(slab.numpy())) for c, slab in slabs.items()]
        arrays: dict[int, Any] = {}
        checked: dict[str, Any] = {}

        def plan() -> None:
            """Everything that needs no chunk bytes, while the chunks are read."""
            try:
                for index in first.wanted:
                    entry = entries[index]
                    if entry.parts:
                        chunk, offset, _ = entry.parts[0]
                        arrays[index] = ChunkBytes(slabs[chunk], offset)
                    else:
                        arrays[index] = _allocate(entry.dtype, entry.shape, 0)[0]
                covered, _ = _covered_items(tree, entries, manifest, state, names)
                dtypes: dict[str, Any] = {}
                late = [name for name in names if name not in covered]
                late += [name for name, found in covered.items()
                         if not all(fits(live, entries[index], dtypes) for index, live, _ in found.later)]
                checked["plans"] = {
                    name: copy_plan(found.now + [(index, live) for index, live, _ in found.later], arrays, entries)
                    for name, found in covered.items() if name not in late}
                checked["covered"] = covered        # keeps the planned live tensors alive
                checked["fill"] = _own_memory(arrays, item_arrays(tree, late), entries)
                after = checked["after"] = decoded_from_bytes(tree, late)
                checked["saved"] = {}
                _decode_checked(tree, arrays, [name for name in late if name not in after], state, checked["saved"])
            except BaseException as e:  # noqa: BLE001 - raised once the read is over
                checked["error"] = e

        if requests:
            _read_while(lambda: storage.read(location, manifest.files, requests), plan)
        else:
            plan()
        if "error" in checked:
            raise checked["error"]
        for source, own in checked["fill"]:
            own.copy_(source)
        saved = checked["saved"]
        _decode_checked(tree, arrays, checked["after"], state, saved)
        _apply_items(state, saved, checked["plans"], _Rollback({}, {}), manifest.step, later_untouched=True)
    return checked["saved"]


def _restore_matched(storage: Storage, location: str, manifest: Manifest, src: int, state: Mapping[str, Any],
                     names: list[str], atomic: bool, borrow: Optional[Borrow]) -> dict[str, Any]:
    """restore_state for a state with large arrays: the live tensors that match are found
    first, then read into (backed up when ``atomic``). Returns the decoded items."""
    section = manifest.section(src)
    tree = section.tree
    covered, wanted = _covered_items(tree, section.arrays, manifest, state, names)
    matched: dict[str, dict[int, Any]] = {}
    copied: dict[str, list[tuple[int, Any]]] = {}       # covered item → arrays copied in after the read
    copy_chunks: set[int] = set()                       # the shared chunks they are copied out of
    for name, found in covered.items():
        # A covered item's large arrays are read in place (below), their backups copied
        # while the disk works; small ones inside shared chunks are copied out of the chunk
        # once every check has passed (one native call instead of a read piece each).
        whole: dict[int, Any] = {}
        copied[name] = []
        for index, live in found.now:
            if index in whole:
                copied[name].append((index, live))
            else:
                whole[index] = live
        for index, live, chunk in found.later:
            copied[name].append((index, live))
            copy_chunks.add(chunk)
        if whole:
            matched[name] = whole
    # Matching costs microseconds per array and reading in place saves a copy in proportion
    # to bytes, so a state of small tensors skips the walk (then restore_into copies each).
    if _worth_matching(section.arrays):
        for key, node in zip(tree["keys"], tree["values"]):
            if key in state and key not in covered:
                matched[key] = {}
                match_destinations(state[key], node, section.arrays, matched[key])
    in_place = _in_place(tree, section.arrays, matched, single_owner=atomic)
    for name in covered:    # arrays _in_place left out are copied in too
        copied[name].extend((index, live) for index, live in matched.get(name, {}).items()
                            if index not in in_place[name])
    bytes_only = {index for pairs in copied.values() for index, _ in pairs}
    destinations = {index: target for found in in_place.values() for index, target in found.items()}
    live = {}
    if any(a.global_shape is not None for a in section.arrays):
        live = reshard.live_dtensors(state)
    layout: dict[int, int] = {}
    total = 0
    if atomic:
        for index in sorted(destinations):
            layout[index] = total
            total += _aligned(section.arrays[index].nbytes)
    backup_bytes = total
    # Shared chunks read only to be copied out of go into the scratch buffer too.
    total += sum(_aligned(manifest.chunks[c].raw_length) for c in copy_chunks)
    if borrow is not None and total:
        # Ask for a buffer the size of this rank's whole state: the next save of the same
        # state then reuses it instead of allocating its own (pages are only touched as
        # they are used, so the request costs no memory the save would not take anyway).
        total = max(total, sum(a.nbytes for a in section.arrays if a.stored_by is None))
    with _borrowed(borrow, total) as scratch:
        backups = {index: scratch[offset:offset + section.arrays[index].nbytes].numpy()
                   for index, offset in layout.items()}
        checked: dict[str, Any] = {}
        decoded = [name for name in names if name not in covered]
        after = decoded_from_bytes(tree, decoded)        # decoded once the read is done
        decoded = [name for name in decoded if name not in after]
        dtypes: dict[str, Any] = {}

        def check(arrays: dict[int, Any]) -> None:
            """Decode, precheck and plan the copies while the chunks are read: none of it
            needs their bytes. A covered item whose small tensors do not all fit is decoded
            the general way once the read is done."""
            try:
                checked["saved"] = {}
                _decode_checked(tree, arrays, decoded, state, checked["saved"])
                entries = section.arrays
                checked["late"] = [name for name, found in covered.items()
                                   if not all(fits(live, entries[index], dtypes) for index, live, _ in found.later)]
                checked["plans"] = {name: copy_plan(pairs, arrays, entries) for name, pairs in copied.items()
                                    if name not in checked["late"]}
            except BaseException as e:  # noqa: BLE001 - raised once the read is over
                checked["error"] = e

        # A failed read has put back what it overwrote; a failed check is rolled back here,
        # once every backup is complete.
        arrays = _read_items(storage, location, manifest, src, tree, wanted, destinations, live, backups, check,
                             bytes_only=bytes_only, scratch=_Arena(scratch, backup_bytes).take)
        rollback = _Rollback(in_place, backups)
        if "error" in checked:
            with rollback.on_error(list(state)):
                raise checked["error"]
        saved, plans, late = checked["saved"], checked["plans"], checked["late"]
        if after or late:
            with rollback.on_error(list(state)):
                _decode_checked(tree, arrays, after, state, saved)
                _materialise(arrays, item_arrays(tree, late), section.arrays)
                _decode_checked(tree, arrays, late, state, saved)
        _apply_items(state, saved, plans, rollback, manifest.step, later_untouched=atomic)
    return saved


def _apply_items(state: Mapping[str, Any], saved: Mapping[str, Any], plans: Mapping[str, Any],
                 rollback: "_Rollback", step: int, later_untouched: bool) -> None:
    """Restore each item of ``state``: a planned item by its copy plan, the others from
    their decoded value. A failure in item k rolls back what ``rollback`` holds for items
    k and after, and says which items were already restored; ``later_untouched`` says
    whether the items after k are as they were (False: read into in place, not backed up)."""
    applied: list[str] = []
    try:
        for name in state:
            with rollback.on_error(list(state)[len(applied):]), torch.no_grad():
                if name in plans:       # its bytes are in place or copied in here
                    copy_out(plans[name])
                    applied.append(name)
                    continue
                value = restore_into(state[name], saved[name], name)
            if isinstance(state, dict):
                state[name] = value
            applied.append(name)
    except RestoreError as e:
        if applied:
            failed = list(state)[len(applied)]
            after = ("the items after it are unchanged" if later_untouched else
                     "the items after it may hold bytes of that step read in place")
            raise RestoreError(f"{e} (item(s) {applied} were already restored from step {step}; "
                               f"{failed!r} may be partly restored; {after})") from e
        raise


_BACKUP_ALIGN = 64


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _BACKUP_ALIGN) * _BACKUP_ALIGN


class _Arena:
    """Hands out consecutive aligned pieces of a scratch buffer from ``start`` on; None
    once it has no room left (the caller then allocates)."""

    def __init__(self, buffer: torch.Tensor, start: int) -> None:
        self._buffer = buffer
        self._next = start

    def take(self, nbytes: int) -> Optional[torch.Tensor]:
        if self._next + nbytes > self._buffer.numel():
            return None
        piece = self._buffer[self._next:self._next + nbytes]
        self._next += _aligned(nbytes)
        return piece


def _shared_chunk(entry: Any, manifest: Manifest) -> Optional[int]:
    """The chunk an array lies inside when that chunk holds other bytes too, else None."""
    if entry.stored_by is not None:
        entry = manifest.section(entry.stored_by[0]).arrays[entry.stored_by[1]]
    parts = entry.parts
    if len(parts) == 1:
        chunk, offset, length = parts[0]
        if offset or length != manifest.chunks[chunk].raw_length:
            return chunk
    return None


class _Cover(NamedTuple):
    now: list[tuple[int, Any]]              # checked, read in place or copied in
    later: list[tuple[int, Any, int]]       # checked while the chunks are read, copied in


def _covered_items(tree: Any, arrays: Sequence[Any], manifest: Manifest, state: Mapping[str, Any],
                   names: Sequence[str]) -> tuple[dict[str, _Cover], set[int]]:
    """The items that may be restored by copying bytes alone (see :func:`cover`); an item
    sharing an array with another item it is restored with is left to the general path
    (its arrays must be decoded there). Also every array the named items reference."""
    covered: dict[str, _Cover] = {}
    dtypes: dict[str, Any] = {}
    for key, node in zip(tree["keys"], tree["values"]):
        if key in state:
            found = _Cover([], [])
            if cover(state[key], node, arrays, manifest, found.now, found.later, dtypes):
                covered[key] = found
    others = item_arrays(tree, [name for name in names if name not in covered])
    if not covered:
        return covered, others
    users = dict.fromkeys(others, 2)        # also needed by an item decoded the general way
    wanted = set(others)
    for found in covered.values():
        indices = {p[0] for p in found.now} | {p[0] for p in found.later}
        wanted |= indices
        for index in indices:
            users[index] = users.get(index, 0) + 1
    return {name: found for name, found in covered.items()
            if all(users[p[0]] == 1 for part in found for p in part)}, wanted


def _materialise(arrays: dict[int, Any], indices: Iterable[int], entries: Sequence[Any]) -> None:
    """Replace the :class:`ChunkBytes` among ``arrays[indices]`` with arrays of their own
    memory (their chunk buffer may be scratch that is reused once the restore is done)."""
    for src, dst in _own_memory(arrays, indices, entries):
        dst.copy_(src)


def _own_memory(arrays: dict[int, Any], indices: Iterable[int],
                entries: Sequence[Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Replace the :class:`ChunkBytes` among ``arrays[indices]`` with arrays of memory of
    their own, not yet filled: returns the (source, destination) byte copies that fill
    them, to run once their chunks are read. Each chunk is copied once; its arrays are
    views of the copy (a start that does not suit the dtype gets an array of its own)."""
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    owned: dict[int, torch.Tensor] = {}
    typed: dict[tuple[int, Any], torch.Tensor] = {}
    parsed: dict[str, tuple[str, Any, int]] = {}
    for index in indices:
        value = arrays.get(index)
        if type(value) is not ChunkBytes:
            continue
        source = value.buffer
        buf = owned.get(id(source))
        if buf is None:
            buf = owned[id(source)] = _chunk_buffer(source.numel(), "a chunk's arrays")
            copies.append((source, buf))
        entry = entries[index]
        dtype = parsed.get(entry.dtype)
        if dtype is None:
            dtype = parsed[entry.dtype] = parse_array_dtype(entry.dtype)
        if value.offset % dtype[2] == 0:
            arrays[index] = _view(buf, value.offset, entry, dtype, typed)
        else:
            array, raw = _allocate(entry.dtype, entry.shape, entry.nbytes)
            copies.append((source[value.offset:value.offset + entry.nbytes], torch.from_numpy(raw)))
            arrays[index] = array
    return copies


class _Rollback:
    """Puts the backed-up bytes of items' live tensors back when a block raises."""

    def __init__(self, in_place: Mapping[str, Mapping[int, Any]], backups: Mapping[int, np.ndarray]) -> None:
        self._in_place = in_place
        self._backups = backups

    @contextlib.contextmanager
    def on_error(self, names: Sequence[str]) -> Iterator[None]:
        try:
            yield
        except BaseException:
            for name in names:
                for index, target in self._in_place.get(name, {}).items():
                    backup = self._backups.get(index)
                    if backup is not None:
                        _byte_view(target)[:] = backup
            raise


def _worth_matching(arrays: Sequence[Any]) -> bool:
    """Whether matching live tensors pays: it costs about 6 us per array (the walk and a
    piece of its chunk's read) and saves a copy of the array's bytes."""
    return bool(arrays) and _mean_at_least(arrays, _MATCH_MEAN_FROM)


def _mean_at_least(arrays: Sequence[Any], nbytes: int) -> bool:
    """Whether the arrays (at least one) average ``nbytes`` or more."""
    return sum(a.nbytes for a in arrays) >= nbytes * len(arrays)


# From this mean array size up, matching live tensors pays.
_MATCH_MEAN_FROM = 64 << 10
# Below this mean array size, the chunks are read before the live objects are looked at
# (small_20k, 20,000 tensors of 16 B - 16 KiB, dev VM, cold cache, alternating processes:
# 101-106 ms against 124-132 ms matching first).
_READ_FIRST_MEAN_BELOW = _MATCH_MEAN_FROM


def _in_place(tree: Any, arrays: Sequence[Any], matched: Mapping[str, Mapping[int, Any]], *,
              single_owner: bool) -> dict[str, dict[int, Any]]:
    """Per item, the arrays read straight into a live tensor: unsharded arrays whose live
    tensors do not overlap one another. With ``single_owner`` (atomic),
    an array another item also references is left out: its bytes must not reach a live
    tensor that a failure in that other item would not put back."""
    owners: dict[int, int] = {}
    if single_owner:
        for name in matched:
            for index in item_arrays(tree, [name]):
                owners[index] = owners.get(index, 0) + 1
    taken: dict[int, Any] = {}
    out: dict[str, dict[int, Any]] = {}
    for name, found in matched.items():
        out[name] = {}
        for index, target in found.items():
            a = arrays[index]
            if a.global_shape is None and owners.get(index, 1) == 1 and index not in taken:
                taken[index] = out[name][index] = target
    disjoint = _disjoint(taken)
    return {name: {i: t for i, t in found.items() if i in disjoint} for name, found in out.items()}


def _disjoint(targets: Mapping[int, Any]) -> set[int]:
    """The indices whose targets' memory overlaps no other kept target (the first kept)."""
    spans = []
    for index, target in targets.items():
        if isinstance(target, torch.Tensor):
            start, n = target.data_ptr(), target.numel() * target.element_size()
        else:
            start, n = target.__array_interface__["data"][0], target.nbytes
        spans.append((start, start + n, index))
    spans.sort()
    kept: set[int] = set()
    end = 0
    for start, stop, index in spans:
        if start >= end:
            kept.add(index)
            end = stop
    return kept


@contextlib.contextmanager
def _borrowed(borrow: Optional[Borrow], nbytes: int) -> Iterator[torch.Tensor]:
    if nbytes == 0:
        yield torch.empty(0, dtype=torch.uint8)
    elif borrow is None:
        yield _chunk_buffer(nbytes, "the arrays restored in place")
    else:
        with borrow(nbytes) as buf:
            yield buf
