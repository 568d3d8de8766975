"""verify: verdicts, component lines, bad-chunk naming, root mode, CLI exit codes."""

from __future__ import annotations

import io
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from async_ckpt import rng
import ckpt_layout as layout
from async_ckpt.tools import verify
from async_ckpt.manager import CheckpointManager
from async_ckpt.pipeline.saving import write_checkpoint

import fixtures_legacy as F

REPO = Path(__file__).resolve().parents[1]


def run_cli(module: str, *args: str, encoding: str = "utf-8") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONIOENCODING=encoding)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, env=env, encoding=encoding, errors="replace", timeout=300)


def full_state(model, opt, sched, **extra):
    return {"model": model, "optimizer": opt, "scheduler": sched, "progress": {"step": 3, "epoch": 1},
            **extra}


@pytest.fixture
def complete(tmp_path, small_model):
    model, opt, sched = small_model
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(10, full_state(model, opt, sched))
    return tmp_path / "checkpoint-10"


def only(tmp_path, small_model, drop: str) -> Path:
    model, opt, sched = small_model
    state = {**full_state(model, opt, sched), "rng": rng.capture()}
    del state[drop]
    return write_checkpoint(tmp_path, 5, state)


def components(rep) -> dict[str, bool]:
    return {c.name: c.present for c in rep.components}


# ----------------------------------------------------------------------------- committed layout

def test_complete(complete):
    rep = verify.check_step(complete)
    assert rep.verdict == verify.COMPLETE and rep.exit_code == 0
    assert rep.committed and rep.crc_checked and not rep.bad_chunks
    assert [c.name for c in rep.components] == ["Model Config", "Model Weights", "Tokenizer", "Training State",
                                                 "Optimizer State", "Scheduler State", "RNG States", "Data State"]
    got = components(rep)
    assert got["Model Weights"] and got["Optimizer State"] and got["RNG States"] and got["Training State"]
    assert not got["Model Config"] and not got["Data State"]      # optional, not saved: still COMPLETE


@pytest.mark.parametrize("drop,name,cost", [
    ("model", "Model Weights", "model weights missing"),
    ("optimizer", "Optimizer State", "momentum resets, expect a loss spike"),
    ("scheduler", "Scheduler State", "scheduler state missing"),
    ("progress", "Training State", "training state missing"),
    ("rng", "RNG States", "dropout and shuffling will differ"),
])
def test_each_component_missing(tmp_path, small_model, drop, name, cost):
    rep = verify.check_step(only(tmp_path, small_model, drop))
    assert rep.verdict == verify.PARTIAL and rep.exit_code == 1
    assert components(rep)[name] is False
    assert any(cost in m for m in rep.missing)


