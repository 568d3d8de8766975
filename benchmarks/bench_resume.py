"""Resume downtime: each restore in a new process, as a restarted training job does it.

    python -m benchmarks.bench_resume [--size 1GiB] [--states transformer_adamw,small_20k]
                                      [--repeat 3] [--dir PATH] [--quick] [--fresh-optimizer]

``benchmarks.io`` restores in the process that saved, whose memory is already in use. A
resumed run is a new process: whatever memory a restore needs beyond the live tensors is
fresh, and fresh memory has to be faulted in (on the dev VM, first touch runs at about
2 GB/s, close to the disk). Here the parent saves each state once per format, then every
timed restore runs in a child that has imported torch and async_ckpt and built the live
state as ``benchmarks.io`` does (for the transformer: model and AdamW, moments included),
overwrites every live tensor with a byte pattern, drops the page cache for the files it
reads, and times the restore:

  ours (atomic)    ``CheckpointManager(folder)`` and its ``restore(state)`` (the default): a
                   resumed run opens a manager too (and keeps it: ``close`` is not timed)
  ours (atomic=False)  the same, decoding straight into the live tensors
  torch.load       ``torch.load(weights_only=True)``, then a copy into the live tensors
  safetensors      ``load_file``, then a copy into the live tensors
  raw read         our data files, read by one thread in 64 MiB preads into torch memory the
                   child touched first: a reference, not a ceiling (in new processes on the
                   dev VM it ran at 0.8-2.4 GB/s, at times below our two-threaded reader;
                   ``benchmarks.io`` owns the disk's ceiling)

The live tensors exist before the restore, as in ``benchmarks.io``. With
``--fresh-optimizer`` (the transformer only) the child builds the model and AdamW without
taking a step, as a resumed run does, so the optimizer has no moments until the restore
makes them: ``torch.load`` then goes through both ``load_state_dict`` calls, and
safetensors, which holds flat tensors only, is left out.
Methods take turns within each repetition, in a rotating order. Every restore's bytes are
checked against the saved state's (crc32c per tensor), and the overwritten state's against
them too, so a row cannot be fast by doing nothing or by being wrong. Prints, per state, the median, min - max, and the ratio to the raw read and to the
best peer (of torch.load and safetensors) with each repetition's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

METHODS = ("ours", "ours_direct", "torch_load", "safetensors", "raw_read")
TITLES = {"ours": "ours, restore (atomic)", "ours_direct": "ours, restore (atomic=False)",
          "torch_load": "torch.load + copy", "safetensors": "safetensors load_file + copy",
          "raw_read": "raw read, 1 thread (reference)"}
PEERS = ("torch_load", "safetensors")
FRESH_OPTIMIZER_TITLES = dict(TITLES, torch_load="torch.load + load_state_dict")
FRESH_OPTIMIZER_METHODS = ("ours", "ours_direct", "torch_load", "raw_read")
CHILD_TIMEOUT = 900


def _live(st) -> dict:
    """The state's tensors as its live objects hold them now, under dotted names: a restore
    may hand an optimizer new tensors for its moments (``load_state_dict``), and then
    ``st.flat`` still holds the old ones (or, into a fresh optimizer, none)."""
    from benchmarks._states import flatten
    return flatten({k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in st.ours.items()})


def _digest(flat: dict) -> dict[str, int]:
    """Every tensor's name and the crc32c of its bytes."""
    import torch

    from async_ckpt import native
    out = {}
    for name, t in flat.items():
        t = t.detach().contiguous().reshape(-1)
        out[name] = native.crc32c(t.view(torch.uint8).numpy()) if t.numel() else 0
    return out


def _paths(folder: Path) -> dict[str, Path]:
    return {"ours": folder / "ours", "torch": folder / "torch" / "state.pt",
            "safetensors": folder / "safetensors" / "model.safetensors"}


