"""The central promise: a resumed run continues bit for bit.

2N steps straight vs. N steps → save_async → the process dies → a new process
restores → N more steps. Dropout and data shuffling are active (the demo's model);
losses, parameters, optimizer moments, scheduler and sampler state must be bitwise
equal.
"""

import json
import os
import subprocess
import sys

import torch

from async_ckpt import CheckpointManager

COMMON = ["--steps", "16", "--save-every", "8", "--dim", "32", "--block", "32", "--batch-size", "8",
          "--keep", "5"]


def run_demo(directory, loss_log, *extra):
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run([sys.executable, "-m", "async_ckpt.demo", "--dir", str(directory),
                           "--loss-log", str(loss_log), *COMMON, *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    return proc


def read_losses(path):
    out = {}
    for line in open(path):
        rec = json.loads(line)
        if rec["step"] in out:   # a replayed step must repeat the same loss
            assert out[rec["step"]] == rec["loss"], f"step {rec['step']} replayed differently"
        out[rec["step"]] = rec["loss"]
    return out


def assert_trees_equal(a, b, path="state"):
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        # Compare bytes, so -0.0 vs 0.0 or differing NaN payloads would fail too.
        assert a.contiguous().reshape(-1).view(torch.uint8).tolist() == \
            b.contiguous().reshape(-1).view(torch.uint8).tolist(), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_trees_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_trees_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    straight = run_demo(tmp_path / "a", tmp_path / "a.jsonl")
    assert straight.returncode == 0, straight.stderr

    crashed = run_demo(tmp_path / "b", tmp_path / "b.jsonl", "--crash-at", "11")
    assert crashed.returncode == -9, crashed.stderr          # SIGKILL mid-run, after the step-8 save
    resumed = run_demo(tmp_path / "b", tmp_path / "b.jsonl", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 8" in resumed.stdout

    la, lb = read_losses(tmp_path / "a.jsonl"), read_losses(tmp_path / "b.jsonl")
    assert la == lb and sorted(la) == list(range(16))

    with CheckpointManager(tmp_path / "a") as m:
        final_a = m.load(15)
    with CheckpointManager(tmp_path / "b") as m:
        final_b = m.load(15)
    for item in ("model", "optimizer", "scheduler", "data", "progress"):
        assert_trees_equal(final_a[item], final_b[item], item)
    assert final_a["optimizer"]["state"], "optimizer moments must be present"
    # The scheduler's lambda is not state; its position is.
    assert final_a["scheduler"]["last_epoch"] == 16