def test_optional_components_when_saved(tmp_path, small_model):
    model, opt, sched = small_model
    state = {**full_state(model, opt, sched), "rng": rng.capture(), "config": {"hidden": 16},
             "tokenizer": {"vocab.txt": b"a\nb\n"}, "data": {"epoch": 0, "index": 7}}
    rep = verify.check_step(write_checkpoint(tmp_path, 1, state))
    assert all(components(rep).values()) and rep.verdict == verify.COMPLETE


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_flipped_byte_names_chunk_offset_and_tensors(tmp_path):
    big = {"w": torch.randn(256, 256), "b": torch.randn(256)}
    state = {"model": big, "optimizer": {"state": {}}, "scheduler": {}, "progress": {"step": 1},
             "rng": rng.capture()}
    step_dir = write_checkpoint(tmp_path, 1, state, chunk_bytes=64 << 10)
    manifest = layout.read_manifest(step_dir)
    arrays = manifest.ranks[0].arrays
    paths = verify.array_paths(manifest.ranks[0].tree)
    w_index = next(i for i, p in paths.items() if p == ['model.w'])
    chunk = arrays[w_index].parts[1][0]
    c = manifest.chunks[chunk]
    _flip(step_dir / manifest.files[c.file].path, c.offset + c.length // 2)
    rep = verify.check_step(step_dir)
    assert rep.verdict == verify.CORRUPT and rep.exit_code == 2
    assert len(rep.bad_chunks) == 1
    bad = rep.bad_chunks[0]
    assert (bad.chunk, bad.offset, bad.file) == (chunk, c.offset, manifest.files[c.file].path)
    assert bad.tensors == ["model.w"] and "crc32c mismatch" in bad.error
    assert next(x for x in rep.components if x.name == "Model Weights").damaged
    # --quick does not read chunks, so it cannot see a flipped byte
    assert verify.check_step(step_dir, quick=True).verdict == verify.COMPLETE


def test_truncated_file(complete):
    data = next(complete.glob("data-*.bin"))
    size = data.stat().st_size
    os.truncate(data, size // 2)
    for quick in (True, False):
        rep = verify.check_step(complete, quick=quick)
        assert rep.verdict == verify.CORRUPT
        assert any("truncated" in p for p in rep.problems)
        assert rep.bad_chunks and all(b.tensors for b in rep.bad_chunks)


def test_no_marker_is_uncommitted_and_fixable(complete):
    (complete / layout.COMMIT_NAME).unlink()
    rep = verify.check_step(complete)
    assert rep.verdict == verify.UNCOMMITTED and rep.exit_code == 2 and not rep.committed
    assert any("commit marker" in f for f in rep.fixable)


def test_edited_manifest_is_corrupt_and_never_resigned(complete):
    doc = json.loads((complete / layout.MANIFEST_NAME).read_bytes())
    doc["metrics"] = {"loss": 1.0}
    (complete / layout.MANIFEST_NAME).write_text(json.dumps(doc))
    rep = verify.check_step(complete)
    assert rep.verdict == verify.CORRUPT
    assert any("damaged" in p for p in rep.problems)
    assert rep.finding(verify.Repair.REWRITE_MARKER) is None
    assert rep.finding(verify.Repair.QUARANTINE) is not None


def test_damaged_marker_is_corrupt_and_fixable(complete):
    (complete / layout.COMMIT_NAME).write_bytes(layout.commit_marker_bytes(10, b"another manifest"))
    rep = verify.check_step(complete)
    assert rep.verdict == verify.CORRUPT
    assert any("marker is damaged" in p for p in rep.problems)
    assert any("commit marker" in f for f in rep.fixable)


def test_manifest_with_dotdot_path(complete, tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 100)
    doc = json.loads((complete / layout.MANIFEST_NAME).read_bytes())
    doc["files"][0]["path"] = "../outside.bin"
    data = json.dumps(doc).encode()
    (complete / layout.MANIFEST_NAME).write_bytes(data)
    (complete / layout.COMMIT_NAME).unlink()
    (complete / layout.COMMIT_NAME).write_bytes(layout.commit_marker_bytes(10, data))   # digest matches
    rep = verify.check_step(complete)
    assert rep.verdict == verify.CORRUPT
    assert any("not a single safe file name" in p for p in rep.problems)
    assert not rep.crc_checked and rep.bytes_checked == 0


def test_symlinked_data_file_refused(complete, tmp_path):
    data = next(complete.glob("data-*.bin"))
    real = tmp_path / "real.bin"
    data.rename(real)
    data.symlink_to(real)
    rep = verify.check_step(complete)
    assert rep.verdict == verify.CORRUPT and any("symlink" in p for p in rep.problems)


def test_root_mode_newest_first_with_leftovers(tmp_path, small_model):
    model, opt, sched = small_model
    with CheckpointManager(tmp_path) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, full_state(model, opt, sched))
    (tmp_path / ".checkpoint-4.tmp-deadbeef").mkdir()
    (tmp_path / ".checkpoint-4.tmp-deadbeef" / "data-r0-0.bin").write_bytes(b"half")
    _flip(next((tmp_path / "checkpoint-3").glob("data-*.bin")), 10)
    rep = verify.check_root(tmp_path)
    assert [r.name for r in rep.steps] == [".checkpoint-4.tmp-deadbeef", "checkpoint-3", "checkpoint-2",
                                           "checkpoint-1"]
    assert [r.verdict for r in rep.steps] == [verify.UNCOMMITTED, verify.CORRUPT, verify.COMPLETE,
                                              verify.COMPLETE]
    assert rep.restore_step == 3 and rep.verdict == verify.CORRUPT      # restore would pick the bad one
    assert any("quarantine" in n for n in rep.notes)
    only2 = verify.check_path(tmp_path, step=2)
    assert [r.step for r in only2.steps] == [2] and only2.verdict == verify.COMPLETE


def test_verbose_details(complete):
    rep = verify.check_step(complete)
    items = {d.name: d for d in rep.items}
    assert items["model"].tensors == 4 and items["model"].raw_bytes == (8 * 16 + 16 + 16 * 4 + 4) * 4
    assert items["model"].dtypes == {"torch.float32": 4}
    assert 0 < items["model"].stored_bytes
    assert rep.writer.startswith("async_ckpt") and rep.created_unix


# ----------------------------------------------------------------------------- legacy layouts

def test_hf_complete_and_without_rng(tmp_path):
    F.hf_checkpoint(tmp_path, 100)
    F.hf_checkpoint(tmp_path, 200, rng=None, weights="bin")
    F.hf_checkpoint(tmp_path, 300, rng="numpy1", weights="sharded")
    r100 = verify.check_step(tmp_path / "checkpoint-100")
    assert r100.layout == "hf_trainer" and r100.verdict == verify.COMPLETE
    assert all(components(r100)[n] for n in ("Model Config", "Tokenizer", "Model Weights", "RNG States"))
    assert any("run fix to convert" in n for n in r100.notes)
    r200 = verify.check_step(tmp_path / "checkpoint-200")
    assert r200.verdict == verify.PARTIAL and any("dropout and shuffling" in m for m in r200.missing)
    assert verify.check_step(tmp_path / "checkpoint-300").verdict == verify.COMPLETE
    root = verify.check_root(tmp_path)
    assert [r.step for r in root.steps] == [300, 200, 100] and root.restore_step is None


def test_malicious_pickle_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    F.hf_checkpoint(tmp_path, 7, malicious="optimizer.pt", sentinel=sentinel)
    rep = verify.check_step(tmp_path / "checkpoint-7")
    assert rep.verdict == verify.CORRUPT
    assert any("optimizer.pt" in p and "weights only" in p for p in rep.problems)
    assert components(rep)["Optimizer State"] is False
    assert not sentinel.exists()


def test_malicious_legacy_format_pickle(tmp_path):
    sentinel = tmp_path / "pwned"
    F.malicious_torch_file(tmp_path / "model.pt", sentinel, zip_format=False)
    rep = verify.check_step(tmp_path / "model.pt")
    assert rep.verdict == verify.CORRUPT and not sentinel.exists()


def test_accelerate_and_torch_file(tmp_path):
    F.accelerate_folder(tmp_path / "acc")
    rep = verify.check_step(tmp_path / "acc")
    assert rep.layout == "accelerate"
    got = components(rep)
    assert got["Model Weights"] and got["Optimizer State"] and got["Scheduler State"] and got["RNG States"]
    F.torch_file(tmp_path / "run.pt")
    rep = verify.check_step(tmp_path / "run.pt")
    assert rep.layout == "torch_file" and rep.step == 40
    assert components(rep)["Optimizer State"] and components(rep)["Training State"]
    assert rep.verdict == verify.PARTIAL     # no RNG in the file


def test_legacy_flipped_byte_in_torch_zip(tmp_path):
    F.hf_checkpoint(tmp_path, 1)
    opt_file = tmp_path / "checkpoint-1" / "optimizer.pt"
    _flip(opt_file, opt_file.stat().st_size // 2)
    rep = verify.check_step(tmp_path / "checkpoint-1")
    assert rep.verdict == verify.CORRUPT and any("optimizer.pt" in p for p in rep.problems)


def test_not_a_checkpoint(tmp_path):
    assert verify.check_path(tmp_path).verdict == verify.NOT_A_CHECKPOINT
    assert verify.check_path(tmp_path / "nope").exit_code == 2


# ----------------------------------------------------------------------------- CLI

def test_cli_exit_codes_and_output(complete, tmp_path, small_model):
    r = run_cli("async_ckpt.verify", complete)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    order = [n for n in ("Model Config", "Model Weights", "Tokenizer", "Training State", "Optimizer State",
                         "Scheduler State", "RNG States", "Data State") for line in lines if n in line]
    assert order == ["Model Config", "Model Weights", "Tokenizer", "Training State", "Optimizer State",
                     "Scheduler State", "RNG States", "Data State"]
    assert "\u2705 Model Weights" in r.stdout and "COMPLETE" in r.stdout and "ready for stable resume" in r.stdout

    partial = only(tmp_path / "p", small_model, "optimizer")
    r = run_cli("async_ckpt.verify", partial, "--plain")
    assert r.returncode == 1 and "[missing] Optimizer State" in r.stdout
    assert "momentum resets, expect a loss spike" in r.stdout

    r = run_cli("async_ckpt.verify", complete, "--json", "-v")
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "COMPLETE" and doc["exit_code"] == 0 and doc["items"]

    r = run_cli("async_ckpt.verify", complete, "--bogus")
    assert r.returncode == 64
    r = run_cli("async_ckpt.verify", tmp_path / "missing")
    assert r.returncode == 2
    r = run_cli("async_ckpt.verify", "--help")
    assert r.returncode == 0 and "64" in r.stdout and "PARTIAL" in r.stdout


def test_cli_ascii_when_stdout_cannot_encode(complete):
    r = run_cli("async_ckpt.verify", complete, encoding="ascii")
    assert r.returncode == 0 and re.search(r"\[ok\]\s+Model Weights", r.stdout)
    assert "\u2705" not in r.stdout


def test_cli_corrupt_output_names_tensor(complete):
    manifest = layout.read_manifest(complete)
    c = manifest.chunks[0]
    _flip(complete / manifest.files[c.file].path, c.offset + 1)
    r = run_cli("async_ckpt.verify", complete.parent)
    assert r.returncode == 2
    assert "CORRUPT" in r.stdout and f"offset {c.offset}" in r.stdout and "model" in r.stdout
    assert "restore would pick step 10" in r.stdout


def test_deep_decodes_and_default_checks_stored_crc(tmp_path):
    state = {"model": {"w": torch.randn(64, 1024)}, "optimizer": {}, "scheduler": {}, "progress": {},
             "rng": rng.capture()}
    step_dir = write_checkpoint(tmp_path, 1, state)
    manifest = layout.read_manifest(step_dir)
    assert verify.check_step(step_dir, deep=True).verdict == verify.COMPLETE
    c = manifest.chunks[0]
    _flip(step_dir / manifest.files[c.file].path, c.offset + c.length - 1)
    for deep in (False, True):
        rep = verify.check_step(step_dir, deep=deep)
        assert rep.verdict == verify.CORRUPT and rep.deep == deep
        assert "stored bytes crc32c mismatch" in rep.bad_chunks[0].error
    r = run_cli("async_ckpt.verify", step_dir, "--quick", "--deep")
    assert r.returncode == 64


def test_progress_bar_only_on_tty():
    from async_ckpt.tools.progress import Progress, human_bytes

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    with Progress(2048, "verify", stream=out) as bar:
        bar.update(1024)
        bar.update(1024)
    assert "100.0%" in out.getvalue() and "2.00 KiB" in out.getvalue()
    plain = io.StringIO()
    with Progress(10, "verify", stream=plain) as bar:
        bar.update(10)
    assert plain.getvalue() == ""
    assert human_bytes(1536) == "1.50 KiB" and human_bytes(12) == "12 B"


def test_root_json(complete):
    (complete.parent / ".checkpoint-11.tmp-zz").mkdir()
    r = run_cli("async_ckpt.verify", complete.parent, "--json")
    doc = json.loads(r.stdout)
    assert doc["kind"] == "root" and doc["restore_step"] == 10 and doc["exit_code"] == 0
    assert [s["verdict"] for s in doc["steps"]] == ["UNCOMMITTED", "COMPLETE"]


def test_folder_of_other_tools_checkpoints_json(tmp_path, capsys):
    """A folder of Lightning files: each judged, newest first by its recorded step; optimizer and
    scheduler found in optimizer_states / lr_schedulers; the JSON names the folder's kind and
    where each step came from."""
    F.lightning_file(tmp_path / "a.ckpt", step=3, epoch=0)
    F.lightning_file(tmp_path / "b.ckpt", step=9, epoch=2)
    assert verify.main(["--json", str(tmp_path)]) == 1          # PARTIAL: Lightning saves no RNG
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "root" and doc["layout"] == "lightning_dir" and doc["restore_step"] is None
    assert [(s["name"], s["step"], s["step_source"]) for s in doc["steps"]] == [
        ("b.ckpt", 9, "b.ckpt['global_step']"), ("a.ckpt", 3, "a.ckpt['global_step']")]
    for s in doc["steps"]:
        assert s["layout"] == "lightning" and s["missing"] == ["RNG states missing: dropout and shuffling will differ"]
    assert verify.main(["--plain", "--step", "3", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert "folder of Lightning checkpoints" in text and "a.ckpt" in text and "b.ckpt" not in text
