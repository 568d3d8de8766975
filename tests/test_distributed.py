"""Several ranks, one commit: real processes on torch.distributed (gloo, CPU).

Each test launches tests/dist_worker.py once per rank with RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set, as torchrun would, so a rank can be killed on its own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ckpt_layout as layout

WORKER = Path(__file__).resolve().parent / "dist_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, *args: str, timeout: float = 180, env_of=None) -> list[subprocess.CompletedProcess]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, **(env_of(rank) if env_of else {}))
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def results(out: Path, world: int) -> list[dict]:
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]


def ok(procs) -> None:
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited {p.returncode}:\n{p.stderr[-3000:]}"


def assert_replicas_written_once(manifest) -> None:
    """Model and optimizer arrays (identical on every rank under DDP) have bytes in exactly one
    rank's files; each rank writes some of them; per-rank RNG arrays are written by each."""
    a0, a1 = manifest.section(0).arrays, manifest.section(1).arrays
    assert len(a0) == len(a1)
    shared = [(x, y) for x, y in zip(a0, a1) if x.stored_by or y.stored_by]
    assert shared and all(bool(x.parts) != bool(y.parts) for x, y in shared if x.nbytes)
    owned = [sum(x.nbytes for x, _ in shared if x.parts), sum(y.nbytes for _, y in shared if y.parts)]
    assert min(owned) > 0                           # balanced between the ranks, not all on rank 0
    items0 = manifest.section(0).items
    assert items0["rng"].kind == "rng"
    stored = sum(f.size for f in manifest.files)
    once = sum(x.nbytes for x, _ in shared)
    assert stored < 1.5 * once + sum(a.nbytes for a in a0 if not a.stored_by and a.parts) - once + 64 * 1024


def test_ddp_two_ranks_resume_is_bitwise(tmp_path):
    straight = tmp_path / "straight"
    ok(launch(2, "ddp", "--root", str(tmp_path / "a"), "--steps", "8", "--out", str(straight)))
    root = tmp_path / "b"
    crashed = launch(2, "ddp", "--root", str(root), "--steps", "8", "--save-every", "2", "--crash-at", "4",
                     "--out", str(tmp_path / "first"))
    assert all(p.returncode == -9 for p in crashed), [p.stderr[-2000:] for p in crashed]
    assert layout.committed_steps(root) == [2, 4]
    manifest = layout.read_manifest(root / "checkpoint-4")
    assert manifest.world_size == 2 and [f.rank for f in manifest.files] == sorted(f.rank for f in manifest.files)
    assert_replicas_written_once(manifest)
    ok(launch(2, "ddp", "--root", str(root), "--steps", "8", "--save-every", "2", "--out", str(tmp_path / "resumed")))
    want, got = results(straight, 2), results(tmp_path / "resumed", 2)
    for r in range(2):
        for step in ("5", "6", "7", "8"):
            assert got[r]["losses"][step] == want[r]["losses"][step], (r, step)
        assert got[r]["params"] == want[r]["params"]
        assert got[r]["moments"] == want[r]["moments"]


def test_a_rank_that_raises_fails_every_rank_and_commits_nothing(tmp_path):
    root = tmp_path / "run"
    ok(launch(2, "fail", "--root", str(root), "--how", "raise", "--timeout", "20", "--out", str(tmp_path / "o")))
    for r in results(tmp_path / "o", 2):
        assert "rank 1" in r["step2"] and "No space left" in r["step2"], r
    assert layout.committed_steps(root) == [1]
    assert layout.find_leftovers(root) == []          # the coordinator removed the location


def test_a_killed_rank_fails_the_others_within_the_timeout(tmp_path):
    root = tmp_path / "run"
    procs = launch(2, "fail", "--root", str(root), "--how", "kill", "--timeout", "15", "--out", str(tmp_path / "o"),
                   env_of=lambda rank: {"ASYNC_CKPT_FAULT": "after_data:2"} if rank == 1 else {})
    assert procs[1].returncode == -9
    assert procs[0].returncode == 0, procs[0].stderr[-3000:]
    r0 = json.loads(Path(f"{tmp_path / 'o'}.rank0.json").read_text())
    assert "not committed" in r0["step2"] or "timed out" in r0["step2"] or "failed" in r0["step2"], r0
    assert "Ranks 1 failed" in r0["step2"]     # the monitored barrier names the rank that died
    assert r0["seconds"] < 60
    assert layout.committed_steps(root) == [1]
    # A fresh start (one process) cleans the leftover and restores step 1.
    from async_ckpt import CheckpointManager, CheckpointManagerOptions

    with CheckpointManager(root, CheckpointManagerOptions(handle_sigterm=False)) as mgr:
        assert mgr.all_steps() == [1]
        assert layout.find_leftovers(root) == []


@pytest.fixture(scope="module")
def fsdp4(tmp_path_factory):
    """An FSDP2 run of 4 ranks (uneven Shard(0) pieces) that saved step 3, with its digests."""
    tmp = tmp_path_factory.mktemp("fsdp4")
    ok(launch(4, "fsdp", "--phase", "save", "--root", str(tmp / "run"), "--out", str(tmp / "saved")))
    return tmp / "run", results(tmp / "saved", 4)[0]


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_saved_by_4_restores_into_fewer_ranks_bitwise(fsdp4, tmp_path, world):
    root, want = fsdp4
    ok(launch(world, "fsdp", "--phase", "restore", "--root", str(root), "--out", str(tmp_path / "r")))
    for got in results(tmp_path / "r", world):
        assert got["params"] == want["params"]
        assert got["moments"] == want["moments"]


