"""Hostile input, round 2: no hangs, nothing outside the root, no corrupted manifest blessed.

One test (or a few) per attack, named after it. The base is what the attacks started from: a
root with steps 1 and 2 of a Linear + AdamW + StepLR run, written by the manager. Everything
runs in process and finishes in seconds; a call that could block (a FIFO) runs in a thread
with a deadline, and the FIFO is opened for writing to release it if the deadline passes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import ckpt_layout as layout
from async_ckpt import CheckpointManager, CheckpointManagerOptions
from async_ckpt.errors import CheckpointError, FormatError, StorageError
from async_ckpt.format import manifest as mf
from async_ckpt.format import names
from async_ckpt.tools import fix, report, verify

import fixtures_legacy as F

OPTS = CheckpointManagerOptions(io_threads=2, handle_sigterm=False, cleanup_leftovers=False)
PKG_ROOT = Path(__import__("async_ckpt").__file__).parent.parent


def _state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.001)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    return {"model": model, "optimizer": opt, "scheduler": sched, "progress": {"step": 0}}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "root"
    state = _state()
    with CheckpointManager(root, OPTS) as mgr:
        for step in (1, 2):
            state["model"](torch.randn(2, 4)).sum().backward()
            state["optimizer"].step()
            state["scheduler"].step()
            state["progress"]["step"] = step
            mgr.save(step, state, metrics={"loss": 1.0 / step})
    return root


@pytest.fixture
def root(template, tmp_path) -> Path:
    dst = tmp_path / "root"
    shutil.copytree(template, dst, symlinks=True)
    return dst


def doc_of(step_dir: Path) -> dict:
    return json.loads((step_dir / layout.MANIFEST_NAME).read_bytes())


def write_doc(step_dir: Path, doc: dict, *, sign: bool = True, seal: bool = True) -> bytes:
    """Write ``doc`` as the manifest, sealed with its self digest and re-signed by a new marker,
    as an attacker who knows the format would."""
    body = {k: v for k, v in doc.items() if k != "self_sha256"}
    data = json.dumps(body, separators=(",", ":")).encode()
    if seal:
        data = layout.seal(data)
    (step_dir / layout.MANIFEST_NAME).write_bytes(data)
    if sign:
        step = names.parse_step_dir(step_dir.name)
        (step_dir / layout.COMMIT_NAME).write_bytes(layout.commit_marker_bytes(step, data))
    return data


def cli(main, *args) -> tuple[int, str, str]:
    """Run a CLI's main() in process: (exit code, stdout, stderr). Any exception fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def no_hang(fn, fifos=(), timeout: float = 30.0):
    """Run ``fn`` in a thread; fail if it has not returned by ``timeout`` (a blocked open of a
    FIFO), releasing the FIFOs so the thread can end."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:   # noqa: BLE001 - re-raised on the test's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        for f in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail(f"blocked for {timeout} s (a FIFO was opened without O_NONBLOCK?)")
    if "error" in box:
        raise box["error"]
    return box.get("result")


def restore_warns(root: Path, *match: str) -> int:
    """Restore the latest step into a fresh state; the warning must name every string."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CheckpointManager(root, OPTS) as mgr:
            step = mgr.restore(_state(1))
    text = " ".join(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
    for m in match:
        assert m in text, (m, text)
    return step


# ----------------------------------------------------------------------------- case 1: FIFOs


@pytest.mark.parametrize("name", [names.COMMIT_NAME, names.MANIFEST_NAME])
def test_case01_fifo_in_a_step_never_blocks_manager_verify_or_fix(root, name):
    d = root / "checkpoint-2"
    fifo = d / name
    fifo.unlink()
    os.mkfifo(fifo)

    def go():
        assert restore_warns(root, "checkpoint-2", "not a regular file") == 1
        code, out, _ = cli(verify.main, root)
        assert code == 0 and "passes over newer step 2" in out
        code, out, _ = cli(verify.main, d)
        assert code == 2 and "not a regular file" in out
        code, out, _ = cli(fix.main, root, "--quarantine")
        return code, out

    code, out = no_hang(go, [fifo])
    assert code == 0, out
    if name == names.COMMIT_NAME:
        # manifest intact and proven: a new marker; the FIFO itself went to the backup, unopened
        assert "write a new commit marker" in out and layout.commit_status(d).committed
        moved = root / fix.BACKUP_DIR / "checkpoint-2" / names.COMMIT_NAME
        assert stat.S_ISFIFO(os.lstat(moved).st_mode)
    else:
        assert "quarantine" in out and not d.exists()


def test_case01_fifo_in_legacy_json_never_blocks(tmp_path):
    hf = F.hf_checkpoint(tmp_path, 7, weights="sharded")["path"]
    fifos = []
    for n in ("trainer_state.json", "model.safetensors.index.json", "config.json"):
        (hf / n).unlink()
        os.mkfifo(hf / n)
        fifos.append(hf / n)

    def go():
        rep = verify.check_step(hf)
        code, out, _ = cli(fix.main, tmp_path, "--dry-run")
        return rep, code, out

    rep, code, out = no_hang(go, fifos)
    assert rep.verdict in (verify.PARTIAL, verify.CORRUPT, verify.COMPLETE)
    assert "Traceback" not in out


# ----------------------------------------------------------------------------- case 2: giant numbers


@pytest.mark.parametrize("field", ["metrics", "created_unix"])
@pytest.mark.parametrize("signed", [True, False])
def test_case02_400_digit_number_is_a_format_error_and_step_1_still_restores(root, field, signed):
    d = root / "checkpoint-2"
    doc = doc_of(d)
    if field == "metrics":
        doc["metrics"] = {"loss": 10 ** 400}
    else:
        doc["created_unix"] = 10 ** 400
    write_doc(d, doc, sign=signed, seal=signed)
    with pytest.raises(FormatError, match=r"manifest\.(metrics\.loss|created_unix): a 401-digit integer"):
        layout.parse_manifest(doc)
    assert restore_warns(root, "checkpoint-2") == 1
    with CheckpointManager(root, OPTS) as mgr:
        with pytest.raises(CheckpointError):
            mgr.load(2)
    code, out, err = cli(verify.main, d)
    assert code == 2 and not err
    code, out, _ = cli(verify.main, root, "--json")
    doc = json.loads(out)
    assert code == 0 and doc["restore_step"] == 1 and doc["passed_over"][0]["step"] == 2
    code, out, _ = cli(fix.main, root, "--quarantine")
    assert code == 0 and "quarantine" in out, out
    assert not d.exists()


@pytest.mark.parametrize("value,match", [
    (True, "expected a number, got bool"),
    (float("inf"), "not a finite number"),
    (-1.0, "out of range"),
    (1e18, "out of range"),
    ("1.0", "expected a number"),
])
def test_case02_created_unix_range(root, value, match):
    doc = doc_of(root / "checkpoint-2")
    doc["created_unix"] = value
    with pytest.raises(FormatError, match=r"manifest\.created_unix: .*" + match):
        layout.parse_manifest(doc)


# ----------------------------------------------------------------------------- case 3: the manifest proves itself


def _set_lr(node, lr: float) -> bool:
    if isinstance(node, dict):
        if node.get("$") == "dict" and "lr" in node["keys"]:
            node["values"][node["keys"].index("lr")] = lr
            return True
        return any(_set_lr(v, lr) for v in node.values())
    return isinstance(node, list) and any(_set_lr(v, lr) for v in node)


def _flip_lr(step_dir: Path) -> None:
    """lr 0.001 -> 0.009 in the manifest's bytes, everything else (its self digest too) as it was."""
    doc = doc_of(step_dir)
    seal = doc.pop("self_sha256")
    assert _set_lr(doc["ranks"], 0.009)
    body = json.dumps(doc, separators=(",", ":")).encode()
    (step_dir / layout.MANIFEST_NAME).write_bytes(body[:-1] + b',"self_sha256":"' + seal.encode() + b'"}')


def test_case03_a_flipped_manifest_is_never_resigned_and_never_silently_skipped(root):
    d = root / "checkpoint-2"
    _flip_lr(d)
    marker = (d / names.COMMIT_NAME).read_bytes()
    status = layout.commit_status(d)
    assert status.manifest_sealed is False and not status.committed and "damaged" in status.reason

    code, out, _ = cli(verify.main, root)
    assert code == 0 and "WARNING: restore passes over newer step 2" in out and "damaged" in out
    assert "passes over newer step 2 (CORRUPT)" in out.splitlines()[-1]
    assert restore_warns(root, "checkpoint-2", "damaged", "restoring step 1") == 1

    code, out, _ = cli(fix.main, root)
    assert "write a new commit marker" not in out and "--quarantine" in out
    assert (d / names.COMMIT_NAME).read_bytes() == marker
    with pytest.raises(CheckpointError, match="damaged"):
        layout.policy(root).rewrite_marker(2)
    code, out, _ = cli(fix.main, root, "--quarantine")
    assert code == 0 and not d.exists()


def test_case03_a_damaged_marker_is_rewritten(root):
    d = root / "checkpoint-2"
    (d / names.COMMIT_NAME).write_bytes(layout.commit_marker_bytes(2, b"something else"))
    status = layout.commit_status(d)
    assert status.manifest_sealed is True and "marker is damaged" in status.reason
    code, out, _ = cli(fix.main, root)
    assert code == 0 and "write a new commit marker" in out, out
    assert layout.commit_status(d).committed


def test_case03_manifests_without_a_self_digest_still_load_but_are_never_resigned(root):
    d = root / "checkpoint-2"
    write_doc(d, doc_of(d), seal=False)          # what an older writer produced
    assert layout.seal_state((d / layout.MANIFEST_NAME).read_bytes()) is None
    with CheckpointManager(root, OPTS) as mgr:
        assert mgr.all_steps() == [1, 2] and mgr.restore(_state(1)) == 2
    (d / names.COMMIT_NAME).unlink()
    code, out, _ = cli(fix.main, root)
    assert "write a new commit marker" not in out and "cannot be proven intact" in out, out
    assert not (d / names.COMMIT_NAME).exists()
    with pytest.raises(CheckpointError, match="no self digest"):
        layout.policy(root).rewrite_marker(2)


def test_case03_seal_is_exactly_the_tail():
    body = b'{"a":1}'
    sealed = layout.seal(body)
    assert layout.seal_state(sealed) is True
    assert layout.seal_state(body) is None
    assert layout.seal_state(sealed + b"\n") is False             # anything after it breaks it
    assert layout.seal_state(sealed.replace(b'"a":1', b'"a":2')) is False
    assert layout.seal_state(b'{"a":{"self_sha256":"' + b"0" * 64 + b'"}}') is False


# ----------------------------------------------------------------------------- case 4: planted symlinks


def test_case04_backup_symlink_is_never_written_through(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / fix.BACKUP_DIR).symlink_to(outside)
    leftover = root / ".checkpoint-3.tmp-abc123"
    leftover.mkdir()
    (leftover / "data-r0-0.bin").write_bytes(b"partial")
    (root / "checkpoint-2" / names.COMMIT_NAME).write_bytes(layout.commit_marker_bytes(2, b"x"))
    code, out, _ = cli(fix.main, root)
    assert code == 2 and "not a real directory" in out, out
    assert list(outside.iterdir()) == []
    assert leftover.exists()


def test_case04_lock_symlink_is_refused(root, tmp_path):
    target = tmp_path / "outside.lock"
    lock = root / names.LOCK_NAME
    lock.unlink()
    lock.symlink_to(target)
    with pytest.raises(StorageError, match="symlink"):
        CheckpointManager(root, OPTS)
    code, out, _ = cli(fix.main, root)
    assert code == 2 and "symlink" in out
    assert not target.exists()


# ----------------------------------------------------------------------------- case 5: names


def test_case05_trailing_newline_is_not_a_step(root):
    shutil.copytree(root / "checkpoint-1", root / "checkpoint-99\n")
    for parse in (names.parse_step_dir, names.parse_tmp_dir, names.parse_quarantine_dir, names.step_of_any):
        assert parse("checkpoint-99\n") is None
    assert names.parse_tmp_dir(".checkpoint-9.tmp-abc\n") is None
    assert names.parse_step_dir("checkpoint-%d" % (names.MAX_STEP + 1)) is None
    with CheckpointManager(root, OPTS) as mgr:
        assert mgr.all_steps() == [1, 2]
    rep = verify.check_root(root)
    assert [r.name for r in rep.steps] == ["checkpoint-2", "checkpoint-1"] and rep.restore_step == 2


# ----------------------------------------------------------------------------- case 7: legacy JSON


@pytest.mark.parametrize("what", ["5000-digit global_step", "100k-deep nesting", "300-deep nesting",
                                  "weight_map of lists", "weight_map not an object"])
def test_case07_hostile_legacy_json_is_a_problem_not_a_traceback(tmp_path, what):
    hf = F.hf_checkpoint(tmp_path, 7, weights="sharded")["path"]
    ts, index = hf / "trainer_state.json", hf / "model.safetensors.index.json"
    if what == "5000-digit global_step":
        ts.write_text('{"global_step": 1' + "0" * 5000 + "}")
    elif what.endswith("deep nesting"):
        depth = 100_000 if what.startswith("100k") else 300
        ts.write_text('{"a": ' + "[" * depth + "]" * depth + "}")
    elif what == "weight_map of lists":
        doc = json.loads(index.read_text())
        doc["weight_map"] = {k: [v] for k, v in doc["weight_map"].items()}
        index.write_text(json.dumps(doc))
    else:
        index.write_text(json.dumps({"weight_map": [1, 2]}))
    rep = verify.check_step(hf)
    assert rep.verdict == verify.CORRUPT, rep
    assert any(("trainer_state.json" if "global" in what or "nest" in what else "index.json") in p
               for p in rep.problems), rep.problems
    code, out, err = cli(verify.main, hf)
    assert code == 2 and "Traceback" not in out + err
    code, out, err = cli(fix.main, hf)
    assert code == 2 and "cannot convert" in out and "Traceback" not in out + err


def test_case07_converted_trainer_state_tolerates_odd_values(tmp_path):
    hf = F.hf_checkpoint(tmp_path, 7)["path"]
    (hf / "trainer_state.json").write_text(
        '{"global_step": 7, "epoch": true, "log_history": [{"loss": 1' + "0" * 400 + '}, {"loss": 2}]}')
    code, out, _ = cli(fix.main, tmp_path)
    assert code == 0, out
    # converted beside the Trainer's folder, never into it (the Trainer keeps resuming from its own)
    with CheckpointManager(tmp_path.parent / (tmp_path.name + ".async_ckpt"), OPTS) as mgr:
        progress = mgr.load(7)["progress"]
    assert progress["loss_history"] == [[None, 2.0]] and "epoch" not in progress


# ----------------------------------------------------------------------------- case 8: fix run.pt


def test_case08_fix_torch_file_names_the_step_it_writes(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save({"model": model.state_dict(), "global_step": 500}, tmp_path / "run.pt")
    code, out, _ = cli(fix.main, tmp_path / "run.pt")
    assert "checkpoint-0" not in out and f"into {tmp_path / 'run.pt.async_ckpt' / 'checkpoint-500'}" in out, out
    assert layout.commit_status(tmp_path / "run.pt.async_ckpt" / "checkpoint-500").committed
    assert code == verify.check_step(tmp_path / "run.pt.async_ckpt" / "checkpoint-500").exit_code != 2


def test_case08_a_step_beyond_the_format_is_refused(tmp_path):
    torch.save({"model": torch.nn.Linear(3, 2).state_dict(), "global_step": 10 ** 25}, tmp_path / "run.pt")
    code, out, _ = cli(fix.main, tmp_path / "run.pt")
    assert "exceeds the largest step the format allows" in out, out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("checkpoint", ".checkpoint"))]


