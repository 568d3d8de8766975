"""Smoke test of ``python -m benchmarks.bench_distributed --quick``: two ranks save one FSDP2
state with ours, DCP save and DCP async_save, restore it at 2 and at 3 ranks (every restore
checked exactly by the benchmark itself), and every row of the table is produced.

Speed is not checked (CI machines are noisy).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_two_ranks_produces_every_row(tmp_path):
    from benchmarks.bench_distributed import RESTORE_ROWS, ROWS

    out = tmp_path / "dist.md"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_distributed", "--quick", "--ranks", "2",
                           "--reshard", "3", "--dir", str(tmp_path / "scratch"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    md = out.read_text()
    for _, _, label, _ in ROWS:
        assert f"| 2 | stall | {label} |" in md or f"| 2 | to commit | {label} |" in md, label
    for world in (2, 3):
        for _, label, _ in RESTORE_ROWS:
            assert f"| 2 | restore at {world} | {label} |" in md, (world, label)
    doc = json.loads(out.with_suffix(".json").read_text())
    (res,) = doc["results"]
    assert res["world"] == 2 and [r["world"] for r in res["reshard"]] == [3]
    runs = res["save"] + res["restore"] + res["reshard"][0]["restore"]
    assert len(runs) == 3 and all(len(run) in (2, 3) for run in runs)
    assert all(math.isfinite(v) and v > 0 for run in runs for rank in run for v in rank.values())
    assert not list((tmp_path / "scratch").glob("saved-by-*")), "checkpoints left behind"
