"""Loading a checkpoint never runs code.

Payloads that would create a file when unpickled (a raw pickle, a ``torch.save`` zip, an
object ``.npy``) are planted in every file of a committed checkpoint and in legacy-looking
files; load, restore, verify (in process and the CLI) and ``fix --dry-run`` and ``fix`` run
over them; the file never appears. A static check keeps ``pickle`` out of the package and
every ``torch.load`` on ``weights_only=True``.
"""

from __future__ import annotations

import ast
import os
import pickle  # test-only: to build hostile payloads
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions
from async_ckpt.tools import legacy
from async_ckpt.tools import verify
from async_ckpt.errors import CheckpointError

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "async_ckpt"


class _Evil:
    """Unpickling calls open(marker, "w"): the marker file appears iff pickle ran our code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def payloads(marker: Path, tmp: Path) -> dict[str, bytes]:
    raw = pickle.dumps({"model": _Evil(marker)}, protocol=2)
    torch_zip = tmp / "evil_zip.pt"
    torch.save({"state_dict": _Evil(marker)}, torch_zip)
    legacy_fmt = tmp / "evil_legacy.pt"
    torch.save({"state_dict": _Evil(marker)}, legacy_fmt, _use_new_zipfile_serialization=False)
    npy = tmp / "evil.npy"
    np.save(npy, np.array([_Evil(marker)], dtype=object), allow_pickle=True)
    out = {"raw pickle": raw, "torch zip": torch_zip.read_bytes(), "torch legacy": legacy_fmt.read_bytes(),
           "npy object": npy.read_bytes()}
    for p in (torch_zip, legacy_fmt, npy):
        p.unlink()
    assert not marker.exists()
    return out


def _state():
    return {"model": torch.nn.Linear(4, 3), "progress": {"step": 1}}


def _exercise(root: Path, marker: Path) -> list[str]:
    """Everything that reads a checkpoint; returns the errors (all must be our own)."""
    errors = []
    try:
        with CheckpointManager(root, CheckpointManagerOptions(io_threads=2, handle_sigterm=False)) as mgr:
            for step in [None] + mgr.all_steps() + [1]:
                for fn in (lambda: mgr.load(step), lambda: mgr.restore(_state(), step)):
                    try:
                        fn()
                    except CheckpointError as e:
                        errors.append(type(e).__name__)
    except CheckpointError as e:
        errors.append(type(e).__name__)
    for path in [root] + sorted(root.iterdir()):
        verify.check_path(path)
    assert not marker.exists()
    return errors


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_payloads_really_run_when_unpickled(tmp_path):
    """The control: the payload does create the file when loaded unsafely."""
    marker = tmp_path / "pwned"
    blob = payloads(marker, tmp_path)["raw pickle"]
    pickle.loads(blob)
    assert marker.exists()


def test_payload_in_every_file_of_a_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    blobs = payloads(marker, tmp_path)
    root = tmp_path / "root"
    with CheckpointManager(root, CheckpointManagerOptions(io_threads=2, handle_sigterm=False)) as mgr:
        mgr.save(1, _state())
    step_dir = root / "checkpoint-1"
    names = sorted(p.name for p in step_dir.iterdir())
    assert names == ["COMMIT", "data-r0-0.bin", "manifest.json"]
    pristine = {n: (step_dir / n).read_bytes() for n in names}
    tried = 0
    for kind, blob in blobs.items():
        for name in names:
            for how in ("replace", "append"):
                for n, data in pristine.items():
                    (step_dir / n).write_bytes(data)
                (step_dir / name).write_bytes(blob if how == "replace" else pristine[name] + blob)
                _exercise(root, marker)
                tried += 1
    # The tmp leftover and quarantine names are never read either.
    shutil.copytree(step_dir, root / ".checkpoint-2.tmp-abc")
    shutil.copytree(step_dir, root / "checkpoint-3.corrupt-abc")
    _exercise(root, marker)
    assert tried == len(blobs) * len(names) * 2
    proc = _cli("async_ckpt.verify", str(root))
    assert proc.returncode in (0, 1, 2), proc.stderr
    assert not marker.exists()


LEGACY_NAMES = ["pytorch_model.bin", "model.pt", "model.pth", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "training_args.bin", "scaler.pt", "random_states_0.pkl", "optimizer.bin", "model.bin",
                "checkpoint.pt", "state.pkl", "weights.npy"]


@pytest.mark.parametrize("kind", ["raw pickle", "torch zip", "torch legacy", "npy object"])
def test_payload_in_legacy_looking_files(tmp_path, kind):
    marker = tmp_path / "pwned"
    blob = payloads(marker, tmp_path)[kind]
    hf = tmp_path / "run" / "checkpoint-5"          # a Hugging Face Trainer-looking step
    hf.mkdir(parents=True)
    for name in LEGACY_NAMES:
        (hf / name).write_bytes(blob)
    (hf / "trainer_state.json").write_text('{"global_step": 5, "epoch": 1.0, "log_history": []}')
    (hf / "config.json").write_text("{}")
    single = tmp_path / "single.pt"                   # one torch.save file
    single.write_bytes(blob)
    for path in (hf, hf.parent, single):
        found = legacy.detect(path)
        if found is not None:
            legacy.check(found)
        verify.check_path(path)
    _exercise(hf.parent, marker)
    from async_ckpt.tools import fix

    # The CLIs' main() in process (a subprocess each would cost seconds; the CLI itself runs
    # over a planted checkpoint above): unloadable files are never COMPLETE.
    for path in (hf.parent, single):
        assert verify.main(["--plain", str(path)]) in (1, 2)
        fix.main(["--dry-run", str(path)])
    work = tmp_path / "fixme"
    shutil.copytree(hf.parent, work)
    fix.main(["--no-backup", str(work)])
    assert not marker.exists(), f"{kind}: unpickling ran code"


def test_no_pickle_in_the_package():
    """Static: no pickle-family imports, torch.load only with weights_only=True, no
    allow_pickle=True, no eval/exec."""
    banned_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [f"{where}: import {a.name}" for a in node.names
                             if a.name.split(".")[0] in banned_modules]
            elif isinstance(node, ast.ImportFrom):
                if (node.module or "").split(".")[0] in banned_modules:
                    problems.append(f"{where}: from {node.module} import ...")
            elif isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                kw = {k.arg: k.value for k in node.keywords}
                if name in ("eval", "exec") and isinstance(f, ast.Name):
                    problems.append(f"{where}: {name}()")
                if name == "load" and isinstance(f, ast.Attribute) and ast.unparse(f.value) == "torch":
                    w = kw.get("weights_only")
                    if not (isinstance(w, ast.Constant) and w.value is True):
                        problems.append(f"{where}: torch.load without weights_only=True")
                if name in ("load", "loads") and isinstance(f, ast.Attribute) and \
                        ast.unparse(f.value) in ("np", "numpy"):
                    a = kw.get("allow_pickle")
                    if a is not None and not (isinstance(a, ast.Constant) and a.value is False):
                        problems.append(f"{where}: numpy load with allow_pickle")
                if name in ("loads", "load", "Unpickler") and isinstance(f, ast.Attribute) and \
                        ast.unparse(f.value).split(".")[0] in banned_modules:
                    problems.append(f"{where}: {ast.unparse(f)}")
    assert not problems, "\n".join(problems)