# ----------------------------------------------------------------------------- case 9: amplification


def test_case09_zero_length_parts_and_container_count_are_refused(root):
    doc = doc_of(root / "checkpoint-2")
    arrays = doc["ranks"][0]["arrays"]
    arrays[0]["parts"] = arrays[0]["parts"] + [[0, 0, 0]]
    with pytest.raises(FormatError, match=r"parts\[\d+\]\[2\]: 0 out of range \[1, "):
        layout.parse_manifest(doc)
    data = b"[" + b",".join([b"[0,0,0]"] * 1000) + b"]"
    with pytest.raises(FormatError, match="more than the 100"):
        mf.load_json(data, "manifest.json", mf.MAX_MANIFEST_BYTES, max_containers=100)


def test_case09_opening_a_root_parses_no_manifest(root, monkeypatch):
    import async_ckpt.storage.commit as commit

    def refuse(data):
        raise AssertionError("a manifest was parsed to list steps")

    monkeypatch.setattr(commit, "parse_manifest_bytes", refuse)
    with CheckpointManager(root, OPTS) as mgr:
        assert mgr.all_steps() == [1, 2] and mgr.latest_step() == 2


def _rle_frame(total: int, *, window_log: int | None = 17) -> bytes:
    """A zstd frame of RLE blocks (4 bytes per 128 KiB) declaring ``total`` zero bytes; with
    ``window_log`` None, single-segment (its window is then the whole content)."""
    fhd = 0xC0 | (0x20 if window_log is None else 0)          # 8-byte content size
    header = b"\x28\xb5\x2f\xfd" + bytes([fhd])
    if window_log is not None:
        header += bytes([(window_log - 10) << 3])
    header += total.to_bytes(8, "little")
    blocks, left = [], total
    while left:
        n = min(left, 128 << 10)
        left -= n
        blocks.append(((n << 3) | (1 << 1) | (left == 0)).to_bytes(3, "little") + b"\0")
    return header + b"".join(blocks)


