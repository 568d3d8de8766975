"""The GPU copy path's bookkeeping, exercised on the CPU: grouping CUDA arrays so the writer can
start after each group, which chunks get device checksums, the pieces and zero gaps the kernel
is given, and the finisher that releases groups to the writer. CPU tensors stand in for
device tensors (their host addresses are what the kernel's host reference reads).
"""

import bisect
import threading

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointManager, native
from async_ckpt.pipeline import device_copy
from async_ckpt.pipeline import snapshot as snapshot_mod
from async_ckpt.pipeline.device_copy import CudaMark
from async_ckpt.pipeline.plan import plan_save
from async_ckpt.pipeline.saving import save_one_rank
from async_ckpt.storage.commit import RenameCommit
from async_ckpt.storage.native_files import NativeStorage
from async_ckpt.tools.verify import PARTIAL, check_step

CHUNK = 64 << 10


def make_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [10, 3000, 70_000, 5, 40_000, 200_000, 17, 16_000, 16_001, 90_000, 1, 33_333]
    dtypes = [torch.float32, torch.bfloat16, torch.uint8, torch.float64]
    tensors = {}
    for k, n in enumerate(sizes):
        dt = dtypes[k % len(dtypes)]
        t = torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8)
        tensors[f"t{k}"] = t.to(dt) if dt != torch.uint8 else t
    return {"model": tensors}


def staged_snapshot(plan, garbage=0xAB):
    buf = torch.full((plan.staging_bytes,), garbage, dtype=torch.uint8)   # a reused, dirty buffer
    snap = snapshot_mod.Snapshot(plan, buf, native.Gate())
    indices = [i for i, a in enumerate(plan.arrays) if a.nbytes]
    snapshot_mod._copy_cpu(plan, buf, indices)
    return snap, indices


@pytest.mark.parametrize("group_bytes", [1, 100_000, 300_000, 10**9])
def test_groups_cover_every_array_once_and_never_split_a_chunk(group_bytes):
    plan = plan_save(make_state(), CHUNK)
    indices = [i for i, a in enumerate(plan.arrays) if a.nbytes]
    groups = device_copy.plan_groups(plan, indices, group_bytes)
    assert [i for g in groups for i in g] == indices
    for g in groups[:-1]:
        assert sum(plan.arrays[i].nbytes for i in g) >= group_bytes
    owner = {}
    for k, g in enumerate(groups):
        for i in g:
            for chunk, _, _ in plan.parts[i]:
                assert owner.setdefault(chunk, k) == k, f"chunk {chunk} split between groups"
    if group_bytes == 10**9:
        assert len(groups) == 1


def test_only_chunks_made_entirely_of_eligible_arrays_are_device_checked():
    plan = plan_save(make_state(), CHUNK)
    indices = [i for i, a in enumerate(plan.arrays) if a.nbytes]
    groups = device_copy.plan_groups(plan, indices, 100_000)
    everything = device_copy.device_checked_chunks(plan, groups, set(indices))
    assert sorted(c for g in everything for c in g) == list(range(len(plan.chunks)))
    excluded = indices[1]                          # e.g. a non-contiguous or host tensor
    some = device_copy.device_checked_chunks(plan, groups, set(indices) - {excluded})
    lost = {c for c, _, _ in plan.parts[excluded]}
    assert sorted(c for g in some for c in g) == sorted(set(range(len(plan.chunks))) - lost)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pieces_and_zeroed_gaps_reproduce_the_staged_chunk_crcs(seed):
    plan = plan_save(make_state(seed), CHUNK)
    snap, indices = staged_snapshot(plan)
    host = snap.buffer.numpy()
    groups = device_copy.plan_groups(plan, indices, 150_000)
    checked = device_copy.device_checked_chunks(plan, groups, set(indices))
    sources = {i: plan.arrays[i].value.data_ptr() for i in indices}
    for group, chunks in zip(groups, checked):
        rows, gaps = device_copy.chunk_pieces(plan, chunks, group, sources)
        for a, b in gaps:
            assert (host[a:b] == 0xAB).all()         # only padding is uncovered
            host[a:b] = 0
        got = native._native.crc32c_pieces(np.array(rows, np.uint64).reshape(-1, 4),
                                           [plan.chunks[c].length for c in chunks])
        want = [native.crc32c(host[plan.chunks[c].start:plan.chunks[c].start + plan.chunks[c].length])
                for c in chunks]
        assert got == want


