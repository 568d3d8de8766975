"""fix: plan then act, backups, idempotence, conversion that the manager restores, quarantine."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from async_ckpt import rng
from async_ckpt.tools import fix
import ckpt_layout as layout
from async_ckpt.tools import verify
from async_ckpt.manager import CheckpointManager
from async_ckpt.pipeline.saving import write_checkpoint

import fixtures_legacy as F
from test_verify import _flip, full_state, run_cli


def run_fix(path, *args) -> tuple[int, str]:
    out = io.StringIO()
    p = fix.build_parser().parse_args([str(path), *args])
    fixer = fix.Fixer(Path(p.path), seed=p.seed, backup=not p.no_backup, quarantine=p.quarantine,
                      step=p.step, out=out)
    return fixer.run(dry_run=p.dry_run), out.getvalue()


def snapshot_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*")) if p.name != layout.LOCK_NAME}


def assert_same(a, b):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# ----------------------------------------------------------------------------- HF conversion

@pytest.mark.parametrize("rng_kind", ["normal", "numpy1", None])
def test_hf_convert_then_manager_restores(tmp_path, rng_kind):
    sentinel = tmp_path.parent / f"{tmp_path.name}-pwned"
    hf = F.hf_checkpoint(tmp_path, 500, rng=rng_kind, sentinel=sentinel)
    code, out = run_fix(tmp_path, "--seed", "11")
    assert code == 0, out
    assert "plan:" in out and "convert Hugging Face Trainer checkpoint in place" in out
    backup = tmp_path / fix.BACKUP_DIR / "checkpoint-500"
    assert str(backup) in out and (backup / "trainer_state.json").exists()
    assert layout.commit_status(tmp_path / "checkpoint-500").committed

    rep = verify.check_step(tmp_path / "checkpoint-500")
    assert rep.verdict == verify.COMPLETE
    rng_c = next(c for c in rep.components if c.name == "RNG States")
    assert rng_c.present and rng_c.reconstructed == (rng_kind is None)

    model, opt, sched = F.fresh()
    with CheckpointManager(tmp_path) as mgr:
        assert mgr.latest_step() == 500
        assert mgr.restore({"model": model, "optimizer": opt, "scheduler": sched}) == 500
        loaded = mgr.load(500)
    assert_same(model, hf["model"])
    ref_opt = hf["optimizer"].state_dict()
    got_opt = opt.state_dict()
    assert torch.equal(got_opt["state"][0]["exp_avg"], ref_opt["state"][0]["exp_avg"])
    assert got_opt["param_groups"][0]["lr"] == ref_opt["param_groups"][0]["lr"]
    assert sched.state_dict() == hf["scheduler"].state_dict()
    if rng_kind is not None:     # the manager restored the HF run's RNG streams
        assert random.getstate() == hf["rng"]["python"]
        assert np.array_equal(np.random.get_state()[1], hf["rng"]["numpy"][1])
        assert torch.equal(torch.get_rng_state(), hf["rng"]["cpu"])
    else:
        assert torch.equal(loaded["rng"]["torch"], rng.derived(11, 500)["torch"])
    assert loaded["progress"]["epoch"] == 1.5 and loaded["progress"]["global_step"] == 500
    assert loaded["tokenizer"]["tokenizer.model"] == bytes(range(256))
    assert not sentinel.exists()

    code, out = run_fix(tmp_path)
    assert code == 0 and "nothing to fix" in out


def test_hf_malicious_file_not_converted(tmp_path):
    sentinel = tmp_path.parent / f"{tmp_path.name}-pwned"
    F.hf_checkpoint(tmp_path, 3, malicious="scheduler.pt", sentinel=sentinel)
    before = snapshot_tree(tmp_path)
    code, out = run_fix(tmp_path)
    assert code == 2 and "cannot convert" in out and "scheduler.pt" in out
    assert snapshot_tree(tmp_path) == before
    code, out = run_fix(tmp_path, "--quarantine")
    assert code == 2 and "quarantine" in out
    assert not (tmp_path / "checkpoint-3").exists()
    assert any(p.name.startswith("checkpoint-3.corrupt-") for p in tmp_path.iterdir())
    assert not sentinel.exists()


def test_accelerate_and_torch_file_converted_beside(tmp_path):
    acc = F.accelerate_folder(tmp_path / "checkpoint_4")
    code, out = run_fix(acc["path"])
    assert code == 0, out
    assert (tmp_path / "checkpoint-4").is_dir() and acc["path"].is_dir()    # original untouched
    model, opt, sched = F.fresh()
    with CheckpointManager(tmp_path) as mgr:
        mgr.restore({"model": model, "optimizer": opt, "scheduler": sched})
    assert_same(model, acc["model"])
    assert random.getstate() == acc["rng"]["python"]

    (tmp_path / "sub").mkdir()
    tf = F.torch_file(tmp_path / "sub" / "run_40.pt")
    code, out = run_fix(tf["path"])
    assert code == 0, out
    code, out = run_fix(tf["path"])
    assert code == 0 and "nothing to fix" in out and "already converted" in out


# ----------------------------------------------------------------------------- committed layout repairs

@pytest.fixture
def root(tmp_path, small_model):
    model, opt, sched = small_model
    with CheckpointManager(tmp_path) as mgr:
        for step in (1, 2):
            mgr.save(step, full_state(model, opt, sched))
    return tmp_path


def test_stale_tmp_dir_removed_with_backup(root):
    stale = root / ".checkpoint-3.tmp-abc123"
    stale.mkdir()
    (stale / "data-r0-0.bin").write_bytes(b"partial")
    crashed = root / "checkpoint-9"
    crashed.mkdir()
    code, out = run_fix(root, "--dry-run")
    assert code == 0 and "dry run: nothing changed" in out and stale.exists()
    code, out = run_fix(root)
    assert code == 0, out
    assert not stale.exists() and not crashed.exists()
    assert (root / fix.BACKUP_DIR / stale.name / "data-r0-0.bin").read_bytes() == b"partial"
    code, out = run_fix(root)
    assert code == 0 and "nothing to fix" in out


def test_no_backup_deletes(root):
    stale = root / ".checkpoint-3.tmp-abc123"
    stale.mkdir()
    code, out = run_fix(root, "--no-backup")
    assert code == 0 and not stale.exists() and not (root / fix.BACKUP_DIR).exists()


def test_missing_marker_rewritten_only_when_chunks_verify(root):
    (root / "checkpoint-2" / layout.COMMIT_NAME).unlink()
    code, out = run_fix(root)
    assert code == 0, out
    assert "write a new commit marker" in out
    assert layout.commit_status(root / "checkpoint-2").committed

    (root / "checkpoint-2" / layout.COMMIT_NAME).unlink()
    data = next((root / "checkpoint-2").glob("data-*.bin"))
    _flip(data, 5)
    code, out = run_fix(root)
    assert "write a new commit marker" not in out
    assert not (root / "checkpoint-2" / layout.COMMIT_NAME).exists()
    assert code == 0     # restore picks step 1, which is complete; step 2 is reported, not hidden
    assert "checkpoint-2 is CORRUPT" in out


def test_damaged_marker_rewritten_with_backup(root):
    step_dir = root / "checkpoint-2"
    damaged = layout.commit_marker_bytes(2, b"not this manifest")
    (step_dir / layout.COMMIT_NAME).write_bytes(damaged)
    code, out = run_fix(step_dir)
    assert code == 0, out
    assert "write a new commit marker" in out
    assert (root / fix.BACKUP_DIR / "checkpoint-2" / layout.COMMIT_NAME).read_bytes() == damaged
    assert layout.commit_status(step_dir).committed


def test_quarantine_corrupt_step(root):
    _flip(next((root / "checkpoint-2").glob("data-*.bin")), 3)
    code, out = run_fix(root)
    assert "cannot fix" in out and "--quarantine" in out and (root / "checkpoint-2").exists()
    code, out = run_fix(root, "--quarantine")
    assert code == 0, out
    assert not (root / "checkpoint-2").exists()
    q = [p for p in root.iterdir() if p.name.startswith("checkpoint-2.corrupt-")]
    assert len(q) == 1 and "renamed to" in out
    with CheckpointManager(root) as mgr:
        assert mgr.latest_step() == 1
    code, out = run_fix(root)
    assert code == 0 and "nothing to fix" in out


def test_adds_missing_rng_and_progress(tmp_path, small_model):
    model, opt, sched = small_model
    write_checkpoint(tmp_path, 8, {"model": model, "optimizer": opt, "scheduler": sched}, metrics={"loss": 2.0})
    code, out = run_fix(tmp_path, "--seed", "4")
    assert code == 0, out
    rep = verify.check_step(tmp_path / "checkpoint-8")
    assert rep.verdict == verify.COMPLETE and rep.metrics == {"loss": 2.0}
    assert all(c.reconstructed for c in rep.components if c.name in ("RNG States", "Training State"))
    with CheckpointManager(tmp_path) as mgr:
        loaded = mgr.load(8)
    assert torch.equal(loaded["rng"]["torch"], rng.derived(4, 8)["torch"])
    assert loaded["progress"] == {"step": 8}
    assert (tmp_path / fix.BACKUP_DIR / "checkpoint-8").is_dir()


def test_partial_says_what_cannot_be_reconstructed(tmp_path, small_model):
    model, opt, sched = small_model
    write_checkpoint(tmp_path, 2, {"model": model, "scheduler": sched, "progress": {"step": 2},
                                   "rng": rng.capture()})
    code, out = run_fix(tmp_path)
    assert code == 1 and "momentum resets" in out and "cannot be reconstructed" in out


# ----------------------------------------------------------------------------- CLI end to end

def test_cli_end_to_end(tmp_path):
    sentinel = tmp_path.parent / f"{tmp_path.name}-pwned"
    F.hf_checkpoint(tmp_path, 100, rng=None, sentinel=sentinel)
    (tmp_path / ".checkpoint-200.tmp-x1").mkdir()
    r = run_cli("async_ckpt.verify", tmp_path)
    assert r.returncode == 1 and "legacy layout" in r.stdout and "UNCOMMITTED" in r.stdout
    r = run_cli("async_ckpt.fix", tmp_path, "--dry-run")
    assert r.returncode == 1 and "plan:" in r.stdout and "dry run" in r.stdout
    r = run_cli("async_ckpt.fix", tmp_path, "--seed", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert ".backup" in r.stdout and "reconstructed" in r.stdout
    r = run_cli("async_ckpt.verify", tmp_path)
    assert r.returncode == 0 and "reconstructed" in r.stdout and "restore would pick step 100" in r.stdout
    r = run_cli("async_ckpt.fix", tmp_path)
    assert r.returncode == 0 and "nothing to fix" in r.stdout
    r = run_cli("async_ckpt.fix", tmp_path, "--seed", "x")
    assert r.returncode == 64
    assert not sentinel.exists()


def test_unknown_final_named_folder_left_alone(root):
    stranger = root / "checkpoint-7"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    code, out = run_fix(root, "--no-backup")
    assert "does not recognise" in out and (stranger / "notes.txt").read_text() == "mine"


def test_live_manager_blocks_fix(root):
    (root / ".checkpoint-3.tmp-abc").mkdir()
    with CheckpointManager(root) as mgr:
        code, out = run_fix(root)
    assert code == 2 and "in use" in out
