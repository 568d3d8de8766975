"""Copy/write overlap: the native Gate, and what a failed snapshot copy leaves behind."""

import threading
import time

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointError, CheckpointManager, CheckpointManagerOptions, layout, native
from async_ckpt import snapshot as snapshot_mod


def test_writer_waits_for_each_chunk_and_writes_what_was_staged(tmp_path):
    buf = np.zeros(4 << 20, np.uint8)
    jobs = [native.WriteJob(memoryview(buf)[i << 20:(i + 1) << 20], 0) for i in range(4)]
    gate = native.Gate()
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(
        "records", native.Writer(2).write([str(tmp_path / "d.bin")], jobs, True, gate)))
    t.start()
    time.sleep(0.2)
    assert t.is_alive() and gate.ready == 0          # nothing staged: the writer waits
    for i in range(4):
        buf[i << 20:(i + 1) << 20] = i + 1            # stage chunk i, then open it
        gate.advance(i + 1)
    t.join(10)
    data = np.fromfile(tmp_path / "d.bin", np.uint8)
    for r in out["records"]:
        chunk = data[r.offset:r.offset + r.length]
        assert (chunk == chunk[0]).all() and chunk[0] in (1, 2, 3, 4)
    assert sorted(int(data[r.offset]) for r in out["records"]) == [1, 2, 3, 4]


def test_cancelled_gate_fails_the_write(tmp_path):
    buf = np.zeros(2 << 20, np.uint8)
    jobs = [native.WriteJob(memoryview(buf)[i << 20:(i + 1) << 20], 0) for i in range(2)]
    gate = native.Gate()
    errors = []

    def run():
        try:
            native.Writer(2).write([str(tmp_path / "d.bin")], jobs, True, gate)
        except CheckpointError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    gate.advance(1)
    gate.cancel()
    t.join(10)
    assert errors and "cancelled" in str(errors[0])


def test_failed_copy_raises_its_own_error_and_leaves_nothing(tmp_path, monkeypatch):
    real = snapshot_mod._copy_cpu
    calls = []

    def flaky(plan, buffer, indices, *rest):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device fell off the bus")
        return real(plan, buffer, indices, *rest)

    monkeypatch.setattr(snapshot_mod, "_copy_cpu", flaky)
    state = {"w": torch.randn(1 << 20), "b": torch.ones(10)}
    o = CheckpointManagerOptions(io_threads=2, chunk_bytes=1 << 20)
    with CheckpointManager(tmp_path, o) as mgr:
        with pytest.raises(RuntimeError, match="bus"):
            mgr.save_async(5, state)
        mgr.save(5, state)                   # the same step can be retried
        mgr.wait_until_finished()            # and no SaveError is left over to surface
        assert mgr.all_steps() == [5]
        assert torch.equal(mgr.load(5)["w"], state["w"])
    assert layout.find_leftovers(tmp_path) == []


def test_many_chunks_stream_through_the_gate(tmp_path):
    tensors = {f"t{i}": torch.full((300_000,), float(i)) for i in range(12)}   # ~14 MiB, 1 MiB chunks
    o = CheckpointManagerOptions(io_threads=2, chunk_bytes=1 << 20, compression=None)
    with CheckpointManager(tmp_path, o) as mgr:
        for step in range(3):
            for t in tensors.values():
                t.add_(1)
            mgr.save_async(step, tensors)
        mgr.wait_until_finished()
        loaded = mgr.load(2)
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)