class FakeEvent:
    """Stands in for torch.cuda.Event: records how far the gate was open when waited on."""

    def __init__(self, gate, seen):
        self.gate, self.seen = gate, seen

    def synchronize(self):
        self.seen.append(self.gate.ready)


def snapshot_with_marks(plan, crc_of=lambda words: words):
    snap, indices = staged_snapshot(plan)
    host = snap.buffer.numpy()
    groups = device_copy.plan_groups(plan, indices, 150_000)
    checked = device_copy.device_checked_chunks(plan, groups, set(indices))
    seen = []
    for g, (group, chunks) in enumerate(zip(groups, checked)):
        rows, gaps = device_copy.chunk_pieces(plan, chunks, group, {i: plan.arrays[i].value.data_ptr() for i in group})
        for a, b in gaps:
            host[a:b] = 0
        words = native._native.crc32c_pieces(np.array(rows, np.uint64).reshape(-1, 4),
                                             [plan.chunks[c].length for c in chunks])
        crcs = torch.tensor(np.array(crc_of(words), np.uint32).view(np.int32))
        front = plan.offsets[groups[g + 1][0]] if g + 1 < len(groups) else float("inf")
        snap.cuda_marks.append(CudaMark(FakeEvent(snap.gate, seen), front, crcs, np.array(chunks, np.int64)))
    return snap, seen


def test_finisher_opens_the_gate_group_by_group_and_publishes_device_crcs():
    plan = plan_save(make_state(), CHUNK)
    snap, seen = snapshot_with_marks(plan)
    assert len(snap.cuda_marks) >= 3 and snap.gate.ready == 0
    snap._finish()
    ends = plan.chunk_ends
    expected_before = [0] + [bisect.bisect_right(ends, m.front) for m in snap.cuda_marks[:-1]]
    assert seen == expected_before                  # each group released before the next wait
    assert snap.gate.ready == len(plan.chunks)
    assert snap.crcs.known.all()
    host = snap.buffer.numpy()
    for c, chunk in enumerate(plan.chunks):
        assert snap.crcs.values[c] == native.crc32c(host[chunk.start:chunk.start + chunk.length])


def test_device_crcs_flow_into_a_committed_checkpoint(tmp_path):
    plan = plan_save(make_state(), CHUNK)
    snap, _ = snapshot_with_marks(plan)
    storage = NativeStorage(io_threads=2, compression=None)
    threading.Thread(target=snap._finish).start()   # the writer waits on the gate meanwhile
    info = save_one_rank(RenameCommit(storage, str(tmp_path)), 3, snap, {}, 0.0)
    report = check_step(info.location, deep=True)
    assert report.verdict == PARTIAL, report.reason          # intact; only lacks optimizer, RNG, ...
    with CheckpointManager(tmp_path) as mgr:      # load checks every chunk's crc
        loaded = mgr.load(3)
    for name, t in make_state()["model"].items():
        assert torch.equal(loaded["model"][name], t), name


def test_check_mode_rejects_a_wrong_device_crc_and_commits_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ASYNC_CKPT_DEVICE_CRC", "check")
    plan = plan_save(make_state(), CHUNK)
    snap, _ = snapshot_with_marks(plan, crc_of=lambda words: [words[0] ^ 0x10] + list(words[1:]))
    snap._finish()
    with pytest.raises(Exception, match="differs from the host's"):
        save_one_rank(RenameCommit(NativeStorage(io_threads=2), str(tmp_path)), 3, snap, {}, 0.0)
    assert list(tmp_path.iterdir()) == []


