"""The manager's own collectives, on a gloo group it creates for itself.

Training may use NCCL (or gloo) on the default group; the manager never touches it. At
construction every rank calls :meth:`Collectives.create` (itself a collective: the group
is made with ``new_group``), and from then on the manager calls these methods in the same
order on every rank:

1. Training thread, ``CheckpointManager.__init__`` / ``reload``: :meth:`broadcast_json`
   (the coordinator's list of committed steps) and :meth:`barrier`.
2. Background commit thread, once per save, in step order: :meth:`broadcast_json` (the
   step's location, from the coordinator), :meth:`check_alive` (names ranks that died),
   :meth:`gather_json` (every rank's result), :meth:`broadcast_json` (the outcome).
3. Caller's thread, ``restore`` / ``load`` / ``delete`` / ``close``: :meth:`broadcast_json`
   and :meth:`barrier`.

Only one thread uses the group at a time: the manager waits for its background saves
before any collective on the caller's thread. Payloads are JSON bytes in uint8 tensors
(never pickle). Every call is bounded by the group's timeout and raises
:class:`CollectiveError` when a peer fails or does not answer in time.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, Optional

from .errors import CheckpointError


class CollectiveError(CheckpointError):
    """A collective of the manager's group failed or timed out (a rank died or hung)."""


class Collectives:
    """Rank, world size and JSON collectives on a private gloo group."""

    def __init__(self, group: Any, rank: int, world_size: int, timeout_s: float) -> None:
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s

    @classmethod
    def create(cls, process_group: Any = None, timeout_s: float = 120.0) -> Optional["Collectives"]:
        """Collectives over ``process_group``'s ranks (default: the whole world), or None
        when torch.distributed is not initialised or the world is one process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if process_group is not None:
                raise CheckpointError("process_group given but torch.distributed is not initialised")
            return None
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        world = dist.get_world_size(process_group)
        if world == 1:
            return None
        group = dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout_s))
        return cls(group, dist.get_rank(group), world, timeout_s)

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0

    def _fail(self, what: str, e: BaseException) -> CollectiveError:
        return CollectiveError(f"rank {self.rank}: {what} on the checkpoint group failed or timed out after "
                               f"{self.timeout_s:g} s (a rank failed, died or hung): {e}")

    def broadcast_json(self, value: Any = None, src: int = 0) -> Any:
        """``value`` from rank ``src`` on every rank."""
        import torch
        import torch.distributed as dist

        try:
            data = json.dumps(value).encode() if self.rank == src else b""
            size = torch.tensor([len(data)], dtype=torch.int64)
            dist.broadcast(size, src=self._global(src), group=self.group)
            buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == src and data
                   else torch.empty(int(size.item()), dtype=torch.uint8))
            if int(size.item()):
                dist.broadcast(buf, src=self._global(src), group=self.group)
        except RuntimeError as e:
            raise self._fail("broadcast", e) from e
        return value if self.rank == src else json.loads(bytes(buf.numpy()).decode())

    def gather_json(self, value: Any, dst: int = 0) -> Optional[list[Any]]:
        """Every rank's ``value`` on rank ``dst`` (in rank order), None elsewhere."""
        return self._collect(value, dst)

    def all_gather_json(self, value: Any) -> list[Any]:
        """Every rank's ``value`` on every rank, in rank order."""
        out = self._collect(value, None)
        assert out is not None
        return out

    def _collect(self, value: Any, dst: Optional[int]) -> Optional[list[Any]]:
        """Gather (to ``dst``) or all-gather (``dst`` None) JSON values of any length: sizes
        first, then payloads padded to the longest."""
        import torch
        import torch.distributed as dist

        what = "all-gather" if dst is None else "gather"
        try:
            data = json.dumps(value).encode()
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.group)
            longest = max(int(s.item()) for s in sizes)
            mine = torch.zeros(longest, dtype=torch.uint8)
            if data:
                mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            receive = dst is None or self.rank == dst
            bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)] if receive else None
            if dst is None:
                dist.all_gather(bufs, mine, group=self.group)
            else:
                dist.gather(mine, bufs, dst=self._global(dst), group=self.group)
        except RuntimeError as e:
            raise self._fail(what, e) from e
        if bufs is None:
            return None
        return [json.loads(bytes(b.numpy()[:int(s.item())]).decode()) for b, s in zip(bufs, sizes)]

    def check_alive(self) -> None:
        """Every rank reached this point; on the coordinator a dead or hung rank is named
        (gloo's monitored barrier)."""
        import torch.distributed as dist

        try:
            dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=self.timeout_s),
                                   wait_all_ranks=True)
        except RuntimeError as e:
            raise self._fail("monitored barrier", e) from e

    def barrier(self) -> None:
        import torch.distributed as dist

        try:
            dist.barrier(group=self.group)
        except RuntimeError as e:
            raise self._fail("barrier", e) from e

    def _global(self, group_rank: int) -> int:
        import torch.distributed as dist

        return dist.get_global_rank(self.group, group_rank)

    def destroy(self) -> None:
        import torch.distributed as dist

        if self.group is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(self.group)
            except (RuntimeError, ValueError):
                pass
        self.group = None