def _save_all(name: str, size: int, quick: bool, folder: Path) -> tuple[dict[str, int], int]:
    """Parent: build ``name`` once, write it in every format; its digest and raw bytes."""
    import torch
    from safetensors.torch import save_file

    from async_ckpt import CheckpointManager, CheckpointManagerOptions
    from benchmarks._ceilings import fsync_tree
    from benchmarks._states import build_states

    st = dict(build_states(size, quick, [name]))[name]()
    paths = _paths(folder)
    with CheckpointManager(paths["ours"], options=CheckpointManagerOptions(handle_sigterm=False)) as m:
        m.save(1, st.ours)
    for key in ("torch", "safetensors"):
        paths[key].parent.mkdir(parents=True)
    torch.save(st.tree, paths["torch"])
    save_file(st.flat, str(paths["safetensors"]))
    fsync_tree(folder)
    return _digest(_live(st)), st.nbytes


def _child(method: str, name: str, size: int, quick: bool, folder: Path, fresh_optimizer: bool = False) -> dict:
    """One timed restore in this (new) process; returns its seconds and the restored digest."""
    import torch

    from async_ckpt import CheckpointManager, CheckpointManagerOptions
    from benchmarks import _ceilings
    from benchmarks._ceilings import can_drop_caches, drop_caches, files_under
    from benchmarks._peers import copy_into
    from benchmarks._states import build_states, flatten
    from benchmarks.bench_native import ceiling_read

    st = dict(build_states(size, quick, [name], untrained=fresh_optimizer))[name]()
    # The states are built from fixed seeds: without this the live tensors would already
    # hold the saved bytes, and a restore that did nothing would pass the check.
    for t in st.flat.values():
        if t.numel():
            t.detach().reshape(-1).view(torch.uint8).fill_(0xA5)
    before = _digest(_live(st))
    paths = _paths(folder)
    opened: list = []
    run: Callable[[], None]
    if method in ("ours", "ours_direct"):
        files = files_under(paths["ours"])

        def run() -> None:
            # Closed after the timing: a resumed run keeps its manager open for the saves.
            m = CheckpointManager(paths["ours"], options=CheckpointManagerOptions(handle_sigterm=False))
            opened.append(m)
            if m.restore(st.ours, atomic=method == "ours") != 1:
                raise RuntimeError(f"no step 1 to restore in {paths['ours']}")
    elif method == "torch_load":
        files = [str(paths["torch"])]

        def run() -> None:
            loaded = torch.load(paths["torch"], weights_only=True)
            if fresh_optimizer:     # the optimizer has no moments to copy into yet
                for key, obj in st.ours.items():
                    obj.load_state_dict(loaded[key])
            else:
                copy_into(st, flatten(loaded))
    elif method == "safetensors":
        from safetensors.torch import load_file
        files = [str(paths["safetensors"])]

        def run() -> None:
            copy_into(st, load_file(str(paths["safetensors"])))
    else:
        data = [p for p in files_under(paths["ours"]) if os.path.basename(p).startswith("data-")]
        files = data
        # Memory like the live tensors': torch's, touched (the ceiling is the disk, not fresh pages).
        buffers = [torch.ones(os.path.getsize(p), dtype=torch.uint8).numpy() for p in data]

        def run() -> None:
            for p, b in zip(data, buffers):
                ceiling_read(p, b, False)
    _ceilings.PROC_DROP = not quick and can_drop_caches()
    drop_caches(files)
    t0 = time.perf_counter()
    try:
        run()
        seconds = time.perf_counter() - t0
    finally:
        for m in opened:
            m.close()
    if method == "raw_read":
        return {"seconds": seconds, "digest": None, "before": None}
    return {"seconds": seconds, "digest": _digest(_live(st)), "before": before}


