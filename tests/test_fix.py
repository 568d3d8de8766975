"""fix: plan then act, backups, idempotence, conversion that the manager restores, quarantine."""

from __future__ import annotations

import io
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
                      step=p.step, out=out, dest=p.out)
    return fixer.run(dry_run=p.dry_run), out.getvalue()


def snapshot_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*")) if p.name != layout.LOCK_NAME}


def assert_same(a, b):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def dest_of(source: Path) -> Path:
    return source.parent / (source.name + ".async_ckpt")


# ----------------------------------------------------------------------------- other tools' checkpoints

@pytest.mark.parametrize("rng_kind", ["normal", "numpy1", None])
def test_hf_convert_then_manager_restores(tmp_path, rng_kind):
    sentinel = tmp_path.parent / f"{tmp_path.name}-pwned"
    hf = F.hf_checkpoint(tmp_path, 500, rng=rng_kind, sentinel=sentinel)
    before = F.tree_fingerprint(tmp_path)
    code, out = run_fix(tmp_path, "--seed", "11")
    dest = dest_of(tmp_path)
    assert code == (0 if rng_kind else 1), out     # a seed-derived RNG is never COMPLETE
    assert "plan:" in out and f"converted steps go to: {dest} (default" in out
    assert "step 500 (from trainer_state.json global_step)" in out
    assert F.tree_fingerprint(tmp_path) == before      # the Trainer's folder is untouched
    assert layout.commit_status(dest / "checkpoint-500").committed
    assert not (dest / fix.BACKUP_DIR).exists()

    rep = verify.check_step(dest / "checkpoint-500")
    rng_c = next(c for c in rep.components if c.name == "RNG States")
    assert rng_c.present and rng_c.reconstructed == (rng_kind is None)
    assert rep.verdict == (verify.COMPLETE if rng_kind else verify.PARTIAL)
    assert bool(rep.reconstructed) == (rng_kind is None)

    model, opt, sched = F.fresh()
    with CheckpointManager(dest) as mgr:
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
    assert loaded["trainer_state"]["global_step"] == 500
    assert loaded["tokenizer"]["tokenizer.model"] == bytes(range(256))
    assert not sentinel.exists()

    code, out = run_fix(tmp_path)
    assert code == (0 if rng_kind else 1) and "nothing to fix" in out and "already converted" in out
    assert F.tree_fingerprint(tmp_path) == before


def test_hf_malicious_file_not_converted(tmp_path):
    sentinel = tmp_path.parent / f"{tmp_path.name}-pwned"
    F.hf_checkpoint(tmp_path, 3, malicious="scheduler.pt", sentinel=sentinel)
    before = F.tree_fingerprint(tmp_path)
    for extra in ([], ["--quarantine"]):
        code, out = run_fix(tmp_path, *extra)
        assert code == 2 and "cannot convert" in out and "scheduler.pt" in out and "left as it is" in out
        assert F.tree_fingerprint(tmp_path) == before       # another tool's folder: never renamed
    assert not dest_of(tmp_path).exists()
    assert not sentinel.exists()


def test_accelerate_and_torch_file_step_from_records(tmp_path):
    acc = F.accelerate_folder(tmp_path / "run" / "checkpoint_4", steps=7)
    code, out = run_fix(acc["path"])
    dest = dest_of(tmp_path / "run")                 # beside the folder holding checkpoint_4
    assert "step 7 (from scheduler.bin last_epoch (the scheduler's position))" in out, out
    assert code == 1, out     # Accelerate keeps no epoch or history: only the step, so PARTIAL
    assert acc["path"].is_dir() and sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint_4"]
    rep = verify.check_step(dest / "checkpoint-7")
    assert rep.verdict == verify.PARTIAL
    assert any("training state reconstructed by fix: only the step is known (step 7 from scheduler.bin" in m
               for m in rep.reconstructed), rep.reconstructed
    model, opt, sched = F.fresh()
    with CheckpointManager(dest) as mgr:
        mgr.restore({"model": model, "optimizer": opt, "scheduler": sched})
    assert_same(model, acc["model"])
    assert sched.state_dict() == acc["scheduler"].state_dict()
    assert random.getstate() == acc["rng"]["python"]

    (tmp_path / "sub").mkdir()
    tf = F.torch_file(tmp_path / "sub" / "run_40.pt", step=40)
    code, out = run_fix(tf["path"])
    assert code == 1 and "step 40 (from run_40.pt['step'])" in out, out
    assert layout.commit_status(tmp_path / "sub" / "run_40.pt.async_ckpt" / "checkpoint-40").committed
    code, out = run_fix(tf["path"])
    assert "nothing to fix" in out and "already converted" in out

    torch.save({"model": tf["model"].state_dict(), "epoch": 3}, tmp_path / "sub" / "last.pt")
    code, out = run_fix(tmp_path / "sub" / "last.pt", "--dry-run")
    assert "step 3 (from last.pt['epoch'] (no step recorded: the epoch stands in))" in out, out


