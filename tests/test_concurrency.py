"""Saving faster than the disk, closing with saves in flight, two managers on one directory,
and SIGTERM while a save is writing.

A slow storage (every write sleeps first) stands in for a disk slower than training.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import crash_worker as cw
from async_ckpt import CheckpointManager, CheckpointManagerOptions
import ckpt_layout as layout
from async_ckpt.errors import CheckpointError, SaveError
from async_ckpt.storage.native_files import NativeStorage


class RecordingStorage(NativeStorage):
    """Slow writes; records the order steps reach the disk; fails the steps in ``fail``."""

    def __init__(self, delay: float, fail=(), **kw) -> None:
        super().__init__(io_threads=2, **kw)
        self.delay = delay
        self.fail = set(fail)
        self.order: list[int] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def write_rank(self, location, request):
        step = layout.parse_tmp_dir(Path(location).name)
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            self.order.append(step)
            if step in self.fail:
                raise OSError(errno.EIO, "injected failure", str(location))
            return super().write_rank(location, request)
        finally:
            with self._lock:
                self.active -= 1


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _opts(**kw) -> CheckpointManagerOptions:
    kw.setdefault("handle_sigterm", False)
    kw.setdefault("io_threads", 2)
    kw.setdefault("compression", None)
    return CheckpointManagerOptions(**kw)


def test_saving_faster_than_the_disk_keeps_memory_bounded_and_order(tmp_path):
    state_bytes = 16 << 20
    model = {"w": torch.randn(state_bytes // 4)}
    storage = RecordingStorage(delay=0.03, fsync=False)
    inflight = 2
    n = 16
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    opts = _opts(max_to_keep=2, max_inflight_saves=inflight, fsync=False)
    with CheckpointManager(tmp_path, opts, storage=storage) as mgr:
        mgr.save(0, {"model": model})            # warm the staging pool and the writer
        base = _rss()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        stalls = []
        for step in range(1, n + 1):
            model["w"].add_(1.0)                  # training mutates the state right after save_async
            h = mgr.save_async(step, {"model": model})
            stalls.append(h.stall_seconds)
        mgr.wait_until_finished()
        elapsed = time.perf_counter() - t0
        stop.set()
        sampler.join()
        growth = peak[0] - base
        pool = mgr._pool.allocated_bytes
        print(f"{n} saves of {state_bytes >> 20} MiB in {elapsed:.2f} s; RSS growth {growth >> 20} MiB; "
              f"staging pool {pool >> 20} MiB; max concurrent writes {storage.max_active}")
        # Unbounded, the snapshots alone would need n * 16 MiB = 256 MiB.
        bound = (inflight + 1) * state_bytes * 1.25 + (64 << 20)
        assert pool <= (inflight + 1) * state_bytes * 1.25
        assert growth < bound, f"RSS grew by {growth >> 20} MiB (bound {int(bound) >> 20} MiB)"
        assert elapsed >= n * storage.delay * 0.9     # save_async did wait for the disk
        assert storage.order == list(range(0, n + 1)), storage.order     # commits in step order
        assert storage.max_active == 1
        assert mgr.all_steps() == [n - 1, n]
        last = mgr.load(n)["model"]["w"]
        assert torch.equal(last, model["w"])


def test_no_background_error_is_lost(tmp_path):
    storage = RecordingStorage(delay=0.01, fail={3, 7})
    raised = []
    handles = {}
    with CheckpointManager(tmp_path, _opts(max_to_keep=None, max_inflight_saves=2), storage=storage) as mgr:
        for step in range(10):
            state = {"model": {"w": torch.full((10,), float(step))}}
            try:
                handles[step] = mgr.save_async(step, state)
            except SaveError as e:     # an earlier step's failure; this step was not queued: retry
                raised.append(e.step)
                handles[step] = mgr.save_async(step, state)
        try:
            mgr.wait_until_finished()
        except SaveError as e:
            raised.append(e.step)
        while True:     # every failure surfaces exactly once
            try:
                mgr.wait_until_finished()
                break
            except SaveError as e:
                raised.append(e.step)
        assert sorted(raised) == [3, 7], raised
        assert mgr.all_steps() == [0, 1, 2, 4, 5, 6, 8, 9]
        for s in mgr.all_steps():
            assert mgr.load(s)["model"]["w"][0].item() == s
    assert not layout.find_leftovers(tmp_path)


def test_close_with_saves_in_flight_commits_them(tmp_path):
    storage = RecordingStorage(delay=0.15)
    mgr = CheckpointManager(tmp_path, _opts(max_to_keep=None, max_inflight_saves=3), storage=storage)
    for step in range(3):
        mgr.save_async(step, {"model": {"w": torch.full((1000,), float(step))}})
    mgr.close()
    mgr.close()     # idempotent
    with CheckpointManager(tmp_path, _opts()) as again:     # the lock was released
        assert again.all_steps() == [0, 1, 2]
        assert again.load(2)["model"]["w"][0].item() == 2.0


def test_close_with_a_failing_save_in_flight_raises_and_releases(tmp_path):
    storage = RecordingStorage(delay=0.1, fail={1})
    mgr = CheckpointManager(tmp_path, _opts(max_to_keep=None, max_inflight_saves=2), storage=storage)
    mgr.save_async(0, {"model": {"w": torch.zeros(3)}})
    mgr.save_async(1, {"model": {"w": torch.ones(3)}})
    with pytest.raises(SaveError) as info:
        mgr.close()
    assert info.value.step == 1
    mgr.close()     # already closed: no second raise
    with CheckpointManager(tmp_path, _opts()) as again:
        assert again.all_steps() == [0]
    assert not layout.find_leftovers(tmp_path)


def test_garbage_collected_manager_with_saves_in_flight_warns_and_commits(tmp_path):
    storage = RecordingStorage(delay=0.1)
    mgr = CheckpointManager(tmp_path, _opts(max_to_keep=None), storage=storage)
    mgr.save_async(0, {"model": {"w": torch.zeros(3)}})
    with pytest.warns(ResourceWarning):
        mgr.__del__()
    with CheckpointManager(tmp_path, _opts()) as again:
        assert again.all_steps() == [0]


# ----------------------------------------------------------------------------- across processes


@pytest.fixture(scope="module")
def server():
    return cw.shared_server()


def _wait_for(log: str, word: str, count: int = 1, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        events = cw.read_log(log)
        if len(events[word]) >= count:
            return events
        assert time.monotonic() < deadline, f"no {word!r} in the log\n{cw.stderr_of(log)}"
        time.sleep(0.005)


def test_second_live_manager_is_refused_and_a_killed_ones_lock_is_not(server, tmp_path):
    root, log = tmp_path / "root", str(tmp_path / "log")
    pid = server.start(root=str(root), seed=1, steps=0, log=log, options={"handle_sigterm": False}, hold=60)
    _wait_for(log, "started")
    with pytest.raises(CheckpointError, match="in use by another live CheckpointManager"):
        CheckpointManager(root, _opts())
    os.kill(pid, signal.SIGKILL)
    assert server.wait(pid) == -signal.SIGKILL
    with CheckpointManager(root, _opts()) as mgr:     # the kernel released the dead process's flock
        mgr.save(0, {"model": {"w": torch.zeros(2)}})
    with CheckpointManager(root, _opts()):
        with pytest.raises(CheckpointError):          # and in one process, too
            CheckpointManager(root, _opts())


def test_sigterm_during_a_save_lets_the_commit_finish(server, tmp_path):
    root, log = tmp_path / "root", str(tmp_path / "log")
    options = {"handle_sigterm": True, "max_to_keep": None, "max_inflight_saves": 2, "io_threads": 2}
    pid = server.start(root=str(root), seed=2, steps=10 ** 6, log=log, options=options, storage_delay=0.4)
    events = _wait_for(log, "queued", 2)          # step 0 is writing, step 1 queued behind it
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    status = server.wait(pid)
    waited = time.monotonic() - t0
    assert status == -signal.SIGTERM, f"{status}\n{cw.stderr_of(log)}"   # it still stops as asked
    events = cw.read_log(log)
    queued = events["queued"]
    assert queued and not events["done"]
    listed = cw.check_after_kill(str(root), 2, log, None, "small", context="after SIGTERM")
    assert listed == queued, f"queued {queued}, committed {listed} (waited {waited:.2f} s)"
