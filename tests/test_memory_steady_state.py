"""Repeated saves hold one copy of the state, eager and lazy.

Each case runs ``python -m benchmarks._rss`` in a process of its own (a clean RSS baseline):
20,000 small tensors saved 30 times with ``max_inflight_saves=1``. Memory that grew with
every save (a snapshot's plan, a staging buffer or writer scratch kept alive: per-tensor
records make such a leak megabytes per save on this state) would break the flatness
check; a second copy of the state would break the bound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("snapshot", ["eager", "lazy"])
def test_rss_over_repeated_saves_is_flat_and_at_most_one_state(tmp_path, snapshot):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "benchmarks._rss", "--state", "small_20k", "--saves", "30",
                           "--snapshot", snapshot, "--dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["snapshot"] == snapshot and got["saves"] == 30
    samples, state_mib = got["samples"], got["state_mib"]
    assert len(samples) == 6 and state_mib > 100
    # One copy of the state (the staging buffer) plus the allocator's and the writer's slack.
    assert got["over_mib"] <= state_mib + 256, got
    # Flat: after the first five saves nothing grows by more than a tenth of the state.
    assert max(samples[1:]) - samples[1] <= 0.1, got
    assert not list(tmp_path.iterdir()), "scratch files left behind"