RLE_SCRIPT = """
import resource, sys
sys.path.insert(0, {repo!r})
import numpy as np
from async_ckpt import native as n
from async_ckpt.errors import ChecksumError, FormatError
path, size = {path!r}, {size}
frame = open(path, "rb").read()
crc = n.crc32c(frame)
reader = n.Reader(3)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
jobs = [n.ReadJob(0, 0, len(frame), size, n.CODEC_ZSTD, s, crc, 0, None, k) for k, s in enumerate((0, 4, 2))]
errors = reader.read([path], jobs, True)
print("ERRORS", errors)
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def test_case09_frame_declaring_a_lot_decodes_in_fixed_memory(tmp_path):
    size = 256 << 20
    frame = _rle_frame(size)
    path = tmp_path / "rle.bin"
    path.write_bytes(frame)
    proc = subprocess.run([sys.executable, "-c", RLE_SCRIPT.format(repo=str(PKG_ROOT), path=str(path), size=size)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    errors = proc.stdout.split("ERRORS ")[1].splitlines()[0]
    # every frame decoded in full (the raw crc is wrong on purpose), none allocated its size
    assert errors.count("decoded bytes crc32c mismatch") == 3, proc.stdout
    growth = int(proc.stdout.split("GROWTH_KB ")[1])
    assert growth < 64 * 1024, f"RSS grew by {growth} KiB decoding three 256 MiB frames"


def test_case09_single_segment_frame_needs_too_large_a_window(tmp_path):
    from async_ckpt import native as n

    frame = _rle_frame(1 << 31, window_log=None)
    path = tmp_path / "rle.bin"
    path.write_bytes(frame)
    j = n.ReadJob(0, 0, len(frame), 1 << 31, n.CODEC_ZSTD, 0, n.crc32c(frame), 0, None, 0)
    with pytest.raises(FormatError, match="window"):
        n.Reader(1).read([str(path)], [j])


@pytest.mark.parametrize("elem", [2, 4, 8])
def test_case09_streamed_unshuffle_crc_matches(tmp_path, elem):
    from async_ckpt import native as n

    rng = np.random.default_rng(elem)
    for size in sorted({0, 1, elem - 1, elem, 3 * elem + 1, 1000, (3 << 20) + 5}):
        data = (rng.integers(0, 4, size, dtype=np.uint8)).tobytes()
        path = str(tmp_path / f"s{elem}-{size}.bin")
        (rec,) = n.Writer(1).write([path], [n.WriteJob(data, 0, n.CODEC_ZSTD, 1, elem)])
        if rec.codec != n.CODEC_ZSTD:
            continue
        good = n.ReadJob(0, rec.offset, rec.length, rec.raw_length, rec.codec, rec.shuffle, rec.crc32c,
                         rec.raw_crc32c, None, 0)
        bad = n.ReadJob(0, rec.offset, rec.length, rec.raw_length, rec.codec, rec.shuffle, rec.crc32c,
                        rec.raw_crc32c ^ 1, None, 1)
        errors = n.Reader(1).read([path], [good, bad], True)
        assert errors[0] is None, (size, errors[0])
        assert "decoded bytes crc32c mismatch" in errors[1]


# ----------------------------------------------------------------------------- case 10: verify = restore


@pytest.mark.parametrize("lie", ["tree key renamed", "numpy dtype under a tensor node",
                                 "float tensor as a generator state"])
def test_case10_what_restore_rejects_verify_rejects(root, lie):
    d = root / "checkpoint-2"
    doc = doc_of(d)
    sec = doc["ranks"][0]
    tree = sec["tree"]
    if lie == "tree key renamed":
        tree["keys"][tree["keys"].index("model")] = "modelX"
    elif lie == "numpy dtype under a tensor node":
        a = next(a for a in sec["arrays"] if a["dtype"] == "torch.float32")
        a["dtype"] = "<f4"
    else:
        i = next(i for i, a in enumerate(sec["arrays"]) if a["dtype"] == "torch.float32")
        tree["values"][0] = {"$": "torch.generator",
                             "v": {"$": "tensor", "array": i, "device": "cpu", "requires_grad": False}}
    write_doc(d, doc)
    with pytest.raises(FormatError):
        layout.parse_manifest(doc)
    assert verify.check_step(d).verdict == verify.CORRUPT
    assert restore_warns(root, "checkpoint-2", "invalid manifest") == 1


def test_case10_validation_needs_no_torch():
    code = textwrap.dedent(f"""
        import sys, json
        sys.modules["torch"] = None          # import torch fails
        sys.path.insert(0, {str(PKG_ROOT)!r})
        from async_ckpt.format.tree import walk_array_refs
        node = {{"$": "dict", "keys": ["a", "b", "c"], "values": [
            {{"$": "torch.dtype", "v": "torch.bfloat16"}}, {{"$": "torch.Size", "v": [2, 3]}},
            {{"$": "torch.generator", "v": {{"$": "tensor", "array": 0, "device": "cpu", "requires_grad": False}}}}]}}
        print(walk_array_refs(node))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "[(0, 'generator')]" in proc.stdout, proc.stderr