def test_fsdp2_checkpoint_loads_whole_in_one_process(fsdp4):
    import hashlib

    import torch

    from async_ckpt import CheckpointManager, CheckpointManagerOptions

    root, want = fsdp4
    manifest = layout.read_manifest(root / "checkpoint-3")
    assert manifest.world_size == 4
    pieces = [a for r in manifest.ranks for a in r.arrays if a.global_shape is not None]
    assert pieces and all(a.global_offset is not None for a in pieces)

    def digest(t):
        return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]

    with pytest.warns(RuntimeWarning, match="saved by 4 rank"):
        with CheckpointManager(root, CheckpointManagerOptions(handle_sigterm=False)) as mgr:
            tree = mgr.load(3)
    assert {k: digest(v) for k, v in tree["model"].items()} == want["params"]
    moments = {f"{i}.{k}": digest(v) for i, st in tree["optimizer"]["state"].items() for k, v in st.items()
               if torch.is_tensor(v)}
    assert moments == want["moments"]


def test_2d_dtensors_restore_onto_another_mesh(tmp_path):
    root = tmp_path / "run"
    ok(launch(4, "dtensor2d", "--phase", "save", "--root", str(root), "--out", str(tmp_path / "s")))
    manifest = layout.read_manifest(root / "checkpoint-1")
    a_pieces = [a for r in manifest.ranks for a in r.arrays if a.global_shape == (10, 6)]
    assert sum(1 for a in a_pieces if a.stored_by) == 2       # Replicate() on the mesh's 2nd dim: once
    ok(launch(2, "dtensor2d", "--phase", "restore", "--root", str(root), "--out", str(tmp_path / "r")))
    for got in results(tmp_path / "r", 2):
        assert got["a"] == got["want_a"] and got["b"] == got["want_b"]


def test_get_state_dict_dicts_round_trip_through_set_state_dict(tmp_path):
    root = tmp_path / "run"
    ok(launch(2, "dcp_dicts", "--phase", "save", "--root", str(root), "--out", str(tmp_path / "s")))
    want = results(tmp_path / "s", 2)[0]
    ok(launch(2, "dcp_dicts", "--phase", "restore", "--root", str(root), "--out", str(tmp_path / "r")))
    for got in results(tmp_path / "r", 2):
        assert got["params"] == want["params"] and got["moments"] == want["moments"]


def test_shard_coverage_names_a_missing_or_overlapping_piece(fsdp4):
    import dataclasses

    from async_ckpt.format.shards import coverage_problems

    root, _ = fsdp4
    manifest = layout.read_manifest(root / "checkpoint-3")
    assert coverage_problems(manifest) == []
    # Drop rank 1's pieces: its shard of every sharded array is missing.
    gone = dataclasses.replace(manifest.ranks[1], arrays=tuple(
        dataclasses.replace(a, global_shape=None, global_offset=None) for a in manifest.ranks[1].arrays))
    broken = dataclasses.replace(manifest, ranks=(manifest.ranks[0], gone) + manifest.ranks[2:])
    problems = coverage_problems(broken)
    assert problems and all("missing" in p for p in problems)
    # Give rank 2 rank 0's offsets: they overlap.
    moved = dataclasses.replace(manifest.ranks[2], arrays=tuple(
        dataclasses.replace(a, global_offset=b.global_offset) if a.global_shape and a.shape == b.shape else a
        for a, b in zip(manifest.ranks[2].arrays, manifest.ranks[0].arrays)))
    overlapping = dataclasses.replace(manifest, ranks=manifest.ranks[:2] + (moved,) + manifest.ranks[3:])
    assert any("overlap" in p for p in coverage_problems(overlapping))


def test_per_rank_tensors_of_the_same_shape_are_never_merged(tmp_path):
    root = tmp_path / "run"
    ok(launch(2, "perrank", "--root", str(root), "--out", str(tmp_path / "o")))
    for got in results(tmp_path / "o", 2):
        assert got["t"] == float(got["rank"]) and got["seen"] == 10 * got["rank"] + 1, got
    manifest = layout.read_manifest(root / "checkpoint-1")
    assert not any(a.stored_by for r in manifest.ranks for a in r.arrays)


def test_verify_reports_ranks_and_a_missing_rank_file(fsdp4, tmp_path):
    import shutil

    from async_ckpt.tools import report, verify

    root, _ = fsdp4
    rep = verify.check_step(root / "checkpoint-3")
    assert rep.verdict in (verify.COMPLETE, verify.PARTIAL) and rep.world_size == 4
    assert len(rep.rank_bytes) == 4 and all(n > 0 for n in rep.rank_bytes)
    import io
    out = io.StringIO()
    report.render(rep, out, verbose=True, plain=True)
    assert "bytes per rank: rank 0" in out.getvalue()
    copy = tmp_path / "checkpoint-3"
    shutil.copytree(root / "checkpoint-3", copy)
    (copy / "data-r2-0.bin").unlink()
    broken = verify.check_step(copy)
    assert broken.verdict == verify.CORRUPT
    assert any(p.startswith("rank 2: data-r2-0.bin: missing") for p in broken.problems), broken.problems
    assert all(t.startswith("rank 2: ") for b in broken.bad_chunks for t in b.tensors)
