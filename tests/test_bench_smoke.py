"""Smoke test of ``python -m benchmarks.io --quick``: every row of every state is produced.

Speed is not checked (CI machines are noisy); only that the benchmark runs end to end and
writes its table, JSON and chart.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("safetensors")
pytest.importorskip("tensorstore")
pytest.importorskip("matplotlib")


def test_quick_produces_every_row(tmp_path):
    from benchmarks._report import ROW_IDS
    from benchmarks._states import STATE_NAMES

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.io", "--quick", "--no-progress",
                           "--out", str(out), "--dir", str(tmp_path / "scratch")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((out / "io.json").read_text())
    assert [s["name"] for s in doc["meta"]["states"]] == list(STATE_NAMES)
    seen = {(r["state"], r["id"]): r for r in doc["rows"]}
    missing = [(s, rid) for s in STATE_NAMES for rid in ROW_IDS if (s, rid) not in seen]
    assert not missing, missing
    for r in doc["rows"]:
        assert r["seconds"] is not None and math.isfinite(r["seconds"]) and r["seconds"] > 0, r
        assert len(r["samples"]) == 1
    for st in doc["meta"]["states"]:      # memory over repeated saves, both snapshot modes
        assert [q["snapshot"] for q in st["rss"]] == ["eager", "lazy"], st
    bar_names = {b["name"] for b in doc["bars"]}
    assert any("stall / memcpy" in n for n in bar_names)
    assert any("committed / raw disk" in n for n in bar_names)
    md = (out / "io.md").read_text()
    assert "| ours | save_async stall (none)" in md and "## Bars" in md
    assert md.count("lazy `save_async` calls (max_inflight_saves=1)") == len(STATE_NAMES)
    assert (out / "io.png").stat().st_size > 10_000
    assert not list((tmp_path / "scratch").iterdir()), "scratch files left behind"


def test_resume_benchmark_restores_in_new_processes_and_checks_the_bytes(tmp_path):
    """``benchmarks.bench_resume --quick``: every method runs in a child process of its own and
    restores the saved bytes (a child that restored other bytes fails the run)."""
    from benchmarks.bench_resume import METHODS, TITLES

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_resume", "--quick",
                           "--states", "transformer_adamw", "--dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "ms |" in line]
    assert [r.split(" | ")[0][2:] for r in rows] == [TITLES[m] for m in METHODS]
    assert proc.stderr.count("transformer_adamw rep 1/1") == len(METHODS)
    assert not list(tmp_path.iterdir()), "scratch files left behind"


def test_resume_benchmark_into_a_fresh_optimizer(tmp_path):
    """``--fresh-optimizer``: the children build a model and AdamW that took no step, and
    every restore must create the optimizer's moments with the saved bytes."""
    from benchmarks.bench_resume import FRESH_OPTIMIZER_METHODS, FRESH_OPTIMIZER_TITLES

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_resume", "--quick", "--fresh-optimizer",
                           "--states", "transformer_adamw", "--dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "### transformer_adamw, into a fresh optimizer" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "ms |" in line]
    assert [r.split(" | ")[0][2:] for r in rows] == [FRESH_OPTIMIZER_TITLES[m] for m in FRESH_OPTIMIZER_METHODS]
    bad = subprocess.run([sys.executable, "-m", "benchmarks.bench_resume", "--quick", "--fresh-optimizer",
                          "--states", "small_20k"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "applies to --states transformer_adamw alone" in bad.stderr


def test_resume_benchmark_refuses_restores_that_did_nothing_or_restored_other_bytes(tmp_path):
    """The byte check can fail: children run as the benchmark runs them (a process each)."""
    import argparse
    import shutil

    import torch

    from benchmarks import bench_resume
    from benchmarks._states import flatten

    name, folder = "transformer_adamw", tmp_path / "transformer_adamw"
    want, _ = bench_resume._save_all(name, 1 << 20, True, folder)
    args = argparse.Namespace(size=1 << 20, quick=True)
    got = bench_resume._run_child("torch_load", name, args, folder)
    assert got["before"] != want            # the live state was overwritten before the restore
    assert bench_resume._checked("torch_load", name, got, want) == got["seconds"]

    state = torch.load(folder / "torch" / "state.pt", weights_only=True)
    next(t for t in flatten(state).values() if t.numel()).add_(1)
    torch.save(state, folder / "torch" / "state.pt")
    got = bench_resume._run_child("torch_load", name, args, folder)
    with pytest.raises(RuntimeError, match="restored other bytes"):
        bench_resume._checked("torch_load", name, got, want)

    with pytest.raises(RuntimeError, match="held the saved bytes"):
        bench_resume._checked("ours", name, {"seconds": 1.0, "digest": want, "before": want}, want)

    shutil.rmtree(folder / "ours")          # nothing to restore: the child fails, the run stops
    with pytest.raises(RuntimeError, match="no step 1 to restore"):
        bench_resume._run_child("ours", name, args, folder)
