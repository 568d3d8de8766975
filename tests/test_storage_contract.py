"""The storage contract: every backend and both commit policies pass the same tests.

Backends: the native files backend (local directories), the in-memory store (the model
of an object store), and the TensorStore kvstore backend on TensorStore's memory driver,
its file driver and S3 (a moto server on 127.0.0.1, tests/s3_server.py). Policies:
rename-based commit and marker-last commit. Each test runs on every (backend, policy) pair
the backend supports; the manager-level tests run through ``CheckpointManager`` itself.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions, ChecksumError, NotCommittedError
from async_ckpt.format import names
from async_ckpt.pipeline.plan import plan_save
from async_ckpt.pipeline.restore import load_items, read_arrays
from async_ckpt.pipeline.saving import build_manifest, save_one_rank, write_rank
from async_ckpt.pipeline.snapshot import take_snapshot
from async_ckpt.storage import open_root
from async_ckpt.storage.base import ReadRequest
from async_ckpt.storage.commit import MarkerLastCommit, MarkerState, RenameCommit
from async_ckpt.storage.memory import MemoryStorage
from async_ckpt.storage.native_files import NativeStorage
from s3_server import s3_server  # noqa: F401 - the session's S3 server fixture

_counter = itertools.count()


def native_root(tmp_path):
    return NativeStorage(io_threads=2, compression="zstd"), str(tmp_path)


def memory_root(tmp_path):
    return MemoryStorage(compression="zstd"), f"run{next(_counter)}"


def kv_memory_root(tmp_path):
    from async_ckpt.storage.kvstore import open_spec
    return open_spec({"driver": "memory", "path": f"run{next(_counter)}"}, compression="zstd", io_threads=2,
                     object_bytes=4096)


def kv_file_root(tmp_path):
    from async_ckpt.storage.kvstore import open_spec
    return open_spec({"driver": "file", "path": str(tmp_path / "ts")}, compression="zstd", io_threads=2,
                     object_bytes=4096)


def kv_s3_root(tmp_path, server):
    from async_ckpt.storage import open_root
    return open_root(f"s3://{server.new_bucket()}/run", compression="zstd", io_threads=2)


BACKENDS = {"native": native_root, "memory": memory_root, "ts-memory": kv_memory_root, "ts-file": kv_file_root,
            "s3": kv_s3_root}
CASES = [("native", RenameCommit), ("native", MarkerLastCommit), ("memory", MarkerLastCommit),
         ("ts-memory", MarkerLastCommit), ("ts-file", MarkerLastCommit), ("s3", MarkerLastCommit)]
IDS = [f"{b}-{p.__name__}" for b, p in CASES]


@pytest.fixture(params=CASES, ids=IDS)
def store(request, tmp_path):
    backend, policy_cls = request.param
    if backend.startswith("ts-") or backend == "s3":
        pytest.importorskip("tensorstore")
    if backend == "s3":
        storage, root = kv_s3_root(tmp_path, request.getfixturevalue("s3_server"))
    else:
        storage, root = BACKENDS[backend](tmp_path)
    try:
        storage.create_location(root)
    except FileExistsError:
        pass
    return policy_cls(storage, root)


def state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 33, generator=g), "b": torch.zeros(7, dtype=torch.bfloat16),
                      "ids": torch.arange(100)},
            "progress": {"step": seed, "note": "x"}, "table": np.arange(12.0).reshape(3, 4)}


def snapshot_of(s: dict, chunk_bytes: int = 4096):
    plan = plan_save(s, chunk_bytes)
    return take_snapshot(plan, torch.empty(max(1, plan.staging_bytes), dtype=torch.uint8))


def save(policy, step: int, seed: int = 0, fault=lambda name: None):
    snap = snapshot_of(state(seed))
    location = policy.begin(step)
    try:
        result = write_rank(policy.storage, location, step, 0, snap)
        return policy.publish(location, step, build_manifest(step, [result], {"loss": 1.0}, 0.0), fault)
    except BaseException:
        policy.abort(location)
        raise


def assert_equal_state(got: dict, want: dict) -> None:
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert got["progress"] == want["progress"]
    np.testing.assert_array_equal(got["table"], want["table"])


# ----------------------------------------------------------------------------- round trip

def test_write_read_round_trip(store):
    save(store, 3, seed=5)
    status = store.status_of_step(3)
    assert status.committed and status.manifest.step == 3
    got = load_items(store.storage, store.where(status.name), status.manifest)
    assert_equal_state(got, state(5))


def test_reads_decode_into_the_given_destination(store):
    save(store, 1)
    status = store.status_of_step(1)
    m, location = status.manifest, store.where(status.name)
    big = max(range(len(m.chunks)), key=lambda i: m.chunks[i].raw_length)
    out = np.zeros(m.chunks[big].raw_length, np.uint8)
    assert store.storage.read(location, m.files, [ReadRequest(big, m.chunks[big], memoryview(out))]) == [None]
    assert out.any()
    # check-only requests, decoded or not, need no destination
    reqs = [ReadRequest(i, c, None, decode=d) for i, c in enumerate(m.chunks) for d in (True, False)]
    assert store.storage.read(location, m.files, reqs, collect_errors=True) == [None] * len(reqs)


def test_pieces_scatter_a_chunk_and_a_failed_read_puts_backed_up_pieces_back(store):
    save(store, 4)
    status = store.status_of_step(4)
    m, location = status.manifest, store.where(status.name)
    order = sorted(range(len(m.chunks)), key=lambda i: m.chunks[i].raw_length)
    big, other = order[-1], order[-2]
    whole = np.zeros(m.chunks[big].raw_length, np.uint8)
    assert store.storage.read(location, m.files, [ReadRequest(big, m.chunks[big], memoryview(whole))]) == [None]

    def request(index: int, live: np.ndarray, backup: np.ndarray, crc_flip: int = 0) -> ReadRequest:
        third = len(live) // 3
        chunk = m.chunks[index]
        if crc_flip:
            chunk = replace(chunk, crc32c=chunk.crc32c ^ crc_flip, raw_crc32c=chunk.raw_crc32c ^ crc_flip)
        return ReadRequest(index, chunk, pieces=((memoryview(live[:third]), memoryview(backup[:third])),
                                                 (memoryview(live[third:]), None)))

    live = np.full(len(whole), 9, np.uint8)
    backup = np.zeros(len(whole), np.uint8)
    assert store.storage.read(location, m.files, [request(big, live, backup)]) == [None]
    assert np.array_equal(live, whole) and (backup[:len(whole) // 3] == 9).all()
    # A failing request next to a good one: the good one's backed-up piece holds its old bytes.
    live, backup = np.full(len(whole), 9, np.uint8), np.zeros(len(whole), np.uint8)
    live2 = np.full(m.chunks[other].raw_length, 5, np.uint8)
    backup2 = np.zeros(len(live2), np.uint8)
    with pytest.raises(ChecksumError):
        store.storage.read(location, m.files, [request(big, live, backup), request(other, live2, backup2, 1)])
    assert (live[:len(whole) // 3] == 9).all() and (live2[:len(live2) // 3] == 5).all()


def test_crc_mismatch_names_file_offset_and_chunk(store):
    save(store, 2)
    status = store.status_of_step(2)
    m, location = status.manifest, store.where(status.name)
    victim = max(range(len(m.chunks)), key=lambda i: m.chunks[i].length)
    c = m.chunks[victim]
    name = m.files[c.file].path
    blob = bytearray(store.storage.get(location, name, 1 << 30))
    blob[c.offset + c.length // 2] ^= 0x40
    store.storage.remove(location, name)
    store.storage.put(location, name, bytes(blob))
    with pytest.raises(ChecksumError) as info:
        read_arrays(store.storage, location, m)
    err = info.value
    assert err.chunk == victim and err.offset == c.offset and name in err.path
    errors = store.storage.read(location, m.files, [ReadRequest(victim, c, None, decode=False)], True)
    assert errors[0] is not None and "ChecksumError" in errors[0] and f"chunk {victim}" in errors[0]


# ----------------------------------------------------------------------------- visibility

def test_nothing_is_listed_before_the_marker(store):
    snap = snapshot_of(state())
    location = store.begin(4)
    result = write_rank(store.storage, location, 4, 0, snap)
    assert store.committed() == {}
    seen = []

    def fault(name):
        if name == "after_manifest":
            seen.append(sorted(store.committed()))

    store.publish(location, 4, build_manifest(4, [result], {}, 0.0), fault)
    assert seen == [[]]                     # manifest written, marker not yet: invisible
    assert sorted(store.committed()) == [4]


@pytest.mark.parametrize("point", ["after_manifest", "after_marker"])
def test_crash_leftovers_are_ignored_and_cleaned(store, point):
    save(store, 1)

    class Crash(Exception):
        pass

    def fault(name):
        if name == point:
            raise Crash(name)

    snap = snapshot_of(state(2))
    location = store.begin(2)
    result = write_rank(store.storage, location, 2, 0, snap)
    with pytest.raises(Crash):      # a crash: no abort runs, the location stays behind
        store.publish(location, 2, build_manifest(2, [result], {}, 0.0), fault)
    committed = sorted(store.committed())
    if point == "after_marker" and isinstance(store, MarkerLastCommit):
        assert committed == [1, 2]      # marker-last: the marker is the commit
    else:
        assert committed == [1]
        assert store.leftovers() and store.clean_leftovers()
        assert store.leftovers() == []
    assert 1 in store.committed()


def test_a_crashed_data_write_leaves_no_marker(store):
    save(store, 1)
    snap = snapshot_of(state(3))
    location = store.begin(3)
    write_rank(store.storage, location, 3, 0, snap)     # data, then the process dies
    assert sorted(store.committed()) == [1]
    assert store.status_of_step(3).marker is MarkerState.MISSING or isinstance(store, RenameCommit)
    store.clean_leftovers()
    assert [s for s, _ in store.step_names()] == [1]


def test_abort_removes_everything(store):
    snap = snapshot_of(state())
    location = store.begin(9)
    write_rank(store.storage, location, 9, 0, snap)
    store.abort(location)
    assert store.step_names() == [] and store.leftovers() == []


def test_begin_refuses_a_committed_step(store):
    save(store, 5)
    if isinstance(store, MarkerLastCommit):
        with pytest.raises(FileExistsError):
            store.begin(5)
    else:
        location = store.begin(5)
        result = write_rank(store.storage, location, 5, 0, snapshot_of(state(1)))
        with pytest.raises(FileExistsError):
            store.publish(location, 5, build_manifest(5, [result], {}, 0.0))
    assert_equal_state(load_items(store.storage, store.where("checkpoint-5"),
                                  store.status_of_step(5).manifest), state(0))


# ----------------------------------------------------------------------------- deleting

def test_delete_interrupted_never_leaves_a_committed_looking_step(store):
    save(store, 1)
    save(store, 2)

    class Crash(Exception):
        pass

    def fault(name):
        if name == "during_rotation":
            raise Crash(name)

    with pytest.raises(Crash):
        store.delete(1, fault)
    assert sorted(store.committed()) == [2]
    store.clean_leftovers()
    assert [s for s, _ in store.step_names()] == [2]


def test_delete_and_quarantine(store):
    save(store, 1)
    save(store, 2)
    store.delete(1)
    assert sorted(store.committed()) == [2]
    name = store.quarantine(2)
    assert names.parse_quarantine_dir(name) == 2
    assert store.committed() == {}
    assert store.leftovers() == []          # a quarantined step is never cleaned as a leftover


def test_damaged_marker_is_kept_and_rewritable(store):
    save(store, 6)
    location = store.where("checkpoint-6")
    store.storage.put(location, names.COMMIT_NAME, b"{}", replace=True)
    status = store.status_of_step(6)
    assert not status.committed and status.marker is MarkerState.BAD
    assert store.leftovers() == []          # damaged, not a leftover: verify and fix decide
    store.rewrite_marker(6)
    assert store.status_of_step(6).committed


# ----------------------------------------------------------------------------- the lock

def test_lock_excludes_a_second_holder(store):
    from async_ckpt.errors import RootBusyError

    release = store.lock()
    try:
        if release is not None:
            with pytest.raises(RootBusyError):
                store.lock()
    finally:
        if release is not None:
            release()
    again = store.lock()
    if again is not None:
        again()


# ----------------------------------------------------------------------------- through the manager

@pytest.fixture(params=["native", "memory", "ts-memory", "s3"])
def manager_target(request, tmp_path):
    if request.param == "native":
        return str(tmp_path / "run")
    if request.param == "s3":
        pytest.importorskip("tensorstore")
        return f"s3://{request.getfixturevalue('s3_server').new_bucket()}/run"
    if request.param == "ts-memory":
        pytest.importorskip("tensorstore")
    return f"{request.param}://contract{next(_counter)}/run"


def test_manager_round_trip_rotation_and_resume(manager_target):
    opts = CheckpointManagerOptions(max_to_keep=2, handle_sigterm=False, io_threads=2, chunk_bytes=1 << 16)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    with CheckpointManager(manager_target, opts) as mgr:
        for step in range(1, 5):
            model(torch.randn(3, 8)).sum().backward()
            opt.step()
            mgr.save_async(step, {"model": model, "optimizer": opt, "progress": {"step": step}})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [3, 4]
    want = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = torch.nn.Linear(8, 4)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    progress = {}
    with CheckpointManager(manager_target, opts) as mgr:
        assert mgr.restore({"model": fresh, "optimizer": fresh_opt, "progress": progress}) == 4
        with pytest.raises(NotCommittedError):
            mgr.restore({"model": fresh}, step=2)
    assert progress == {"step": 4}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_memory_url_verify_sees_the_same_verdicts(manager_target):
    from async_ckpt.tools import verify

    with CheckpointManager(manager_target, CheckpointManagerOptions(handle_sigterm=False)) as mgr:
        mgr.save(7, {"model": torch.nn.Linear(2, 2), "progress": {"step": 7}})
    report = verify.check_path(manager_target)
    assert report.restore_step == 7
    step = report.steps[0]
    assert step.committed and step.crc_checked and not step.bad_chunks and step.verdict == verify.PARTIAL


def test_unsupported_url_scheme_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unsupported storage URL scheme 'ftp'"):
        open_root("ftp://host/run")
    with pytest.raises(ValueError, match="unsupported"):
        CheckpointManager("gopher://bucket/run")


def test_one_rank_save_is_the_merge_of_one_result(tmp_path):
    policy = RenameCommit(NativeStorage(io_threads=2), str(tmp_path))
    info = save_one_rank(policy, 3, snapshot_of(state()), {"loss": 2.0}, 0.0)
    m = policy.status_of_step(3).manifest
    assert info.location.endswith("checkpoint-3") and m.world_size == 1
    assert m.section(0).rank == 0 and m.metrics == {"loss": 2.0}
