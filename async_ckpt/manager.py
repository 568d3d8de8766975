"""CheckpointManager: the orchestrator of saves, commits, rotation and restores.

Threads:

- The **training thread** calls ``save_async``: it waits for an in-flight slot, plans,
  copies the state into a staging buffer (the snapshot), queues the write and returns.
  After it returns, training may mutate every tensor.
- One **background commit thread** (a single-worker executor, so commits happen in step
  order) writes chunks through the storage backend (native threads, GIL released),
  writes the manifest, commits, and rotates.
- ``restore``/``load``/listing run on the caller's thread.

Errors of a background save are re-raised exactly once, as :class:`SaveError` naming the
step, by the next ``save_async``/``save``/``wait_until_finished``/``close`` (or by the
handle's ``result()``, whichever comes first).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from . import faults, layout, rng, signals
from .errors import CheckpointError, NotCommittedError, RestoreError, SaveError
from .options import CheckpointManagerOptions
from .plan import plan_save
from .restore import decode_items, item_arrays, match_destinations, read_arrays, restore_into
from .rotation import steps_to_delete
from .saving import CommitInfo, write_snapshot_and_commit
from .snapshot import Snapshot, StagingPool, copy_into
from .storage import NativeStorage, Storage

RNG_ITEM = "rng"


@dataclass(frozen=True)
class SaveResult:
    """What one committed save cost. ``stall_seconds`` is the time ``save_async`` blocked."""

    step: int
    path: Path
    raw_bytes: int
    stored_bytes: int
    stall_seconds: float
    seconds_to_commit: float     # from the save_async call to the commit
    linked_bytes: int = 0        # unchanged frozen parameters hard-linked from the previous step


class SaveHandle:
    """The future of one ``save_async``: ``done()`` and ``result()`` like concurrent.futures."""

    def __init__(self, manager: "CheckpointManager", step: int,
                 future: Optional[cf.Future], stall_seconds: float, started: float) -> None:
        self.step = step
        self._manager = manager
        self._future = future
        self.stall_seconds = stall_seconds
        self._started = started

    def done(self) -> bool:
        return self._future is None or self._future.done()

    @property
    def skipped(self) -> bool:
        """True when the step was not saved because ``should_save(step)`` said no."""
        return self._future is None

    def result(self, timeout: Optional[float] = None) -> Optional[SaveResult]:
        """Block until committed; None for a skipped step. Raises SaveError if it failed."""
        if self._future is None:
            return None
        try:
            info, finished = self._future.result(timeout)
        except SaveError:
            self._manager._consume_error(self._future)
            raise
        return SaveResult(info.step, info.path, info.raw_bytes, info.stored_bytes,
                          self.stall_seconds, finished - self._started, info.linked_bytes)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


class CheckpointManager:
    """Saves, keeps and restores checkpoints of a training run under one directory.

    >>> with CheckpointManager("runs/exp1") as mgr:          # doctest: +SKIP
    ...     last = mgr.restore(state)
    ...     mgr.save_async(step, state, metrics={"loss": loss})
    """

    def __init__(self, directory: Union[str, os.PathLike], options: Optional[CheckpointManagerOptions] = None,
                 *, storage: Optional[Storage] = None) -> None:
        self.directory = Path(directory)
        self.options = options or CheckpointManagerOptions()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._take_lock()
        o = self.options
        self._storage = storage or NativeStorage(o.io_threads, o.compression, o.compression_level, o.fsync)
        self._pool = StagingPool(pinned_limit=o.max_pinned_bytes)
        self._slots = threading.BoundedSemaphore(o.max_inflight_saves)
        self._executor = cf.ThreadPoolExecutor(1, thread_name_prefix="async_ckpt-commit")
        self._copier = cf.ThreadPoolExecutor(1, thread_name_prefix="async_ckpt-snapshot")
        self._unfenced: list = []                  # lazy snapshots whose copies may still run
        self._fence_hooks: dict[int, Any] = {}     # id(optimizer) → step pre-hook handle
        # Re-entrant: the SIGTERM handler may run on the main thread while it holds the lock.
        self._state_lock = threading.RLock()
        self._pending: list[cf.Future] = []
        self._failed: list[cf.Future] = []        # failed futures whose error is not yet raised
        self._abandoned: set[cf.Future] = set()   # saves whose copy failed; error already raised
        self._last_step: Optional[int] = None     # highest step queued or committed
        self._committed: dict[int, dict[str, float]] = {}   # step → metrics
        self._reuse = None    # storage.FrozenFile of the last commit; commit thread only
        self._closed = False
        if o.cleanup_leftovers:
            for leftover in layout.find_leftovers(self.directory):
                layout.remove_tree(leftover)
        self.reload()
        if o.handle_sigterm:
            signals.register(self)

    # ------------------------------------------------------------------ listing

    def reload(self) -> None:
        """Re-read the committed steps from disk (after another process changed them)."""
        committed = {}
        for step, path in layout.iter_step_dirs(self.directory):
            status = layout.commit_status(path)
            if status.committed:
                committed[step] = dict(status.manifest.metrics)
        with self._state_lock:
            self._committed = committed
            newest = max(committed, default=None)
            if newest is not None and (self._last_step is None or newest > self._last_step):
                self._last_step = newest

    def all_steps(self) -> list[int]:
        """Committed steps, ascending. Uncommitted leftovers are never listed."""
        with self._state_lock:
            return sorted(self._committed)

    def latest_step(self) -> Optional[int]:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def best_step(self) -> Optional[int]:
        """The committed step with the best ``best_metric`` (None without a metric or steps)."""
        metric = self.options.best_metric
        if metric is None:
            return None
        with self._state_lock:
            scored = [(m[metric], s) for s, m in self._committed.items() if metric in m]
        if not scored:
            return None
        pick = min if self.options.best_mode == "min" else max
        return pick(scored)[1]

    def should_save(self, step: int) -> bool:
        """Whether ``save_async(step, ...)`` would save (interval and step order)."""
        if self._last_step is not None and step <= self._last_step:
            return False
        return step % self.options.save_interval_steps == 0

    # ------------------------------------------------------------------ saving

    def save_async(self, step: int, state: Mapping[str, Any], metrics: Optional[Mapping[str, float]] = None,
                   *, force: bool = False) -> SaveHandle:
        """Snapshot ``state`` and write it as ``step`` in the background.

        Returns once the snapshot is taken: training may mutate the state right away.
        Blocks while ``max_inflight_saves`` saves are still writing. Steps must strictly
        increase. Steps that ``should_save`` rejects for the interval are skipped unless
        ``force`` (the handle then reports ``skipped``).
        """
        self._check_open()
        self._raise_pending_error()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} is not after the last saved step {self._last_step}; "
                             "steps must strictly increase")
        metrics = dict(metrics or {})
        for k, v in metrics.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"metrics must map str to numbers, got {k!r}: {v!r}")
        if not force and step % self.options.save_interval_steps:
            return SaveHandle(self, step, None, 0.0, time.perf_counter())

        started = time.perf_counter()
        created = time.time()
        full_state = dict(state)
        if RNG_ITEM in full_state:
            raise ValueError(f"'{RNG_ITEM}' is reserved for the random states async_ckpt saves itself")
        if self.options.save_rng:
            full_state[RNG_ITEM] = rng.capture()
        # TypeError names a bad path
        plan = plan_save(full_state, self.options.chunk_bytes, separate_frozen=self.options.reuse_frozen)
        lazy = self.options.snapshot == "lazy"
        deferred = self._arm_fence(state, plan) if lazy else frozenset()
        self._slots.acquire()
        try:
            buffer = self._pool.acquire(plan.staging_bytes)
        except BaseException:
            self._slots.release()
            raise
        # The write is queued before the copy starts: with a gating backend the writer
        # streams each chunk to disk as soon as the copy has staged it.
        snapshot = Snapshot(plan, buffer, self._storage.staging_gate())
        with self._state_lock:
            previous_step = self._last_step
            self._last_step = step
            future = self._executor.submit(self._write_in_background, step, snapshot, metrics, created)
            self._pending.append(future)
        future.add_done_callback(self._on_done)
        try:
            copy_into(snapshot, wait=not lazy, deferred=deferred, copier=self._copier)
        except BaseException:
            # The cancelled gate fails the queued write, which removes its tmp dir; the
            # caller gets the copy's own error, and the step may be retried.
            with self._state_lock:
                self._abandoned.add(future)
                self._last_step = previous_step
            cf.wait([future])
            self._consume_error(future)
            raise
        stall = time.perf_counter() - started
        if lazy:
            with self._state_lock:
                self._unfenced.append(snapshot)
        return SaveHandle(self, step, future, stall, started)

    def save(self, step: int, state: Mapping[str, Any], metrics: Optional[Mapping[str, float]] = None,
             *, force: bool = True) -> Optional[SaveResult]:
        """Save and block until ``step`` is committed. Returns None when the step is skipped."""
        return self.save_async(step, state, metrics, force=force).result()

    # ------------------------------------------------------------------ lazy snapshots

    def _arm_fence(self, state: Mapping[str, Any], plan) -> frozenset[int]:
        """Hook every optimizer in ``state`` and return the arrays copied lazily.

        Those are the arrays its next step mutates (parameters and optimizer moments) and,
        once some optimizer is hooked, the frozen parameters (training never mutates them;
        code that does, like an EMA update, runs after the fenced step or calls
        ``wait_for_snapshot``). Everything else (buffers that a forward pass updates, plain
        tensors) is copied before ``save_async`` returns.
        """
        import torch

        fenced_ptrs: set[int] = set()
        hooked = False
        for value in state.values():
            if not isinstance(value, torch.optim.Optimizer):
                continue
            hooked = True
            if id(value) not in self._fence_hooks:
                self._fence_hooks[id(value)] = value.register_step_pre_hook(
                    lambda *_: self._fence_pending())
            for group in value.param_groups:
                fenced_ptrs.update(p.data_ptr() for p in group["params"])
            for per_param in value.state.values():
                fenced_ptrs.update(t.data_ptr() for t in per_param.values() if isinstance(t, torch.Tensor))
        fenced = {i for i, ref in enumerate(plan.arrays)
                  if isinstance(ref.value, torch.Tensor) and ref.nbytes and ref.value.data_ptr() in fenced_ptrs}
        if hooked:
            # Also spares GPU memory: a lazy CUDA array that is not deferred is cloned first.
            fenced.update(plan.frozen_arrays)
        return frozenset(fenced)

    def _fence_pending(self) -> None:
        with self._state_lock:
            pending, self._unfenced = self._unfenced, []
        for snapshot in pending:
            snapshot.fence()

    def wait_for_snapshot(self) -> None:
        """Block until every lazy snapshot's copies are complete.

        Lazy mode fences optimizer steps automatically; call this before mutating saved
        tensors any other way (an EMA update, weight surgery, loading new weights).
        """
        with self._state_lock:
            pending, self._unfenced = self._unfenced, []
        for snapshot in pending:
            snapshot.wait()

    def _write_in_background(self, step: int, snapshot, metrics: dict[str, float], created: float
                             ) -> tuple[CommitInfo, float]:
        try:
            # A file shared by frozen_max_shared steps is written afresh: one bad sector then
            # reaches a bounded number of steps, and rot is not carried forward forever.
            reuse = self._reuse
            if reuse is not None and reuse.shared_by >= self.options.frozen_max_shared:
                reuse = None
            snapshot.reuse = reuse
            info = write_snapshot_and_commit(self.directory, step, snapshot, self._storage, metrics, created)
            self._reuse = self._storage.reuse_candidate(info.path, info.files, info.chunks, snapshot.plan)
            if reuse is not None and self._reuse is not None and _same_file(reuse.path, self._reuse.path):
                self._reuse = replace(self._reuse, shared_by=reuse.shared_by + 1)
                info = replace(info, linked_bytes=self._reuse.size)
        except BaseException as e:
            raise SaveError(f"saving step {step} failed: {e}", step) from e
        finally:
            self._pool.release(snapshot.buffer)
            self._slots.release()
        finished = time.perf_counter()
        with self._state_lock:
            self._committed[step] = metrics
        self._rotate()
        return info, finished

    def _rotate(self) -> None:
        with self._state_lock:
            doomed = steps_to_delete(sorted(self._committed), self._committed, self.options)
        for step in doomed:
            self._delete_dir(step)

    def _delete_dir(self, step: int) -> None:
        final = self.directory / layout.step_dir_name(step)
        # Hide first: a crash mid-delete leaves a tmp leftover, never a half-deleted step
        # that still looks committed.
        hidden = self.directory / layout.tmp_dir_name(step)
        with self._state_lock:
            self._committed.pop(step, None)
        try:
            os.rename(final, hidden)
        except FileNotFoundError:
            return
        faults.hit("during_rotation")
        layout.remove_tree(hidden)

    def delete(self, step: int) -> None:
        """Delete a committed step (waits for in-flight saves first)."""
        self.wait_until_finished()
        if step not in self.all_steps():
            raise RestoreError(f"step {step} is not a committed checkpoint in {self.directory}")
        self._delete_dir(step)

    # ------------------------------------------------------------------ errors and waiting

    def _on_done(self, future: cf.Future) -> None:
        with self._state_lock:
            if future in self._pending:
                self._pending.remove(future)
            if (not future.cancelled() and future.exception() is not None
                    and future not in self._abandoned and future not in self._failed):
                self._failed.append(future)

    def _consume_error(self, future: cf.Future) -> None:
        with self._state_lock:
            self._abandoned.add(future)
            if future in self._failed:
                self._failed.remove(future)

    def _raise_pending_error(self) -> None:
        with self._state_lock:
            if not self._failed:
                return
            future = self._failed.pop(0)
        raise future.exception()

    def wait_until_finished(self, timeout: Optional[float] = None) -> None:
        """Block until every queued save has committed or failed; re-raise a failure once."""
        with self._state_lock:
            pending = list(self._pending)
        done, not_done = cf.wait(pending, timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} save(s) still running after {timeout} s")
        for f in done:
            self._on_done(f)   # the callback may not have run yet
        self._raise_pending_error()

    def _drain_for_shutdown(self, timeout: float) -> None:
        """Called by the SIGTERM handler: let queued saves commit, bounded by ``timeout``."""
        if self._closed:
            return
        with self._state_lock:
            pending = list(self._pending)
        cf.wait(pending, timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("the CheckpointManager is closed")

    def close(self) -> None:
        """Wait for in-flight saves, release memory and the directory lock. Idempotent."""
        if self._closed:
            return
        try:
            self.wait_until_finished()
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)
            self._copier.shutdown(wait=True)
            for handle in self._fence_hooks.values():
                handle.remove()
            self._fence_hooks.clear()
            self._unfenced.clear()
            self._pool.clear()
            self._release_lock()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Do not mask the training loop's exception with a save error.
            try:
                self.close()
            except CheckpointError as e:
                warnings.warn(f"async_ckpt: {e}", RuntimeWarning, stacklevel=2)

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        if self._pending:
            warnings.warn("CheckpointManager garbage-collected with saves in flight; "
                          "call close() or use it as a context manager", ResourceWarning)
        try:
            self.close()
        except Exception:
            pass

    def _take_lock(self) -> int:
        try:
            return layout.lock_root(self.directory)
        except layout.RootBusyError as e:
            raise CheckpointError(f"{e}; close it first") from None

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ------------------------------------------------------------------ restoring

    def _resolve_step(self, step: Optional[int]) -> Optional[tuple[int, layout.Manifest, Path]]:
        if step is None:
            self.reload()
            step = self.latest_step()
            if step is None:
                return None
        path = self.directory / layout.step_dir_name(step)
        status = layout.commit_status(path)
        if not status.committed:
            raise NotCommittedError(f"step {step} in {self.directory} is not committed: {status.reason}")
        return step, status.manifest, path

    def load(self, step: Optional[int] = None) -> dict[str, Any]:
        """The raw tree of ``step`` (latest when None): state dicts, tensors on CPU, RNG states."""
        resolved = self._resolve_step(step)
        if resolved is None:
            raise RestoreError(f"no committed checkpoint in {self.directory}")
        _, manifest, path = resolved
        tree = manifest.ranks[0].tree
        arrays = read_arrays(path, manifest, self._storage)
        return decode_items(tree, arrays)

    def restore(self, state: Mapping[str, Any], step: Optional[int] = None, *,
                restore_rng: bool = True) -> Optional[int]:
        """Restore the items named by ``state`` in place; return the step, or None when
        nothing is committed (and ``step`` was not given).

        Items the checkpoint holds but ``state`` does not name are left alone; an item
        ``state`` names that the checkpoint lacks raises RestoreError. RNG streams are
        restored last. Matching CPU tensors (module parameters and buffers, tensors in
        dicts) are decoded into directly, so each byte is read once; if a restore raises
        (e.g. a ChecksumError), those targets may hold partial data.
        """
        self._check_open()
        resolved = self._resolve_step(step)
        if resolved is None:
            return None
        step, manifest, path = resolved
        tree = manifest.ranks[0].tree
        saved_names = set(tree["keys"])
        missing = [name for name in state if name not in saved_names]
        if missing:
            raise RestoreError(f"checkpoint step {step} has no item(s) {missing}; "
                               f"it holds {sorted(saved_names)}")
        names = list(state)
        want_rng = restore_rng and RNG_ITEM in saved_names and RNG_ITEM not in state
        if want_rng:
            names.append(RNG_ITEM)
        destinations: dict[int, Any] = {}
        for key, node in zip(tree["keys"], tree["values"]):
            if key in state:
                match_destinations(state[key], node, manifest.ranks[0].arrays, destinations)
        arrays = read_arrays(path, manifest, self._storage, indices=item_arrays(tree, names),
                             destinations=destinations)
        saved = decode_items(tree, arrays, names)
        if isinstance(state, dict):
            for name in state:
                state[name] = restore_into(state[name], saved[name], name)
        else:
            for name in state:
                restore_into(state[name], saved[name], name)
        if want_rng:
            rng.restore(saved[RNG_ITEM])
        return step
