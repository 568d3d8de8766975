"""One save path for one rank or many: each rank writes its files and returns a
:class:`~async_ckpt.format.manifest.RankResult`; the coordinator merges the results into one
manifest and commits it through the commit policy. A single process is the one-rank case.

Threads: :func:`write_rank` runs on each rank's background thread, :func:`commit_ranks` on
the coordinator's; :func:`save_one_rank` composes them on the manager's background thread,
and :func:`write_checkpoint` runs them synchronously for fix and legacy conversion. On any
failure the step's location is removed and the error propagates: an earlier committed
step is never touched.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .. import __version__, faults
from ..errors import CheckpointError
from ..format.manifest import (ArrayEntry, ChunkEntry, FileEntry, ItemEntry, Manifest, RankResult,
                               merge_ranks)
from ..format.tree import ArrayTable
from ..storage.base import ChunkSource, RankWrite, Storage
from ..storage.commit import CommitPolicy, policy_for
from . import device_crc
from .plan import SavePlan, plan_save
from .snapshot import Snapshot, take_snapshot


@dataclass(frozen=True)
class CommitInfo:
    step: int
    location: str               # the committed step's final location (a path for local roots)
    raw_bytes: int
    stored_bytes: int
    write_seconds: float
    reused_bytes: int = 0       # bytes the backend did not write again (hard-linked frozen files)


def abort_quietly(policy: CommitPolicy, location: str) -> None:
    """Remove a save that will not commit without hiding why it failed: when the store is
    down the removal fails too, and the caller's error must stay the one that propagates
    (the next run's leftover cleanup removes what is left)."""
    try:
        policy.abort(location)
    except Exception as e:  # noqa: BLE001 - reported as a warning, the save's own error wins
        warnings.warn(f"async_ckpt: could not remove the unfinished step at {location}: {e}; "
                      "the next run cleans it up", RuntimeWarning, stacklevel=2)


def rank_write(step: int, rank: int, snapshot: Snapshot) -> RankWrite:
    """What the storage backend needs of a snapshot: bytes, chunks, readiness, crcs."""
    plan = snapshot.plan
    return RankWrite(step=step, rank=rank, buffer=snapshot.view(),
                     chunks=[ChunkSource(c.start, c.length, c.shuffle) for c in plan.chunks],
                     wait=snapshot.wait, gate=snapshot.gate, crcs=snapshot.crcs,
                     stable_from=plan.frozen_from, stable_signature=plan.frozen_signature,
                     check_known_crcs=device_crc.mode() == "check")


def write_rank(storage: Storage, location: str, step: int, rank: int, snapshot: Snapshot) -> RankResult:
    """Write this rank's chunks into ``location``; return its rank-local manifest part."""
    if faults.armed("after_staging"):
        snapshot.wait()
        faults.hit("after_staging")
    written = storage.write_rank(location, rank_write(step, rank, snapshot))
    snapshot.wait()     # surfaces a copy error even if a backend finished without it
    faults.hit("after_data")
    plan = snapshot.plan
    return RankResult(rank, written.files, written.chunks, dict(plan.items), manifest_tree(plan),
                      array_entries(plan), written.reused_bytes)


def array_entries(plan: SavePlan) -> tuple[ArrayEntry, ...]:
    """The manifest entry of every array of ``plan``, on the writer thread.

    Saves of one structure share a layout (plan.LayoutCache), and the entries are a pure
    function of the columns compared here and the layout's parts: they are kept on the
    layout with those columns and reused while all of them are equal (C-speed list
    equality), so a save of 20,000 tensors does not build 20,000 entries (and hand them to
    the cyclic collector) every time.
    """
    arrays, layout = plan.arrays, plan.layout
    if layout is None or not isinstance(arrays, ArrayTable):
        return _build_entries(plan)
    basis = (arrays.dtypes, arrays.shapes, arrays.nbytes, sorted(arrays.globals.items()),
             sorted(plan.stored_by.items()))
    memo = layout.entries             # [basis, entries] of the last save with this layout
    if memo and memo[0] == basis:
        return memo[1]
    entries = _build_entries(plan)
    memo[:] = [basis, entries]
    return entries


def manifest_tree(plan: SavePlan) -> Any:
    """The tree for the manifest, on the writer thread: ``plan.tree``, or the tree of the
    last save with this layout when the two serialise to the same JSON.

    The tree holds the step's scalars, so it is encoded afresh at every save; but a run's
    trees are usually identical, and the manifest serialises a tree it has seen once
    (format.manifest._TextMemo, by identity). Same JSON means equal (``==``, 1.4 ms for a
    tree of 20,000 tensors where its JSON takes 16 ms) with numbers of the same kinds
    (``ArrayTable.scalar_kinds``), which tell apart what ``==`` does not and JSON does:
    ``True`` and ``1``, ``1`` and ``1.0``, ``0.0`` and ``-0.0``.
    """
    layout, arrays = plan.layout, plan.arrays
    if layout is None or not isinstance(arrays, ArrayTable):
        return plan.tree
    memo = layout.tree                # [scalar kinds, tree] of the last save with this layout
    if memo and memo[0] == arrays.scalar_kinds and memo[1] == plan.tree:
        return memo[1]
    memo[:] = [arrays.scalar_kinds, plan.tree]
    return plan.tree


def _build_entries(plan: SavePlan) -> tuple[ArrayEntry, ...]:
    stored_by = plan.stored_by
    return tuple(ArrayEntry(ref.dtype, tuple(ref.shape), ref.nbytes, parts, ref.global_shape, ref.global_offset,
                            stored_by.get(i))
                 for i, (ref, parts) in enumerate(zip(plan.arrays, plan.parts)))


def build_manifest(step: int, results: Sequence[RankResult], metrics: Mapping[str, float],
                   created_unix: float) -> Manifest:
    return merge_ranks(step, results, writer=f"async_ckpt {__version__}", created_unix=created_unix,
                       metrics={k: float(v) for k, v in metrics.items()})


def commit_ranks(policy: CommitPolicy, location: str, step: int, results: Sequence[RankResult],
                 metrics: Mapping[str, float], created_unix: float) -> str:
    """Coordinator: merge every rank's result, write manifest and marker, publish."""
    manifest = build_manifest(step, results, metrics, created_unix)
    return policy.publish(location, step, manifest, faults.hit)


def save_one_rank(policy: CommitPolicy, step: int, snapshot: Snapshot, metrics: Mapping[str, float],
                  created_unix: float) -> CommitInfo:
    """The whole save of a world of one: begin → write → merge → commit (abort on failure)."""
    t0 = time.perf_counter()
    location = policy.begin(step)
    try:
        result = write_rank(policy.storage, location, step, 0, snapshot)
        final = commit_ranks(policy, location, step, [result], metrics, created_unix)
    except BaseException:
        abort_quietly(policy, location)
        raise
    return CommitInfo(step, final, result.raw_bytes, result.stored_bytes, time.perf_counter() - t0,
                      result.reused_bytes)


def write_state(storage: Storage, location: str, step: int, state: Mapping[str, Any], *,
                item_meta: Optional[Mapping[str, ItemEntry]] = None,
                metrics: Optional[Mapping[str, float]] = None, chunk_bytes: int = 32 << 20) -> Manifest:
    """Synchronously write ``state`` exactly as given (no RNG added) into ``location``;
    return the manifest to publish (the caller commits it)."""
    import torch

    plan = plan_save(state, chunk_bytes, item_meta)
    buffer = torch.empty(max(1, plan.staging_bytes), dtype=torch.uint8)
    snapshot = take_snapshot(plan, buffer)
    result = write_rank(storage, location, step, 0, snapshot)
    return build_manifest(step, [result], metrics or {}, time.time())


def write_checkpoint(root: Union[str, Path], step: int, state: Mapping[str, Any], *,
                     item_meta: Optional[Mapping[str, ItemEntry]] = None,
                     metrics: Optional[Mapping[str, float]] = None,
                     storage: Optional[Storage] = None, chunk_bytes: int = 32 << 20) -> Path:
    """Synchronously write ``state`` exactly as given (no RNG added) as committed ``step``
    of the local root ``root`` (created if needed). Returns the step's directory."""
    from ..storage.native_files import NativeStorage

    storage = storage or NativeStorage()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    policy = policy_for(storage, str(root))
    location = policy.begin(step)
    try:
        manifest = write_state(storage, location, step, state, item_meta=item_meta, metrics=metrics,
                               chunk_bytes=chunk_bytes)
        return Path(policy.publish(location, step, manifest, faults.hit))
    except BaseException:
        abort_quietly(policy, location)
        raise


# ----------------------------------------------------------------------------- several ranks

def _result_to_json(r: RankResult) -> dict[str, Any]:
    return {"rank": r.rank, "reused_bytes": r.reused_bytes,
            "files": [[f.path, f.size] for f in r.files],
            "chunks": [[c.file, c.offset, c.length, c.raw_length, c.codec, c.shuffle, c.crc32c, c.raw_crc32c]
                       for c in r.chunks],
            "items": {k: [v.kind, v.type, v.reconstructed] for k, v in r.items.items()},
            "tree": r.tree,
            "arrays": [_array_to_json(a) for a in r.arrays]}


def _array_to_json(a: ArrayEntry) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(a).items() if v is not None}


