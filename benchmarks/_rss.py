"""Steady-state memory of repeated saves, in a process of its own (a clean baseline).

    python -m benchmarks._rss --state transformer_adamw --size 1GiB --saves 20 [--snapshot lazy]

Builds the benchmark state, reads RSS, then calls ``save_async`` ``--saves`` times
(``--snapshot`` eager by default, ``max_inflight_saves=1``, default compression, keeping 2
steps) and samples RSS after every fifth commit. Prints one JSON object: the samples and
their last value as a multiple of the state's size above the baseline. ``benchmarks.io``
runs it once per state and snapshot mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from benchmarks.bench_native import parse_size


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks._rss")
    ap.add_argument("--state", required=True)
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--saves", type=int, default=20)
    ap.add_argument("--snapshot", choices=("eager", "lazy"), default="eager")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)

    from async_ckpt import CheckpointManager, CheckpointManagerOptions

    from ._states import build_states

    (_, factory), = build_states(args.size, args.quick, [args.state])
    st = factory()
    base = rss_bytes()
    samples: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-rss-", dir=args.dir) as d:
        opts = CheckpointManagerOptions(max_to_keep=2, max_inflight_saves=1, handle_sigterm=False,
                                        snapshot=args.snapshot)
        with CheckpointManager(d, opts) as mgr:
            for step in range(1, args.saves + 1):
                mgr.save_async(step, st.ours)
                if step % 5 == 0 or step == args.saves:
                    mgr.wait_until_finished()
                    samples.append((rss_bytes() - base) / st.nbytes)
    last = samples[-1] if samples else 0.0
    print(json.dumps({"saves": args.saves, "snapshot": args.snapshot, "state_mib": round(st.nbytes / 2**20, 1),
                      "samples": [round(x, 3) for x in samples], "over_state": round(last, 3),
                      "over_mib": round(last * st.nbytes / 2**20, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