# ----------------------------------------------------------------------------- case 11: rotation


def test_case11_a_step_rotated_away_while_verified_is_not_corrupt(root, monkeypatch):
    real = verify.scan_chunks

    def rotate_then_scan(storage, location, manifest, chunk_ids, **kw):
        if location.endswith("checkpoint-1"):
            layout.policy(root).delete(1)     # what the manager's rotation does, mid-check
        return real(storage, location, manifest, chunk_ids, **kw)

    monkeypatch.setattr(verify, "scan_chunks", rotate_then_scan)
    rep = verify.check_root(root)
    one = next(r for r in rep.steps if r.name == "checkpoint-1")
    assert one.deleted and one.verdict == verify.UNCOMMITTED and "rotation" in one.reason
    assert one.finding(verify.Repair.QUARANTINE) is None and not one.problems
    assert rep.verdict == verify.COMPLETE and rep.restore_step == 2
    assert any("deleted while checking" in n for n in rep.notes)
    text = io.StringIO()
    report.render(rep, text)
    assert "CORRUPT" not in text.getvalue()


def test_case11_verify_during_real_rotation(tmp_path):
    root = tmp_path / "root"
    state = {"w": torch.zeros(50_000)}
    seen: list = []
    with CheckpointManager(root, CheckpointManagerOptions(max_to_keep=2, io_threads=2, handle_sigterm=False)) as mgr:
        mgr.save(0, state)
        for step in range(1, 13):
            state["w"] += 1
            handle = mgr.save_async(step, state)
            rep = verify.check_root(root)
            seen.extend((r.name, r.verdict, r.problems) for r in rep.steps)
            handle.result()
    assert not [s for s in seen if s[1] == verify.CORRUPT], seen