# ----------------------------------------------------------------------------- replicas

def replicated_by_construction(state: Any) -> set[int]:
    """Data pointers of the tensors that are identical on every rank by construction:
    parameters of ``DistributedDataParallel`` modules (broadcast at start, updated from
    all-reduced gradients) and the optimizer states of those parameters. Buffers are not
    (DDP overwrites them from rank 0 before each forward, then the forward changes them),
    nor is anything else: a tensor that merely has the same shape on every rank may hold
    different values and is written by every rank."""
    import torch

    params: dict[int, Any] = {}
    for value in state.values():
        if isinstance(value, torch.nn.parallel.DistributedDataParallel):
            for p in value.module.parameters():
                params[id(p)] = p
    if not params:
        return set()
    out = {p.data_ptr() for p in params.values()}
    for value in state.values():
        if isinstance(value, torch.optim.Optimizer):
            for p, per_param in value.state.items():
                if id(p) in params:
                    out.update(t.data_ptr() for t in per_param.values()
                               if isinstance(t, torch.Tensor) and t.numel() and t.dim() > 0)
    return out


def array_signatures(state: Any, arrays: list) -> list[Optional[str]]:
    """Per array: what must match on another rank for the two to be the same bytes, or None
    for an array this rank writes itself whatever the others hold.

    Two kinds of arrays are shared: DTensor pieces (same global shape and offset means the
    same shard: the placements say the values are equal) and tensors replicated by
    construction (:func:`replicated_by_construction`). Everything else, per-rank RNG
    streams and data position included, stays per rank."""
    import torch

    replicated = replicated_by_construction(state)

    def shared(a: Any) -> bool:
        if a.nbytes == 0:
            return False
        if a.global_shape is not None:
            return True
        return isinstance(a.value, torch.Tensor) and a.value.data_ptr() in replicated

    return [f"{a.dtype}|{list(a.shape)}|{a.global_shape and list(a.global_shape)}|"
            f"{a.global_offset and list(a.global_offset)}" if shared(a) else None
            for a in arrays]


def assign_owners(signatures: list[list[Optional[str]]], nbytes: list[list[int]]) -> list[dict[int, tuple[int, int]]]:
    """For every rank, the arrays another rank writes: index → (owner rank, index).

    Arrays with the same index and signature on several ranks are one replica group; each
    group is written by one member, chosen to balance bytes: groups in descending size,
    each to the member with the fewest bytes so far (ties: the lowest rank). Pure and
    deterministic, so every rank computes the same answer from the same inputs.
    """
    world = len(signatures)
    groups: dict[tuple[int, str], list[int]] = {}
    for rank, sigs in enumerate(signatures):
        for i, sig in enumerate(sigs):
            if sig is not None:
                groups.setdefault((i, sig), []).append(rank)
    load = [0] * world
    for rank, sizes in enumerate(nbytes):     # what each rank writes anyway (its own arrays)
        load[rank] += sum(n for i, n in enumerate(sizes) if signatures[rank][i] is None)
    out: list[dict[int, tuple[int, int]]] = [{} for _ in range(world)]
    ordered = sorted(groups.items(), key=lambda kv: (-nbytes[kv[1][0]][kv[0][0]], kv[0][0], kv[0][1]))
    for (i, _), members in ordered:
        owner = min(members, key=lambda r: (load[r], r))
        load[owner] += nbytes[owner][i]
        for r in members:
            if r != owner:
                out[r][i] = (owner, i)
    return out


class ReplicaPlanner:
    """Decides, on the training thread inside ``save_async``, which arrays this rank leaves
    to another rank. One all-gather of a digest per save; the full signature lists travel
    only when some rank's structure changed since the last save."""

    def __init__(self, coll: Collectives) -> None:
        self.coll = coll
        self._digests: Optional[list[str]] = None
        self._mine: dict[int, tuple[int, int]] = {}

    def __call__(self, state: Any, arrays: list) -> dict[int, tuple[int, int]]:
        import hashlib

        sigs = array_signatures(state, arrays)
        sizes = [a.nbytes for a in arrays]
        digest = hashlib.sha256(json.dumps([sigs, sizes]).encode()).hexdigest()
        digests = self.coll.all_gather_json(digest)
        if digests != self._digests:
            everyone = self.coll.all_gather_json([sigs, sizes])
            self._mine = assign_owners([e[0] for e in everyone], [e[1] for e in everyone])[self.coll.rank]
            self._digests = digests
        return self._mine
