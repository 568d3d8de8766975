"""SIGKILL at every named fault point, and at random moments: no committed byte is ever lost.

Every trial forks a prepared training process (``crash_worker.ForkServer``) that saves
every step and dies, either at the n-th hit of a fault point (``async_ckpt.faults``) or
when the test SIGKILLs it at a random moment. After each death
``crash_worker.check_after_kill`` opens a fresh manager and checks: only committed steps
are listed, none a run saw committed is missing (beyond rotation), every listed step
loads bit for bit equal to what was saved, the newest restores in place, leftovers are
gone and verify calls every step COMPLETE. Then the next run resumes on the same root.

Knobs: ``ASYNC_CKPT_CRASH_SEED`` (default: random, printed on failure),
``ASYNC_CKPT_SOAK_TRIALS`` (the soak tests' size, default 100). Reproduce one trial
with the ``python tests/crash_worker.py run ...`` line a failure prints.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import crash_worker as cw
from async_ckpt import faults
import ckpt_layout as layout

BASE_SEED = int(os.environ.get("ASYNC_CKPT_CRASH_SEED", random.randrange(1 << 30)))
SOAK_TRIALS = int(os.environ.get("ASYNC_CKPT_SOAK_TRIALS", "100"))
SAVE_POINTS = ("after_staging", "mid_write", "after_data", "after_manifest", "after_marker", "after_rename")
DEFAULT_PER_POINT = 3
DEFAULT_RANDOM_KILLS = 10


@pytest.fixture(scope="module")
def server():
    return cw.shared_server()


def _repro(root, seed, steps, log, options, fault, size):
    fault_arg = f" --fault {fault}" if fault else ""
    return (f"python tests/crash_worker.py run --root {root} --seed {seed} --steps {steps} --log {log}"
            f"{fault_arg} --size {size} --options '{json.dumps(options)}'")


def _random_options(rng: random.Random, keep: int) -> dict:
    return {"max_to_keep": keep, "compression": rng.choice([None, "zstd", "auto"]),
            "max_inflight_saves": rng.choice([1, 2]), "chunk_bytes": 64 << 10, "io_threads": 2,
            "handle_sigterm": False}


def _inspect_leftovers(root: Path) -> list[dict]:
    out = []
    for d in layout.find_leftovers(root):
        files = {p.name: p.stat().st_size for p in d.iterdir()}
        out.append(files)
    return out


def fault_trial(server, tmp_path: Path, point: str, trial: int, stats: cw.Stats) -> None:
    rng = random.Random(f"{BASE_SEED}-{point}-{trial}")
    seed = rng.randrange(1 << 20)
    keep = rng.choice([1, 2, 3])
    size = "big" if point == "mid_write" else "small"
    options = _random_options(rng, keep)
    root, log = tmp_path / f"{point}-{trial}", str(tmp_path / f"{point}-{trial}.log")
    if point == "during_rotation":
        steps = keep + rng.randint(1, 4)
        nth = rng.randint(1, steps - keep)            # the nth deletion of this run
    else:
        steps = rng.randint(1, 5)
        nth = rng.randint(1, steps)                   # dies while saving the nth step
    fault = f"{point}:{nth}"
    ctx = f"seed {BASE_SEED} trial {trial}: {_repro(root, seed, steps, log, options, fault, size)}"

    status = server.run(root=str(root), seed=seed, steps=steps, log=log, options=options, fault=fault,
                        size=size)
    stats.trials += 1
    assert status == -9, f"{ctx}: expected SIGKILL at {fault}, got {status}\n{cw.stderr_of(log)}"
    stats.kills += 1
    killed_step = nth - 1                              # steps start at 0 on a fresh root
    leftovers = _inspect_leftovers(root)
    if point == "after_rename":
        assert not leftovers, f"{ctx}: {leftovers}"
    else:
        assert len(leftovers) == 1, f"{ctx}: leftovers {leftovers}"
        files = leftovers[0]
        if point == "mid_write":
            data = [v for k, v in files.items() if k.startswith("data-")]
            assert data and data[0] > 0 and layout.MANIFEST_NAME not in files, f"{ctx}: {files}"
        if point in ("after_data", "after_manifest", "after_marker"):
            assert (layout.MANIFEST_NAME in files) == (point != "after_data"), f"{ctx}: {files}"
            assert (layout.COMMIT_NAME in files) == (point == "after_marker"), f"{ctx}: {files}"

    listed = cw.check_after_kill(str(root), seed, log, keep, size, stats, ctx)
    if point == "during_rotation":
        assert len(listed) == keep, f"{ctx}: {listed}"
    elif point == "after_rename":
        assert listed and listed[-1] == killed_step, f"{ctx}: {listed}"
    else:
        assert killed_step not in listed and (not listed or listed[-1] == killed_step - 1), f"{ctx}: {listed}"

    # Training goes on from the newest step (the child checks the restore bitwise itself).
    status = server.run(root=str(root), seed=seed, steps=2, log=log, options=options, size=size)
    assert status == 0, f"{ctx}: resumed run failed ({status})\n{cw.stderr_of(log)}"
    listed2 = cw.check_after_kill(str(root), seed, log, keep, size, stats, ctx + " (after resume)")
    assert listed2[-1] == (listed[-1] + 2 if listed else 1), f"{ctx}: {listed} then {listed2}"


def _verify_cli(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "async_ckpt.verify", "--plain", str(root)],
                          capture_output=True, text=True, timeout=120,
                          cwd=str(cw.ROOT), env=dict(os.environ, PYTHONPATH=str(cw.ROOT)))


def test_fault_points_are_all_reached_by_the_pipeline():
    assert faults.POINTS == SAVE_POINTS + ("during_rotation",)


def test_unknown_fault_point_is_refused():
    with pytest.raises(ValueError, match="unknown fault point"):
        faults.arm("after_lunch")
    with pytest.raises(ValueError, match="positive"):
        faults.arm("after_data:0")
    faults.arm("")
    assert not any(faults.armed(p) for p in faults.POINTS)


@pytest.mark.parametrize("point", faults.POINTS)
def test_sigkill_at_fault_point(server, tmp_path, point):
    stats = cw.Stats()
    for trial in range(DEFAULT_PER_POINT):
        fault_trial(server, tmp_path, point, trial, stats)
    print(stats.line(f"fault {point}"))
    assert stats.bytes_lost == 0


def random_kill_trials(server, tmp_path: Path, trials: int, stats: cw.Stats, tag: str) -> Path:
    """One root, ``trials`` training processes killed at random moments, each resuming the last."""
    rng = random.Random(f"{BASE_SEED}-random-{tag}")
    seed = rng.randrange(1 << 20)
    keep = rng.choice([1, 2, 3])
    root, log = tmp_path / f"random-{tag}", str(tmp_path / f"random-{tag}.log")
    for trial in range(trials):
        options = _random_options(rng, keep)
        size = "small"
        ctx = f"seed {BASE_SEED} random trial {trial}: {_repro(root, seed, 10**6, log, options, '', size)}"
        before = cw.read_log(log)
        pid = server.start(root=str(root), seed=seed, steps=10**6, log=log, options=options, size=size,
                           sleep=rng.choice([0.0, 0.001, 0.005]))
        # Wait until the run has started, then kill it at a random moment of its saving.
        deadline = time.monotonic() + 30
        while len(cw.read_log(log)["started"]) == len(before["started"]):
            assert time.monotonic() < deadline, f"{ctx}: never started\n{cw.stderr_of(log)}"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, 9)
        status = server.wait(pid)
        stats.trials += 1
        assert status == -9, f"{ctx}: ended by itself ({status})\n{cw.stderr_of(log)}"
        stats.kills += 1
        cw.check_after_kill(str(root), seed, log, keep, size, stats, ctx)
    return root


def test_random_kills_of_a_training_process(server, tmp_path):
    stats = cw.Stats()
    root = random_kill_trials(server, tmp_path, DEFAULT_RANDOM_KILLS, stats, "ci")
    print(stats.line("random kills"))
    assert stats.bytes_lost == 0
    assert stats.steps_checked >= 1
    proc = _verify_cli(root)
    assert proc.returncode == 0 and "COMPLETE" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.soak
def test_soak_random_kills(server, tmp_path):
    stats = cw.Stats()
    root = random_kill_trials(server, tmp_path, SOAK_TRIALS, stats, "soak")
    print(stats.line("soak random kills"))
    assert stats.bytes_lost == 0
    assert _verify_cli(root).returncode == 0


@pytest.mark.soak
@pytest.mark.parametrize("point", faults.POINTS)
def test_soak_fault_points(server, tmp_path, point):
    stats = cw.Stats()
    for trial in range(max(1, SOAK_TRIALS // len(faults.POINTS))):
        fault_trial(server, tmp_path, point, 1000 + trial, stats)
    print(stats.line(f"soak fault {point}"))
    assert stats.bytes_lost == 0