def test_roots_of_several_steps(tmp_path):
    """A Trainer output dir after save_model, an Accelerate project dir, a folder of .ckpt files:
    verify judges each checkpoint, fix converts each, the folder stays as it was."""
    out_dir = tmp_path / "hf"
    for step in (10, 20):
        F.hf_checkpoint(out_dir, step)
    for name in ("model.safetensors", "config.json"):           # trainer.save_model() at the top
        (out_dir / name).write_bytes((out_dir / "checkpoint-20" / name).read_bytes())
    F.accelerate_project(tmp_path / "acc", steps=(4, 9))
    F.lightning_file(tmp_path / "pl" / "epoch=0-step=4.ckpt", step=4, epoch=0)
    F.lightning_file(tmp_path / "pl" / "epoch=1-step=8.ckpt", step=8, epoch=1)
    F.lightning_file(tmp_path / "pl" / "last.ckpt", step=8, epoch=1)
    expect = {"hf": [20, 10], "acc": [9, 4], "pl": [8, 8, 4]}
    for name, steps in expect.items():
        src = tmp_path / name
        rep = verify.check_path(src)
        assert isinstance(rep, verify.RootReport) and [r.step for r in rep.steps] == steps, (name, rep.steps)
        assert rep.layout != verify.OURS and rep.restore_step is None
        for r in rep.steps:
            opt = next(c for c in r.components if c.kind == "optimizer")
            sch = next(c for c in r.components if c.kind == "scheduler")
            assert opt.present and sch.present and not r.problems, (name, r.name)
        before = F.tree_fingerprint(src)
        code, text = run_fix(src, "--dry-run")
        assert "dry run: nothing changed" in text and F.tree_fingerprint(src) == before
        assert not dest_of(src).exists()
        code, text = run_fix(src)
        assert F.tree_fingerprint(src) == before, name
        with CheckpointManager(dest_of(src)) as mgr:
            assert mgr.all_steps() == sorted(set(steps))
    rep = verify.check_path(out_dir)
    assert any("final model (save_model)" in n for n in rep.notes)
    assert verify.check_path(tmp_path / "acc" / "checkpoints").steps[0].name == "checkpoint_1"
    _, text = run_fix(tmp_path / "pl", "--dry-run")
    assert "last.ckpt: step 8 again, as in epoch=1-step=8.ckpt" in text and "nothing to fix" in text
    # one checkpoint inside such a folder converts beside the folder, never inside it
    _, text = run_fix(tmp_path / "acc" / "checkpoints" / "checkpoint_0")
    assert "already converted into " + str(dest_of(tmp_path / "acc") / "checkpoint-4") in text, text


