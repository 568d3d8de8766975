"""Copy/write overlap: the native Gate, and what a failed snapshot copy leaves behind."""

import threading
import time

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointError, CheckpointManager, CheckpointManagerOptions, native
import ckpt_layout as layout
from async_ckpt.pipeline import snapshot as snapshot_mod


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


def test_staging_mixes_native_memcpy_and_strided_copies(tmp_path):
    base = torch.randn(600, 700)
    state = {
        "view": base.t(),                                  # strided: copied by torch
        "slice": base[::3, 5:],                            # strided
        "dense": base,                                     # memcpy'd natively
        "np": np.arange(300_000, dtype=np.int32),
        "np_strided": np.arange(100_000, dtype=np.float64)[::2],
        "bool": torch.rand(5000) > 0.5,
        "complex": torch.randn(1000, dtype=torch.complex64),
        "scalar": torch.tensor(3.5),
        "bf16": torch.randn(200_000).to(torch.bfloat16),
    }
    o = CheckpointManagerOptions(io_threads=2, chunk_bytes=1 << 20)
    with CheckpointManager(tmp_path, o) as mgr:
        mgr.save(0, state)
        loaded = mgr.load(0)
    for k, v in state.items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(loaded[k], v), k
        else:
            assert torch.equal(loaded[k], v), k


def test_stage_rejects_regions_outside_the_buffer():
    buf = np.zeros(64, np.uint8)
    src = np.arange(8, dtype=np.uint8)
    ptr = np.array([src.ctypes.data], np.uint64)
    native.stage(buf, ptr, np.array([16], np.uint64), np.array([8], np.uint64))
    assert buf[16:24].tolist() == list(range(8))
    with pytest.raises(CheckpointError):
        native.stage(buf, ptr, np.array([60], np.uint64), np.array([8], np.uint64))
    with pytest.raises(CheckpointError):
        native.stage(buf, np.array([0, 0], np.uint64), np.array([8, 0], np.uint64), np.array([1, 1], np.uint64))


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_stage_shared_among_threads_copies_every_byte_and_opens_every_chunk(threads):
    rng = np.random.default_rng(threads)
    sizes = [5 << 20, 1, 0, 12 << 20, 3000, 9 << 20, 7]          # cuts fall inside regions
    sources = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    offsets, cursor = [], 0
    for n in sizes:
        offsets.append(cursor)
        cursor += n + 64
    buf = np.zeros(cursor, np.uint8)
    ends = list(range(1 << 20, cursor, 1 << 20)) + [cursor]
    gate = native.Gate()
    native.stage(buf, np.array([s.ctypes.data for s in sources], np.uint64), np.array(offsets, np.uint64),
                 np.array(sizes, np.uint64), ends, gate, threads=threads)
    for s, o in zip(sources, offsets):
        assert np.array_equal(buf[o:o + len(s)], s)
    assert gate.ready == len(ends)
    with pytest.raises(CheckpointError, match="threads"):
        native.stage(buf, np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.uint64), threads=0)
