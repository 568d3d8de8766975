"""Sharded arrays (docs/FORMAT.md section 6) read back into whatever layout the reader has.

A DTensor was saved as its local piece with the logical array's global shape and the
piece's global offset, one piece per rank (replicated pieces once). A reader with another
world size or sharding asks, per logical array (found by its tree path, the same on every
rank), for one box of the global array: its own local shard when the live value is a
DTensor, the whole array otherwise (``load()`` in one process, FSDP → DDP). It reads only
the saved pieces that overlap that box, and copies the overlap of each.

Runs on the caller's thread inside restore/load; knows nothing of steps or policy.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch

from ..errors import RestoreError
from ..format.dtypes import parse_array_dtype
from ..format.manifest import Manifest
from ..format.shards import Path, array_paths, pieces_by_path
from ..format.tree import is_dtensor

__all__ = ["Pieces", "array_paths", "live_dtensors", "local_box", "shard_like", "template_for"]


class Pieces:
    """Every saved piece of every logical (sharded) array, by tree path, across all ranks."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.by_path = pieces_by_path(manifest)

    def needs(self, wanted: list[tuple[Any, Path, str, tuple[int, ...], tuple[int, ...]]]
              ) -> tuple[dict[int, set[int]], list]:
        """For each ``(key, path, dtype, offset, shape)`` (the box [offset, offset + shape) of the
        logical array at ``path``): the saved pieces that overlap it. Returns the pieces to
        read, by rank, and the plan :meth:`assemble` takes."""
        need: dict[int, set[int]] = {}
        plan = []
        for key, path, dtype, offset, shape in wanted:
            hits = [(r, j, e) for r, j, e in self.by_path.get(path, [])
                    if _prod(shape) and _volume(e.global_offset, e.shape, offset, shape)]
            for r, j, _ in hits:
                need.setdefault(r, set()).add(j)
            plan.append((key, path, dtype, offset, shape, hits))
        return need, plan

    @staticmethod
    def assemble(plan: list, got: Mapping[tuple[int, int], Any]) -> dict[Any, torch.Tensor]:
        """The boxes of :meth:`needs`' plan from the pieces read (``got[(rank, index)]``); a box
        whose elements the pieces do not cover exactly once raises RestoreError."""
        out: dict[Any, torch.Tensor] = {}
        for key, path, dtype, offset, shape, hits in plan:
            box = torch.empty(shape, dtype=parse_array_dtype(dtype)[1])
            covered = 0
            for r, j, e in hits:
                src, dst = _slices(e.global_offset, e.shape, offset, shape)
                box[dst] = got[(r, j)][src]
                covered += _volume(e.global_offset, e.shape, offset, shape)
            if covered != _prod(shape):
                raise RestoreError(f"{'.'.join(map(str, path))}: the saved pieces cover {covered} of the "
                                   f"{_prod(shape)} elements asked for (overlapping or missing shards)")
            out[key] = box
        return out


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _volume(a_off, a_shape, b_off, b_shape) -> int:
    n = 1
    for ao, an, bo, bn in zip(a_off, a_shape, b_off, b_shape):
        n *= max(0, min(ao + an, bo + bn) - max(ao, bo))
    return n


def _slices(a_off, a_shape, b_off, b_shape) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(slices into piece a, slices into box b) of their overlap."""
    src, dst = [], []
    for ao, an, bo, bn in zip(a_off, a_shape, b_off, b_shape):
        lo, hi = max(ao, bo), min(ao + an, bo + bn)
        src.append(slice(lo - ao, hi - ao))
        dst.append(slice(lo - bo, hi - bo))
    return tuple(src), tuple(dst)


# ----------------------------------------------------------------------------- live targets

def live_dtensors(state: Mapping[str, Any]) -> dict[Path, Any]:
    """Tree path → live DTensor (or a parameter it mirrors) for the items of ``state``:
    module parameters/buffers through ``state_dict()``, optimizer states through the
    optimizer's ``state_dict()``, and, for a fresh optimizer without state yet, its
    parameters (a moment has its parameter's shape and sharding)."""
    out: dict[Path, Any] = {}
    for name, value in state.items():
        if isinstance(value, torch.nn.Module):
            for k, v in value.state_dict().items():
                if is_dtensor(v):
                    out[(name, k)] = v
        elif isinstance(value, torch.optim.Optimizer):
            params = [p for g in value.param_groups for p in g["params"]]
            sd = value.state_dict()
            for idx, p in enumerate(params):
                if is_dtensor(p):
                    out[(name, "state", idx, "*")] = p        # template for any moment of p
            for idx, per_param in sd.get("state", {}).items():
                for k, v in per_param.items():
                    if is_dtensor(v):
                        out[(name, "state", idx, k)] = v
        elif isinstance(value, dict):
            _walk_dict(value, (name,), out)
    return out


def _walk_dict(d: Mapping, path: Path, out: dict) -> None:
    for k, v in d.items():
        if is_dtensor(v):
            out[path + (k,)] = v
        elif isinstance(v, dict):
            _walk_dict(v, path + (k,), out)


def template_for(live: Mapping[Path, Any], path: Path, global_shape: tuple[int, ...]) -> Optional[Any]:
    """The live DTensor whose sharding the array at ``path`` should take, if any."""
    t = live.get(path)
    if t is None and len(path) == 4 and path[1] == "state":
        t = live.get(path[:3] + ("*",))
    if t is not None and tuple(t.shape) == tuple(global_shape):
        return t
    return None


def shard_like(template: Any, box: torch.Tensor) -> Any:
    """``box`` (this rank's local shard) as a DTensor sharded like ``template``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(box, template.device_mesh, template.placements, run_check=False,
                              shape=template.shape, stride=template.stride())


def local_box(template: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offset, local shape) of this rank's shard of ``template``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(template.shape, template.device_mesh, template.placements)
    return tuple(int(x) for x in offset), tuple(int(x) for x in shape)
