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

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from .. import __version__, faults
from ..format.manifest import ArrayEntry, ItemEntry, Manifest, RankResult, merge_ranks
from ..storage.base import ChunkSource, RankWrite, Storage
from ..storage.commit import CommitPolicy, policy_for
from . import device_crc
from .plan import plan_save
from .snapshot import Snapshot, take_snapshot


@dataclass(frozen=True)
class CommitInfo:
    step: int
    location: str               # the committed step's final location (a path for local roots)
    raw_bytes: int
    stored_bytes: int
    write_seconds: float
    reused_bytes: int = 0       # bytes the backend did not write again (hard-linked frozen files)


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
    arrays = tuple(ArrayEntry(ref.dtype, tuple(ref.shape), ref.nbytes, parts)
                   for ref, parts in zip(plan.arrays, plan.parts))
    return RankResult(rank, written.files, written.chunks, dict(plan.items), plan.tree, arrays,
                      written.reused_bytes)


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
        policy.abort(location)
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
        policy.abort(location)
        raise