def _run_child(method: str, name: str, args: argparse.Namespace, folder: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_resume", "--child", method, "--states", name,
           "--size", str(args.size), "--folder", str(folder)] + (["--quick"] if args.quick else [])
    if getattr(args, "fresh_optimizer", False):
        cmd.append("--fresh-optimizer")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{method} on {name} took over {CHILD_TIMEOUT} s (killed)") from None
    if proc.returncode:
        raise RuntimeError(f"{method} on {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _checked(method: str, name: str, got: dict, want: dict[str, int]) -> float:
    """The child's seconds, once its bytes are the saved ones (and were not before)."""
    if got["digest"] is not None:
        if got["before"] == want:
            raise RuntimeError(f"{method} on {name}: the live state held the saved bytes before the restore")
        if got["digest"] != want:
            raise RuntimeError(f"{method} restored other bytes than {name} saved")
    return got["seconds"]


def _ms(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 10 else f"{s:.1f} s"


def _table(name: str, nbytes: int, samples: dict[str, list[float]], titles: dict[str, str]) -> str:
    raw = samples["raw_read"]
    peers = [p for p in PEERS if p in samples]
    best_peer = [min(samples[p][k] for p in peers) for k in range(len(raw))]
    lines = [f"### {name} ({nbytes / 2**20:.0f} MiB)", "",
             "| method | median | min - max | GB/s | vs raw read | vs best peer (per repetition) |",
             "|---|---:|---:|---:|---:|---|"]
    for method in samples:
        v = samples[method]
        med = statistics.median(v)
        vs_raw = statistics.median(r / s for r, s in zip(raw, v))
        per = " ".join(f"{p / s:.2f}" for p, s in zip(best_peer, v))
        lines.append(f"| {titles[method]} | {_ms(med)} | {_ms(min(v))} - {_ms(max(v))} | "
                     f"{nbytes / med / 1e9:.2f} | {vs_raw:.2f} | "
                     f"{statistics.median(p / s for p, s in zip(best_peer, v)):.2f} ({per}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    from benchmarks._states import STATE_NAMES
    from benchmarks.bench_native import parse_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=None, help="default 1GiB, 8MiB with --quick")
    ap.add_argument("--states", default="transformer_adamw,small_20k,bf16_weights,fp32_large")
    ap.add_argument("--repeat", type=int, default=None, help="default 3, 1 with --quick")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir under the CWD)")
    ap.add_argument("--quick", action="store_true", help="tiny states (a smoke run)")
    ap.add_argument("--fresh-optimizer", action="store_true",
                    help="transformer_adamw only: restore into a model and AdamW that took no step yet")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size is None:
        args.size = (8 << 20) if args.quick else (1 << 30)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    names = [n for n in args.states.split(",") if n]
    unknown = sorted(set(names) - set(STATE_NAMES))
    if unknown:
        ap.error(f"unknown state(s) {unknown}; known: {', '.join(STATE_NAMES)}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.size < 1:
        ap.error("--size must be positive")
    if args.child and (not args.folder or len(names) != 1):
        ap.error("--child needs --folder and exactly one state")
    if args.fresh_optimizer and names != ["transformer_adamw"]:
        ap.error("--fresh-optimizer applies to --states transformer_adamw alone")
    methods = FRESH_OPTIMIZER_METHODS if args.fresh_optimizer else METHODS
    if args.child:
        print(json.dumps(_child(args.child, names[0], args.size, args.quick, Path(args.folder),
                                args.fresh_optimizer)))
        return

    root = Path(tempfile.mkdtemp(prefix="bench_resume-", dir=args.dir or os.getcwd()))
    try:
        for name in names:
            folder = root / name
            want, nbytes = _save_all(name, args.size, args.quick, folder)
            samples: dict[str, list[float]] = {m: [] for m in methods}
            for rep in range(args.repeat):
                order = methods[rep % len(methods):] + methods[:rep % len(methods)]
                for method in order:
                    seconds = _checked(method, name, _run_child(method, name, args, folder), want)
                    samples[method].append(seconds)
                    print(f"  {name} rep {rep + 1}/{args.repeat} {method}: {_ms(seconds)}",
                          file=sys.stderr, flush=True)
            if args.fresh_optimizer:
                table = _table(f"{name}, into a fresh optimizer", nbytes, samples, FRESH_OPTIMIZER_TITLES)
            else:
                table = _table(name, nbytes, samples, TITLES)
            print(table + "\n", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
