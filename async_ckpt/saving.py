"""One save, start to commit: tmp dir → chunks → manifest → marker → rename.

``write_snapshot_and_commit`` runs on the manager's background thread; it is also the
synchronous path ``write_checkpoint`` that ``fix`` uses to convert legacy checkpoints.
On any failure the tmp directory is removed and the error propagates: an earlier
committed step is never touched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from . import __version__, faults
from .layout import (ItemEntry, Manifest, RankSection, ArrayEntry, commit, remove_tree,
                     tmp_dir_name, write_manifest)
from .plan import plan_save
from .snapshot import Snapshot, take_snapshot
from .storage import NativeStorage, Storage


@dataclass(frozen=True)
class CommitInfo:
    step: int
    path: Path
    raw_bytes: int
    stored_bytes: int
    write_seconds: float
    files: tuple = ()           # FileEntry of every data file, as in the manifest
    chunks: tuple = ()          # ChunkEntry of every chunk, as in the manifest
    linked_bytes: int = 0       # bytes hard-linked from the previous step instead of written


def build_manifest(step: int, snapshot: Snapshot, files, chunks, metrics: Mapping[str, float],
                   created_unix: float) -> Manifest:
    plan = snapshot.plan
    arrays = tuple(ArrayEntry(ref.dtype, tuple(ref.shape), ref.nbytes, parts)
                   for ref, parts in zip(plan.arrays, plan.parts))
    rank = RankSection(0, dict(plan.items), plan.tree, arrays)
    return Manifest(step=step, writer=f"async_ckpt {__version__}", created_unix=created_unix,
                    world_size=1, metrics={k: float(v) for k, v in metrics.items()},
                    files=tuple(files), chunks=tuple(chunks), ranks=(rank,), extra={})


def write_snapshot_and_commit(root: Path, step: int, snapshot: Snapshot, storage: Storage,
                              metrics: Mapping[str, float], created_unix: float) -> CommitInfo:
    root = Path(root)
    tmp = root / tmp_dir_name(step)
    t0 = time.perf_counter()
    tmp.mkdir()
    try:
        if faults.armed("after_staging"):
            snapshot.wait()
            faults.hit("after_staging")
        files, chunks = storage.write(tmp, 0, snapshot)
        snapshot.wait()     # surfaces a copy error even if a backend finished without it
        faults.hit("after_data")
        manifest = build_manifest(step, snapshot, files, chunks, metrics, created_unix)
        manifest_bytes = write_manifest(tmp, manifest)
        faults.hit("after_manifest")
        final = commit(tmp, root, step, manifest_bytes, faults.hit)
    except BaseException:
        remove_tree(tmp)
        raise
    return CommitInfo(step, final, snapshot.plan.raw_bytes, sum(c.length for c in chunks),
                      time.perf_counter() - t0, tuple(files), tuple(chunks))


def write_checkpoint(root: Path, step: int, state: Mapping[str, Any], *,
                     item_meta: Optional[Mapping[str, ItemEntry]] = None,
                     metrics: Optional[Mapping[str, float]] = None,
                     storage: Optional[Storage] = None, chunk_bytes: int = 32 << 20) -> Path:
    """Synchronously write ``state`` exactly as given (no RNG added) as committed ``step``."""
    import torch

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    plan = plan_save(state, chunk_bytes, item_meta)
    buffer = torch.empty(max(1, plan.staging_bytes), dtype=torch.uint8)
    snapshot = take_snapshot(plan, buffer)
    info = write_snapshot_and_commit(root, step, snapshot, storage or NativeStorage(), metrics or {},
                                     time.time())
    return info.path