def _result_from_json(d: dict[str, Any]) -> RankResult:
    rank = d["rank"]
    return RankResult(rank, tuple(FileEntry(p, s, rank) for p, s in d["files"]),
                      tuple(ChunkEntry(*c) for c in d["chunks"]),
                      {k: ItemEntry(*v) for k, v in d["items"].items()}, d["tree"],
                      tuple(_array_from_json(a) for a in d["arrays"]), d["reused_bytes"])


def _array_from_json(a: dict[str, Any]) -> ArrayEntry:
    fields = {f.name for f in dataclasses.fields(ArrayEntry)}
    kw = {k: (tuple(tuple(x) for x in v) if k == "parts" else tuple(v) if isinstance(v, list) else v)
          for k, v in a.items() if k in fields}
    return ArrayEntry(**kw)


def save_collective(coll: Any, policy: CommitPolicy, step: int, snapshot: Snapshot,
                    metrics: Mapping[str, float], created_unix: float) -> CommitInfo:
    """One save of a world of N, on every rank's background thread (``coll`` is the
    manager's :class:`~async_ckpt.distributed.Collectives`).

    The coordinator creates the step's location and shares it; every rank writes its own
    files; the coordinator commits only when every rank reported success, and every rank
    returns (or raises) the same outcome. A rank that raised is named in every rank's
    error; a rank that died or hung makes the collectives fail within the group's
    timeout, and the coordinator removes the location (or the next run cleans it up).
    """
    t0 = time.perf_counter()
    rank, coordinator = coll.rank, coll.is_coordinator
    msg: Any = None
    if coordinator:
        try:
            msg = {"location": policy.begin(step)}
        except Exception as e:  # noqa: BLE001 - reported to every rank
            msg = {"error": f"rank 0 could not create the location of step {step}: {type(e).__name__}: {e}"}
    msg = coll.broadcast_json(msg)
    if "error" in msg:
        raise CheckpointError(msg["error"])
    location = msg["location"]
    local_error: Optional[BaseException] = None
    try:
        payload = {"ok": _result_to_json(write_rank(policy.storage, location, step, rank, snapshot))}
    except Exception as e:  # noqa: BLE001 - every rank learns of it
        local_error = e
        payload = {"error": f"{type(e).__name__}: {e}"}
    try:
        coll.check_alive()
        payloads = coll.gather_json(payload)
    except BaseException:
        if coordinator:
            abort_quietly(policy, location)
        raise
    outcome: Any = None
    if coordinator:
        assert payloads is not None
        failed = [[r, p["error"]] for r, p in enumerate(payloads) if "error" in p]
        if not failed:
            try:
                results = [_result_from_json(p["ok"]) for p in payloads]
                final = commit_ranks(policy, location, step, results, metrics, created_unix)
                outcome = {"location": final, "raw": sum(r.raw_bytes for r in results),
                           "stored": sum(r.stored_bytes for r in results),
                           "reused": sum(r.reused_bytes for r in results)}
            except Exception as e:  # noqa: BLE001 - reported to every rank
                failed = [[0, f"commit failed: {type(e).__name__}: {e}"]]
        if failed:
            abort_quietly(policy, location)
            outcome = {"failed": failed}
    outcome = coll.broadcast_json(outcome)
    if "failed" in outcome:
        detail = "; ".join(f"rank {r}: {m}" for r, m in outcome["failed"])
        raise CheckpointError(f"step {step} was not committed: {detail}") from local_error
    return CommitInfo(step, outcome["location"], outcome["raw"], outcome["stored"], time.perf_counter() - t0,
                      outcome["reused"])
