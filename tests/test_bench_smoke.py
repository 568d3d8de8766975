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
    bar_names = {b["name"] for b in doc["bars"]}
    assert any("stall / memcpy" in n for n in bar_names)
    assert any("committed / raw disk" in n for n in bar_names)
    md = (out / "io.md").read_text()
    assert "| ours | save_async stall (none)" in md and "## Bars" in md
    assert (out / "io.png").stat().st_size > 10_000
    assert not list((tmp_path / "scratch").iterdir()), "scratch files left behind"
