"""Read a committed step back: arrays from chunks, the typed tree, and in-place restore.

Runs on the caller's thread (``CheckpointManager.restore`` / ``load``). The manifest
has already been validated by :mod:`layout`; here every chunk is checked by the
native reader before a byte of it reaches a tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from .errors import RestoreError
from .layout import Manifest, check_data_files
from .storage import Storage
from .tree import decode_tree, is_stateful, parse_array_dtype, walk_arrays


def _allocate(dtype: str, shape: Sequence[int], nbytes: int) -> tuple[Any, np.ndarray]:
    """A fresh array of the declared dtype/shape and a flat uint8 view of its bytes."""
    kind, dt, _ = parse_array_dtype(dtype)
    try:
        if kind == "torch":
            raw = torch.empty(nbytes, dtype=torch.uint8)
            return raw.view(dt).view(tuple(shape)), raw.numpy()
        raw_np = np.empty(nbytes, dtype=np.uint8)
    except (MemoryError, RuntimeError) as e:   # torch reports a failed allocation as RuntimeError
        raise RestoreError(f"cannot allocate the {nbytes} bytes the manifest declares for an array "
                           f"({str(e).splitlines()[0][:200]})") from None
    return raw_np.view(dt).reshape(tuple(shape)), raw_np


def read_arrays(directory: Path, manifest: Manifest, storage: Storage, rank: int = 0,
                indices: Optional[Iterable[int]] = None) -> dict[int, Any]:
    """Materialise the requested arrays of ``rank`` (all when ``indices`` is None) on CPU."""
    check_data_files(directory, manifest)   # before allocating what the manifest declares
    section = manifest.ranks[rank]
    wanted = sorted(set(range(len(section.arrays)) if indices is None else indices))
    out: dict[int, Any] = {}
    requests: list[tuple[int, Any]] = []
    scatter: dict[int, list[tuple[np.ndarray, int, int, int]]] = {}   # chunk → (dst, dst_off, src_off, len)
    for index in wanted:
        entry = section.arrays[index]
        value, raw = _allocate(entry.dtype, entry.shape, entry.nbytes)
        out[index] = value
        cursor = 0
        for chunk, offset, length in entry.parts:
            if offset == 0 and length == manifest.chunks[chunk].raw_length and chunk not in scatter:
                # The chunk is exactly this piece: decode straight into the array.
                requests.append((chunk, memoryview(raw[cursor:cursor + length])))
            else:
                scatter.setdefault(chunk, []).append((raw, cursor, offset, length))
            cursor += length
    scratch = {}
    for chunk in scatter:
        try:
            scratch[chunk] = np.empty(manifest.chunks[chunk].raw_length, dtype=np.uint8)
        except MemoryError:
            raise RestoreError(f"cannot allocate the {manifest.chunks[chunk].raw_length} bytes the "
                               f"manifest declares for chunk {chunk}") from None
        requests.append((chunk, memoryview(scratch[chunk])))
    if requests:
        storage.read(directory, manifest, requests)
    for chunk, pieces in scatter.items():
        src = scratch[chunk]
        for dst, dst_off, src_off, length in pieces:
            dst[dst_off:dst_off + length] = src[src_off:src_off + length]
    return out


def item_arrays(tree: Any, names: Iterable[str]) -> set[int]:
    """Array indices referenced by the named top-level items of a rank's tree."""
    keys, values = tree["keys"], tree["values"]
    wanted = set(names)
    found: set[int] = set()
    for key, node in zip(keys, values):
        if key in wanted:
            found.update(walk_arrays(node))
    return found


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
    (the caller stores the returned value).
    """
    if isinstance(target, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            raise RestoreError(f"{path}: checkpoint holds {type(saved).__name__}, target is a tensor")
        if tuple(saved.shape) != tuple(target.shape):
            raise RestoreError(f"{path}: shape {tuple(saved.shape)} in checkpoint, "
                               f"{tuple(target.shape)} in target")
        with torch.no_grad():
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
            if key in saved:
                target[key] = restore_into(target[key], saved[key], f"{path}[{key!r}]")
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
