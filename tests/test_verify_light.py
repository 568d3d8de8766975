"""verify's CRC pass, verdicts and --json run without importing torch, and start quickly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys, time
t0 = time.perf_counter()
from async_ckpt.tools import verify, report
rep = verify.check_path(sys.argv[1])
doc = json.loads(report.to_json(rep))
print(json.dumps({"torch": "torch" in sys.modules, "verdict": rep.verdict, "seconds": time.perf_counter() - t0,
                  "kind": doc["kind"]}))
"""


def test_verify_never_imports_torch(tmp_path):
    model = torch.nn.Linear(64, 64)
    with CheckpointManager(tmp_path, CheckpointManagerOptions(handle_sigterm=False)) as mgr:
        mgr.save(1, {"model": model, "progress": {"step": 1}})
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for target in (tmp_path, tmp_path / "checkpoint-1"):
        out = subprocess.run([sys.executable, "-c", PROBE, str(target)], capture_output=True, text=True,
                             env=env, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        got = json.loads(out.stdout)
        assert got["torch"] is False and got["verdict"] == "PARTIAL", got
    cli = subprocess.run([sys.executable, "-m", "async_ckpt.verify", str(tmp_path / "checkpoint-1")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert "read in" in cli.stdout and cli.returncode == 1, cli.stdout