def test_lightning_file_items(tmp_path):
    pl = F.lightning_file(tmp_path / "ck" / "epoch=2-step=12.ckpt", step=12, epoch=2)
    code, out = run_fix(pl["path"])
    assert "Lightning checkpoint file, step 12 (from epoch=2-step=12.ckpt['global_step'])" in out, out
    model, opt, sched = F.fresh()
    with CheckpointManager(dest_of(tmp_path / "ck")) as mgr:
        mgr.restore({"model": model, "optimizer": opt, "scheduler": sched})
        loaded = mgr.load(12)
    assert_same(model, pl["model"])
    assert torch.equal(opt.state_dict()["state"][1]["exp_avg_sq"], pl["optimizer"].state_dict()["state"][1]["exp_avg_sq"])
    assert sched.state_dict() == pl["scheduler"].state_dict()
    assert loaded["progress"] == {"step": 12, "global_step": 12, "epoch": 2}
    assert loaded["lightning"]["loops"]["fit_loop"]["epoch_progress"]["current"] == 2
    rep = verify.check_step(dest_of(tmp_path / "ck") / "checkpoint-12")
    assert rep.verdict == verify.PARTIAL and rep.missing == []      # only the RNG is reconstructed
    assert len(rep.reconstructed) == 1 and "RNG" in rep.reconstructed[0]


def test_dest_never_where_the_tool_looks(tmp_path):
    F.accelerate_project(tmp_path / "acc", steps=(2,))
    F.hf_checkpoint(tmp_path / "hf", 5)
    for src, dest in ((tmp_path / "acc", tmp_path / "acc" / "checkpoints" / "mine"),
                      (tmp_path / "acc", tmp_path / "acc"),
                      (tmp_path / "hf", tmp_path / "hf" / "checkpoint-5" / "x"),
                      (tmp_path / "hf", tmp_path / "hf" / "checkpoint-converted")):
        before = F.tree_fingerprint(tmp_path)
        code, out = run_fix(src, "--out", str(dest))
        assert code == 64 and "cannot convert into" in out, (dest, out)
        assert F.tree_fingerprint(tmp_path) == before
    code, out = run_fix(tmp_path / "hf", "--out", str(tmp_path / "hf" / "async_ckpt"))
    assert code == 0, out                    # beside the Trainer's checkpoint-* names: allowed
    assert layout.commit_status(tmp_path / "hf" / "async_ckpt" / "checkpoint-5").committed
    r = run_cli("async_ckpt.fix", tmp_path / "hf" / "async_ckpt", "--out", str(tmp_path / "x"))
    assert r.returncode == 64 and "--out applies to other tools' checkpoints" in r.stderr


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
    assert code == 1, out      # added, but synthesised: PARTIAL, never COMPLETE
    rep = verify.check_step(tmp_path / "checkpoint-8")
    assert rep.verdict == verify.PARTIAL and rep.metrics == {"loss": 2.0} and rep.missing == []
    assert all(c.reconstructed for c in rep.components if c.name in ("RNG States", "Training State"))
    assert len(rep.reconstructed) == 2 and "only the step is known (step from the folder name)" in rep.reconstructed[0]
    code, out = run_fix(tmp_path)
    assert code == 1 and "nothing to fix" in out
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
    (tmp_path / ".checkpoint-200.tmp-x1").mkdir()       # ours, inside the Trainer's folder
    dest = dest_of(tmp_path)
    r = run_cli("async_ckpt.verify", tmp_path)
    assert r.returncode == 1 and "Hugging Face Trainer output dir" in r.stdout and "UNCOMMITTED" in r.stdout
    assert "step 100 from trainer_state.json global_step" in r.stdout
    before = F.tree_fingerprint(tmp_path)
    r = run_cli("async_ckpt.fix", tmp_path, "--dry-run")
    assert r.returncode == 1 and "plan:" in r.stdout and "dry run" in r.stdout
    assert F.tree_fingerprint(tmp_path) == before and not dest.exists()
    r = run_cli("async_ckpt.fix", tmp_path, "--seed", "1")
    assert r.returncode == 1, r.stdout + r.stderr        # RNG derived from the seed: PARTIAL, said so
    assert "left alone" in r.stdout and "RNG states reconstructed by fix" in r.stdout
    assert F.tree_fingerprint(tmp_path) == before
    r = run_cli("async_ckpt.verify", dest)
    assert r.returncode == 1 and "reconstructed" in r.stdout and "restore would pick step 100" in r.stdout
    r = run_cli("async_ckpt.fix", tmp_path)
    assert r.returncode == 1 and "nothing to fix" in r.stdout
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