# ----------------------------------------------------------------------------- case 12: small ones


def test_case12_threads_minus_one_is_a_usage_error(root):
    for args in (["--threads", "-1"], ["--threads", "0"], ["--threads", "x"], ["--step", "-3"]):
        code, out, err = cli(verify.main, root, *args)
        assert code == verify.EXIT_USAGE and err.count("\n") == 1 and "Traceback" not in err, (args, err)
    code, out, err = cli(fix.main, root, "--step", "-1")
    assert code == verify.EXIT_USAGE and err.count("\n") == 1


@pytest.mark.parametrize("marker", [
    {"format_version": True}, {"format_version": 1.0}, {"step": True}, {"step": 2 ** 80}, {"format": 1},
])
def test_case12_commit_marker_fields_are_typed(root, marker):
    d = root / "checkpoint-2"
    good = json.loads((d / names.COMMIT_NAME).read_bytes())
    (d / names.COMMIT_NAME).write_text(json.dumps(dict(good, **marker)))
    with pytest.raises(FormatError):
        mf.parse_commit_marker((d / names.COMMIT_NAME).read_bytes())
    assert not layout.commit_status(d).committed


def test_case12_non_finite_and_boolean_metrics(root):
    d = root / "checkpoint-2"
    raw = write_doc(d, doc_of(d), seal=False).replace(b'"metrics":{"loss":0.5}', b'"metrics":{"loss":1e999}')
    with pytest.raises(FormatError, match=r"metrics\.loss: inf is not a finite number"):
        layout.parse_manifest_bytes(raw)
    doc = doc_of(d)
    doc["metrics"] = {"loss": True}
    with pytest.raises(FormatError, match="metrics.loss: expected a number, got bool"):
        layout.parse_manifest(doc)


def test_case12_reports_are_strict_json_and_dates_never_fail(root):
    rep = verify.check_step(root / "checkpoint-2")
    rep.metrics = {"loss": float("inf"), "acc": float("nan")}
    rep.created_unix = 1e18
    doc = json.loads(report.to_json(rep), parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
    assert doc["metrics"] == {"loss": "inf", "acc": "nan"}
    out = io.StringIO()
    report.render(rep, out, verbose=True)
    assert "not a representable date" in out.getvalue()
    code, out, err = cli(verify.main, root, "-v")
    assert code == 0 and not err