class FakeStream:
    cuda_stream = 0

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


def fake_cuda(monkeypatch, launches):
    """CPU stand-ins for the CUDA calls enqueue makes; the 'kernel' is the host reference."""
    import contextlib

    class Event:
        def record(self, stream):
            pass

        def synchronize(self):
            pass

    def launch(pieces, lens, stream, device):
        launches.append(len(lens))
        words = native._native.crc32c_pieces(pieces, lens, 16384)
        return torch.tensor(np.array(words, np.uint32).view(np.int32)), None

    monkeypatch.setattr(device_copy, "side_stream", lambda device, role="copy": FakeStream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(device_copy.device_crc, "available", lambda device: True)
    monkeypatch.setattr(device_copy.device_crc, "launch", launch)


@pytest.mark.parametrize("clone", [False, True])
def test_enqueue_stages_every_array_and_checksums_every_chunk(monkeypatch, clone):
    launches = []
    fake_cuda(monkeypatch, launches)
    state = make_state(3)
    state["model"]["strided"] = torch.arange(600.0).reshape(20, 30).t()   # not plain: host crc
    plan = plan_save(state, CHUNK)
    buf = torch.full((plan.staging_bytes,), 0xAB, dtype=torch.uint8)
    snap = snapshot_mod.Snapshot(plan, buf, native.Gate())
    host = buf.numpy()
    indices = sorted((i for i, a in enumerate(plan.arrays) if a.nbytes), key=plan.offsets.__getitem__)
    snap.cuda_marks = device_copy.enqueue(
        plan, host, indices, lambda i: snapshot_mod._host_destination(plan, buf, host, i)[1],
        clone=lambda i: clone, group_bytes=150_000)
    snap._finish()
    # One launch per group that has device-checkable chunks (the strided tensor's has none).
    assert len(launches) == sum(m.crcs is not None for m in snap.cuda_marks) >= 3
    assert snap.gate.ready == len(plan.chunks)
    strided = next(i for i, a in enumerate(plan.arrays) if a.shape == (30, 20))
    host_checked = {c for c, _, _ in plan.parts[strided]}
    assert [c for c in range(len(plan.chunks)) if not snap.crcs.known[c]] == sorted(host_checked)
    for c, chunk in enumerate(plan.chunks):
        staged = host[chunk.start:chunk.start + chunk.length]
        if snap.crcs.known[c]:
            assert snap.crcs.values[c] == native.crc32c(staged)
    for i in indices:
        assert torch.equal(snapshot_mod._host_destination(plan, buf, host, i)[1], plan.arrays[i].value)


def test_a_failed_launch_turns_device_checksums_off_and_the_save_goes_on(monkeypatch):
    launches = []
    fake_cuda(monkeypatch, launches)

    def broken(*args):
        launches.append("x")
        raise RuntimeError("launch failed")

    monkeypatch.setattr(device_copy.device_crc, "launch", broken)
    disabled = []
    monkeypatch.setattr(device_copy.device_crc, "disable", lambda device, why: disabled.append(why))
    plan = plan_save(make_state(), CHUNK)
    buf = torch.zeros(plan.staging_bytes, dtype=torch.uint8)
    host = buf.numpy()
    indices = sorted((i for i, a in enumerate(plan.arrays) if a.nbytes), key=plan.offsets.__getitem__)
    marks = device_copy.enqueue(plan, host, indices, lambda i: snapshot_mod._host_destination(plan, buf, host, i)[1],
                                clone=lambda i: False, group_bytes=150_000)
    assert launches == ["x"] and disabled == ["launch failed"]       # tried once, then host checksums
    assert all(m.crcs is None and len(m.chunks) == 0 for m in marks)
