"""Helpers shared by the native test modules."""

import os
import subprocess
import sys
import textwrap


def run_py(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this checkout's package."""
    env = dict(os.environ, **env_extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


def chunk_pieces_with_gaps(base: int, size: int, chunk_len: int, gaps) -> tuple[list, list[int]]:
    """Rows [address, length, offset in chunk, chunk] covering bytes [0, size) at ``base``, cut
    into chunks of ``chunk_len``, leaving out the single bytes at ``gaps``; and the chunk lengths."""
    gaps = sorted(set(int(g) for g in gaps))
    bounds = sorted(set([0, size] + list(range(0, size, chunk_len)) + gaps + [g + 1 for g in gaps]))
    gap_set = set(gaps)
    rows = [(base + a, b - a, a % chunk_len, a // chunk_len)
            for a, b in zip(bounds, bounds[1:]) if a not in gap_set]
    return rows, [min(chunk_len, size - s) for s in range(0, size, chunk_len)]
