"""CheckpointManager: the orchestrator of saves, commits, rotation and restores.

Threads:

- The **training thread** calls ``save_async``: it waits for an in-flight slot, plans,
  copies the state into a staging buffer (the snapshot), queues the write and returns.
  After it returns, training may mutate every tensor.
- One **background commit thread** (a single-worker executor, so commits happen in step
  order) writes chunks through the storage backend (native threads, GIL released),
  writes the manifest, commits, and rotates.
- ``restore``/``load``/listing run on the caller's thread.
- With ``huge_pages=True``, one **huge-page thread** (:mod:`async_ckpt.pipeline.huge_pages`,
  niced like the writer) moves a staging buffer onto transparent huge pages once it has
  been idle for a while after a save; a save that takes the buffer again stops it.

What it composes: a storage backend (:mod:`async_ckpt.storage`, chosen by the directory:
a local path or a URL), the commit policy that backend supports, the save pipeline
(:mod:`async_ckpt.pipeline`: plan, snapshot, per-rank write, coordinator commit) and the
restore module. It knows nothing of byte formats or storage tricks.

Errors of a background save are re-raised exactly once, as :class:`SaveError` naming the
step, by the next ``save_async``/``save``/``wait_until_finished``/``close`` (or by the
handle's ``result()``, whichever comes first).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Optional, Union

from . import faults, rng, signals
from .distributed import Collectives, ReplicaPlanner
from .errors import CheckpointError, NotCommittedError, RestoreError, RootBusyError, SaveError
from .format.manifest import Manifest
from .gc_pause import paused_gc
from .options import CheckpointManagerOptions
from .pipeline import early_stage
from .pipeline.huge_pages import HugePageTidier
from .pipeline.plan import LayoutCache, SavePlan, plan_save
from .pipeline.restore import RNG_ITEM, load_items, restore_state
from .pipeline.saving import CommitInfo, save_collective, save_one_rank
from .pipeline.snapshot import Snapshot, StagingPool, copy_into
from .rotation import steps_to_delete
from .storage import Storage, open_root, policy_for
from .storage.commit import MarkerState
from .storage.native_files import NativeStorage

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SaveResult:
    """What one committed save cost. ``stall_seconds`` is the time ``save_async`` blocked."""

    step: int
    path: Union[Path, str]       # the step's directory (a URL for object stores)
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

    def add_done_callback(self, fn: Callable[["SaveHandle"], None]) -> None:
        """Call ``fn(handle)`` once the save has committed or failed (at once for a skipped or
        finished save). It runs on the manager's background thread: keep it short, and call
        ``result()`` inside it to learn the outcome (that consumes a failure, which is then
        not raised again by the next ``save_async``)."""
        if self._future is None:
            fn(self)
        else:
            self._future.add_done_callback(lambda _f: fn(self))

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
        return SaveResult(info.step, self._manager._display(info.location), info.raw_bytes, info.stored_bytes,
                          self.stall_seconds, finished - self._started, info.reused_bytes)


def _caller_level() -> int:
    """warnings.warn's stacklevel for the first frame outside this package (the user's call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _lower_priority(nice: int) -> None:
    """Run the calling thread ``nice`` steps nicer (Linux thread niceness; best effort)."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:
        pass


class CheckpointManager:
    """Saves, keeps and restores checkpoints of a training run under one directory.

    >>> with CheckpointManager("runs/exp1") as mgr:          # doctest: +SKIP
    ...     last = mgr.restore(state)
    ...     mgr.save_async(step, state, metrics={"loss": loss})
    """

    def __init__(self, directory: Union[str, os.PathLike], options: Optional[CheckpointManagerOptions] = None,
                 *, storage: Optional[Storage] = None, process_group: Any = None) -> None:
        self.options = options or CheckpointManagerOptions()
        o = self.options
        # Several ranks: every rank constructs the manager (this is a collective); rank 0 of
        # the group is the coordinator that creates, commits, rotates and cleans up.
        self._coll = Collectives.create(process_group, o.collective_timeout_s)
        self.rank = self._coll.rank if self._coll else 0
        self.world_size = self._coll.world_size if self._coll else 1
        # The training thread's collectives (which rank writes a replica) get a group of
        # their own: the background thread may be inside a collective of an earlier save.
        coll_fg = Collectives.create(process_group, o.collective_timeout_s) if self._coll else None
        self._replicas = ReplicaPlanner(coll_fg) if coll_fg is not None else None
        if storage is None:
            storage, root = open_root(directory, lambda: NativeStorage(
                o.io_threads, o.compression, o.compression_level, o.fsync, o.frozen_max_shared, o.writer_nice),
                compression=o.compression, level=o.compression_level, io_threads=o.io_threads)
        else:
            root = os.fspath(directory)
        self._storage = storage
        self._local = isinstance(storage, NativeStorage)
        self.directory: Union[Path, str] = (Path(root) if self._local else storage.describe(root)
                                            if isinstance(directory, dict) else os.fspath(directory))
        self._commit = policy_for(storage, root)
        self._release_lock_fn = None
        if self._is_coordinator:
            try:
                storage.create_location(root)
            except FileExistsError:
                pass
            # One lock per root, held by the coordinator: ranks on one node never refuse each other.
            self._release_lock_fn = self._take_lock()
        self._tidier = HugePageTidier(lambda: _lower_priority(o.writer_nice))
        self._pool = StagingPool(pinned_limit=o.max_pinned_bytes, tidier=self._tidier if o.huge_pages else None)
        self._slots = threading.BoundedSemaphore(o.max_inflight_saves)
        self._executor = cf.ThreadPoolExecutor(1, thread_name_prefix="async_ckpt-commit",
                                               initializer=_lower_priority, initargs=(o.writer_nice,))
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
        self._layouts = LayoutCache()              # training thread only
        self._closed = False
        if o.cleanup_leftovers and self._is_coordinator:
            self._commit.clean_leftovers()
        if self._coll is not None:
            self._coll.barrier()        # the root exists and is clean before any rank reads it
        self.reload()
        if o.handle_sigterm:
            signals.register(self)

    # ------------------------------------------------------------------ listing

    def reload(self, share: bool = True) -> None:
        """Re-read the committed steps from disk (after another process changed them).

        With several ranks this is a collective (the coordinator's listing is shared), unless
        ``share`` is False (the manager's own coordinator-only calls).

        Without ``best_metric`` this reads only each step's marker and streams its manifest
        through SHA-256 (nothing is parsed); with it, manifests are parsed for their metrics.
        A step that turns out invalid when read is passed over by ``restore`` with a warning.
        A damaged step never stops this: it is simply not listed."""
        if self.options.best_metric is None:
            committed: dict[int, dict[str, float]] = {step: {} for step in self._commit.bound_steps()}
        else:
            committed = {step: dict(status.manifest.metrics) for step, status in self._commit.committed().items()
                         if status.manifest is not None}
        if self._coll is not None and share:     # the coordinator's view is every rank's view
            shared = self._coll.broadcast_json(sorted(committed.items()) if self._is_coordinator else None)
            committed = {int(step): dict(metrics) for step, metrics in shared}
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
        lazy = self.options.snapshot == "lazy"
        plan, buffer, early, waited = self._plan_in_a_slot(full_state, lazy)
        try:
            deferred = self._arm_fence(state, plan) if lazy else frozenset()
        except BaseException:
            self._pool.release(buffer)
            self._slots.release()
            raise
        # The write is queued before the copy starts: with a gating backend the writer
        # starts on the staged chunks the moment the training thread's copy is done (and on
        # CUDA groups and lazily copied chunks as they land).
        snapshot = Snapshot(plan, buffer, self._storage.staging_gate())
        with self._state_lock:
            previous_step = self._last_step
            self._last_step = step
            future = self._executor.submit(self._write_in_background, step, snapshot, metrics, created)
            self._pending.append(future)
        future.add_done_callback(self._on_done)
        try:
            copy_into(snapshot, wait=not lazy, deferred=deferred, copier=self._copier,
                      recorded_addresses=not waited, early=early)
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
                # Snapshots whose copies landed need no fence: dropped here, the list stays
                # as long as the saves in flight even when no optimizer step ever fences it.
                self._unfenced = [s for s in self._unfenced if not s.copied]
                self._unfenced.append(snapshot)
        return SaveHandle(self, step, future, stall, started)

    def _plan_in_a_slot(self, full_state: dict[str, Any], lazy: bool
                        ) -> tuple[SavePlan, torch.Tensor, Optional[early_stage.EarlyStage], bool]:
        """Plan the save, take a staging slot (blocking while ``max_inflight_saves`` saves
        write) and a buffer for it. Returns the plan, the buffer, the early copy that ran
        while planning (if any) and whether encoding's addresses may be stale (other
        threads ran between encoding and now). Training thread; TypeError names a bad path.

        An eager save of a structure saved before starts copying while it is encoded, into
        the last layout (kept only if the plan confirms it, see pipeline.early_stage): its
        slot and buffer come first.
        """
        guess = None if lazy else self._layouts.layout
        if guess is not None and len(guess.offset_array) <= early_stage.EVERY:
            guess = None            # nothing to gain: the copy would start after encoding anyway
        early = None
        if guess is not None:
            self._slots.acquire()
            buffer = self._buffer_for_slot(guess.staging_bytes)
        try:
            if guess is not None:
                early = early_stage.EarlyStage(guess, buffer)
            with paused_gc():
                plan = plan_save(full_state, self.options.chunk_bytes, separate_frozen=self.options.reuse_frozen,
                                 cache=self._layouts, replicas=self._replicas, observer=early)
        except BaseException:
            if guess is not None:
                if early is not None:
                    early.wait()
                self._pool.release(buffer)
                self._slots.release()
            raise
        if early is None:
            # Waiting for a slot lets other threads run (done callbacks of earlier saves): the
            # addresses encoding recorded are then read again before the copy.
            waited = not self._slots.acquire(blocking=False)
            if waited:
                self._slots.acquire()
            return plan, self._buffer_for_slot(plan.staging_bytes), None, waited
        if buffer.numel() < plan.staging_bytes:      # the structure grew: the guess was wrong
            early.wait()
            self._pool.release(buffer)
            return plan, self._buffer_for_slot(plan.staging_bytes), None, False
        return plan, buffer, early, False

    def _buffer_for_slot(self, nbytes: int) -> torch.Tensor:
        """A staging buffer for the slot just taken (given back if there is none)."""
        try:
            return self._pool.acquire(nbytes)
        except BaseException:
            self._slots.release()
            raise

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
        fenced = {i for i, (value, nbytes) in enumerate(zip(plan.arrays.values, plan.arrays.nbytes))
                  if nbytes and isinstance(value, torch.Tensor) and value.data_ptr() in fenced_ptrs}
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
        ``restore`` calls it itself.
        """
        with self._state_lock:
            pending, self._unfenced = self._unfenced, []
        for snapshot in pending:
            snapshot.wait()

    def _write_in_background(self, step: int, snapshot, metrics: dict[str, float], created: float
                             ) -> tuple[CommitInfo, float]:
        try:
            if self._coll is None:
                info = save_one_rank(self._commit, step, snapshot, metrics, created)
            else:
                info = save_collective(self._coll, self._commit, step, snapshot, metrics, created)
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
            self._delete_step(step)

    def _delete_step(self, step: int) -> None:
        """Every rank forgets the step; the coordinator deletes it (rotation is a pure function
        of the committed steps, so all ranks agree on what goes without a collective)."""
        with self._state_lock:
            self._committed.pop(step, None)
        if self._is_coordinator:
            self._commit.delete(step, faults.hit)

    def delete(self, step: int) -> None:
        """Delete a committed step (waits for in-flight saves first). Collective with several ranks."""
        self.wait_until_finished()
        if step not in self.all_steps():
            raise RestoreError(f"step {step} is not a committed checkpoint in {self.directory}")
        self._delete_step(step)
        if self._coll is not None:
            self._coll.barrier()

    @property
    def _is_coordinator(self) -> bool:
        return self._coll is None or self._coll.is_coordinator

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
            if self._coll is not None:
                # No rank tears a group down while a peer's last message on it is in flight
                # (gloo aborts the process when a group dies with sends pending).
                self._coll.barrier()
                self._replicas.coll.barrier()
        finally:
            self._closed = True
            if self._coll is not None:
                self._coll.destroy()
            if self._replicas is not None:
                self._replicas.coll.destroy()
            self._executor.shutdown(wait=True)
            self._copier.shutdown(wait=True)
            for handle in self._fence_hooks.values():
                handle.remove()
            self._fence_hooks.clear()
            self._unfenced.clear()
            self._tidier.close()
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

    def _take_lock(self):
        try:
            return self._commit.lock()
        except RootBusyError as e:
            raise RootBusyError(f"{e}; close it first") from None

    def _release_lock(self) -> None:
        release, self._release_lock_fn = self._release_lock_fn, None
        if release is not None:
            release()

    def _display(self, location: str) -> Union[Path, str]:
        return Path(location) if self._local else self._storage.describe(location)

    # ------------------------------------------------------------------ restoring

    def _resolve_step(self, step: Optional[int]) -> Optional[tuple[int, Manifest, str]]:
        """The step to read, its validated manifest and location. With ``step`` None: the newest
        committed step, warning (RuntimeWarning) about every newer final-named step passed over
        and why, so that falling back to an older step is never silent."""
        if step is None:
            self.reload(share=False)
            with self._state_lock:
                in_flight = self._last_step if self._pending else None
            passed: list[str] = []
            found = None
            for candidate, name in reversed(self._commit.step_names()):
                status = self._commit.status(name)
                if status.committed and status.manifest is not None:
                    found = (candidate, status.manifest, self._commit.where(name))
                    break
                with self._state_lock:
                    self._committed.pop(candidate, None)
                if in_flight is not None and candidate <= in_flight and status.marker is MarkerState.MISSING:
                    continue    # this manager's own save, still being written (marker-last stores)
                passed.append(f"checkpoint-{candidate} ({status.reason or 'not committed'})")
            if passed:
                picked = f"restoring step {found[0]}" if found else "no committed step is left to restore"
                warnings.warn(f"async_ckpt: {self.directory}: passed over newer step(s) that are not committed "
                              f"or are corrupt: {'; '.join(passed)}; {picked}. Run `python -m async_ckpt.verify "
                              f"{self.directory}` for details.", RuntimeWarning, stacklevel=_caller_level())
            return found
        status = self._commit.status_of_step(step)
        if not status.committed or status.manifest is None:
            raise NotCommittedError(f"step {step} in {self.directory} is not committed: {status.reason}")
        return step, status.manifest, self._commit.where(status.name)

    def _resolve_shared(self, step: Optional[int]) -> Optional[tuple[int, Manifest, str]]:
        """``_resolve_step`` on the coordinator, its answer on every rank (collective)."""
        if self._coll is None:
            return self._resolve_step(step)
        self.wait_until_finished()      # the background thread must not be in a collective
        answer: Any = None
        if self._coll.is_coordinator:
            try:
                found = self._resolve_step(step)
                answer = {"step": None if found is None else found[0]}
            except CheckpointError as e:
                answer = {"error": str(e), "type": type(e).__name__}
        answer = self._coll.broadcast_json(answer)
        if "error" in answer:
            raise (NotCommittedError if answer["type"] == "NotCommittedError" else RestoreError)(answer["error"])
        if answer["step"] is None:
            return None
        return self._resolve_step(answer["step"])

    def load(self, step: Optional[int] = None) -> dict[str, Any]:
        """The raw tree of ``step`` (latest when None): state dicts, tensors on CPU, RNG states.

        With several ranks (collective) each rank gets its own section."""
        with paused_gc():
            resolved = self._resolve_shared(step)
            if resolved is None:
                raise RestoreError(f"no committed checkpoint in {self.directory}")
            _, manifest, location = resolved
            return load_items(self._storage, location, manifest, self.rank, self.world_size)

    def restore(self, state: Mapping[str, Any], step: Optional[int] = None, *,
                restore_rng: bool = True, atomic: bool = True) -> Optional[int]:
        """Restore the items named by ``state`` in place; return the step, or None when
        nothing is committed (and ``step`` was not given).

        Items the checkpoint holds but ``state`` does not name are left alone; an item
        ``state`` names that the checkpoint lacks raises RestoreError. RNG streams are
        restored last. By default (``atomic``) a restore that raises (a ChecksumError, a
        mismatched model) leaves ``state`` as it was: matching CPU tensors (module parameters
        and buffers, an optimizer's existing state, tensors in dicts) are read into
        directly, after the reader has copied their bytes into the staging buffer, and
        those bytes are put back if anything fails before their item is applied. With
        ``atomic=False`` there is no such copy; if that restore raises, those targets may
        hold partial data.
        """
        self._check_open()
        self.wait_for_snapshot()     # restore overwrites tensors a lazy save may still be copying
        with paused_gc():
            resolved = self._resolve_shared(step)
            if resolved is None:
                return None
            step, manifest, location = resolved
            restore_state(self._storage, location, manifest, state, rank=self.rank,
                          world_size=self.world_size, restore_rng=restore_rng, atomic=atomic,
                          borrow=self._borrow_staging)
        return step

    @contextlib.contextmanager
    def _borrow_staging(self, nbytes: int) -> Iterator[Any]:
        """A staging buffer of at least ``nbytes`` for an atomic restore's scratch, taken like a
        save's (one in-flight slot) and given back to the pool for the next save to reuse."""
        self._slots.acquire()
        try:
            # A new buffer is not touched first: the reader's backups fault its pages in on
            # the worker threads, while the disk is busy. Touched in one pass first, a new
            # manager's restore of 1 GiB fp32 took 1.12 s (median of 4) on the dev VM; 0.64 s
            # without.
            buffer = self._pool.acquire(nbytes)
            try:
                yield buffer[:nbytes]
            finally:
                self._pool.release(buffer, tidy=False)
        finally:
            self._slots.release()
