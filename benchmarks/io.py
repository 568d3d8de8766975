"""IO throughput of async_ckpt against the tools people use today, with the disk as the ceiling.

    python -m benchmarks.io [--size 1GiB] [--repeat 5] [--quick] [--out DIR] [--dir SCRATCH]
                            [--states fp32_large,...] [--threads N]

For each state (large fp32 tensors, a small transformer with AdamW state after a few training
steps, 20,000 small tensors, bf16 weights), every repetition runs every contender once, in
round-robin order (the start rotates each repetition so drift hits all of them evenly):

  ceilings  memcpy of the state into a preallocated buffer (snapshot floor); raw sequential
            write + fsync (buffered, O_DIRECT, O_DIRECT multi-threaded; the best median is the
            ceiling); raw sequential read of that file with a cold cache
  peers     torch.save / torch.load, safetensors save_file / load_file, DCP save / load,
            DCP async_save (blocking part, and total), tensorstore zarr3 raw and zstd
  ours      save_async stall and time to committed for compression none / zstd / auto,
            save and restore through the TensorStore kvstore backend (file driver),
            save (blocking), restore for each mode, verify (every CRC)

Every write is fsync'd inside its timing; before every timed read the files are fsync'd,
dropped with POSIX_FADV_DONTNEED, and /proc/sys/vm/drop_caches is written when allowed.
Before every contender and every timed read, free memory of the state's size is faulted in
on huge pages and freed (``_ceilings.back_free_memory``): under a hypervisor that takes back
free memory (the dev VM), a cold read after a pause otherwise ran 3x slower.
Writes ``io.md`` (table), ``io.json`` and ``io.png`` (chart) in ``--out`` and prints the
table. ``--quick`` (tiny sizes, one repetition) is the CI smoke test: it checks that every
row is produced, not how fast.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from benchmarks.bench_native import parse_size

from . import _ceilings, _report
from ._ceilings import DiskCeilings, MemcpyFloor, can_drop_caches
from ._ours import MODES, Ours
from ._peers import PEERS
from ._states import STATE_NAMES, BenchState, build_states, large_fp32

ROW_IDS = _report.ROW_IDS
BAR_STATE = "fp32_large"


# ----------------------------------------------------------------------------- progress

class Bar:
    """Step-counting progress bar on stderr; one plain line per step when stderr is not a TTY."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done = total, 0
        self.tty = sys.stderr.isatty()
        self.enabled = enabled
        self.start = time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        width = 30
        fill = int(width * self.done / max(1, self.total))
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                f"{elapsed:5.0f}s eta {eta:4.0f}s  {what}")
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------- machine

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def disk_of(path: Path) -> str:
    """'<device> (<fs>, <ssd|hdd>, <model>) mounted at <mount>' for the file system holding ``path``."""
    path = Path(path).resolve()
    best = ("?", "", "?")
    for line in _read("/proc/mounts").splitlines():
        dev, mnt, fs = line.split()[:3]
        if (str(path) + "/").startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[1]):
            best = (dev, mnt, fs)
    dev, mnt, fs = best
    name = os.path.basename(os.path.realpath(dev)) if dev.startswith("/dev/") else dev
    base = name
    while base and not os.path.isdir(f"/sys/block/{base}") and base[-1].isdigit():
        base = base[:-1]
    rot = _read(f"/sys/block/{base}/queue/rotational").strip()
    model = _read(f"/sys/block/{base}/device/model").strip() or _read(f"/sys/block/{base}/device/vendor").strip()
    kind = {"0": "non-rotational", "1": "rotational"}.get(rot, "?")
    extra = ", ".join(x for x in (fs, kind, model) if x)
    return f"{dev} ({extra}) at {mnt}"


def machine(scratch: Path) -> dict[str, Any]:
    from importlib import metadata

    cpu = "?"
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    ram = 0.0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            ram = int(line.split()[1]) / 2**20
    pkgs = {}
    for p in ("torch", "numpy", "safetensors", "tensorstore", "zstandard"):
        try:
            pkgs[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pkgs[p] = "missing"
    try:
        from async_ckpt import native
        zstd = native.zstd_backend()
    except Exception as e:   # reported, not fatal
        zstd = f"unavailable ({e})"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "kernel": f"Linux {platform.release()}",
            "disk": disk_of(scratch), "python": platform.python_version(), "packages": pkgs, "zstd": zstd}


def git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent.parent, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


# ----------------------------------------------------------------------------- one state

Method = tuple[str, Callable[[], dict[str, float]]]


def methods_for(st: BenchState, scratch: Path, floor: MemcpyFloor, disk: DiskCeilings, ours: Ours) -> list[Method]:
    counter = [0]

    def peer(fn):
        def run() -> dict[str, float]:
            counter[0] += 1
            folder = scratch / f"peer-{counter[0]}"
            try:
                return fn(st, folder)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        return run

    methods: list[Method] = [("memcpy floor", lambda: {"memcpy": floor.run()}),
                             ("raw disk", lambda: {f"raw_{k}": v for k, v in disk.write_read().items()})]
    methods += [(name, peer(fn)) for name, fn in PEERS.items()]
    methods += [(f"ours {mode}", (lambda m=mode: ours.run_async(m))) for mode in MODES]
    methods.append(("ours save", ours.run_blocking))
    methods.append(("ours kvstore", ours.run_kvstore))
    return methods


def run_state(st: BenchState, repeat: int, scratch: Path, threads: int | None, bar: Bar,
              settle: bool = True) -> tuple[dict[str, list[float]], dict[str, list[int]], dict[str, float]]:
    samples: dict[str, list[float]] = {}
    stored: dict[str, list[int]] = {}
    wall: dict[str, float] = {}
    t0 = time.monotonic()
    floor = MemcpyFloor(list(st.flat.values()))
    disk = DiskCeilings(st.nbytes, scratch / "raw", threads or _default_threads())
    ours = Ours(st, scratch / "ours", threads)
    wall["setup"] = time.monotonic() - t0
    try:
        methods = methods_for(st, scratch, floor, disk, ours)
        for rep in range(repeat):
            order = methods[rep % len(methods):] + methods[:rep % len(methods)]
            for name, fn in order:
                if settle:
                    gc.collect()
                    os.sync()       # earlier writeback and deletes must not land inside this timing
                    # A write's page cache (peers write through it) from backed memory too.
                    _ceilings.back_free_memory(st.nbytes)
                t0 = time.monotonic()
                result = fn()
                wall[name] = wall.get(name, 0.0) + time.monotonic() - t0
                for key, value in result.items():
                    if key.startswith("stored:"):
                        stored.setdefault(key[7:], []).append(int(value))
                    else:
                        samples.setdefault(key, []).append(float(value))
                bar.step(f"{st.name} rep {rep + 1}/{repeat}: {name}")
    finally:
        ours.close()
        del floor, disk
        shutil.rmtree(scratch, ignore_errors=True)
    return samples, stored, wall


def measure_rss(state: str, size: int, quick: bool, scratch: Path, snapshot: str) -> dict[str, Any] | None:
    """benchmarks._rss in a process of its own (its baseline is not this process's peers)."""
    cmd = [sys.executable, "-m", "benchmarks._rss", "--state", state, "--size", str(size), "--snapshot", snapshot,
           "--saves", "3" if quick else "20", "--dir", str(scratch)] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        print(f"memory measurement for {state} failed: {proc.stderr[-500:]}", file=sys.stderr)
        return None
    import json
    return json.loads(proc.stdout.strip().splitlines()[-1])


def object_store_section(size: int, repeat: int, scratch: Path | None) -> str:
    """``--s3``: benchmarks.bench_objectstore against a local moto S3 server (boto3 as that
    server's ceiling), in a process of its own, as one more section of the report."""
    cmd = [sys.executable, "-m", "benchmarks.bench_objectstore", "--s3", "--size", str(max(size // 4, 1 << 20)),
           "--repeat", str(repeat)] + (["--dir", str(scratch)] if scratch else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        return f"## Object store\n\n`{' '.join(cmd[1:])}` failed:\n\n```\n{proc.stderr[-2000:]}\n```"
    return (f"## Object store (local S3 server)\n\ncommand: `python {' '.join(cmd[1:])}`\n\n"
            + proc.stdout.strip())


def _default_threads() -> int:
    from async_ckpt import CheckpointManagerOptions
    return CheckpointManagerOptions(handle_sigterm=False).io_threads


def warm_up(scratch: Path) -> None:
    """Every peer once on a 1 MiB state (imports, thread pools), untimed."""
    st = large_fp32(1 << 20)
    for name, fn in PEERS.items():
        folder = scratch / f"warm-{name}"
        try:
            fn(st, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.io", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=None,
                   help="bytes of the large fp32 state (default 1GiB; the transformer state is 1/4 of it, "
                        "bf16 weights 1/2)")
    p.add_argument("--repeat", type=int, default=None, help="repetitions, median shown (default 5)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: the CI smoke test")
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for io.md, io.json, io.png")
    p.add_argument("--dir", type=Path, default=None,
                   help="scratch folder on the disk to measure (default: a new folder under $TMPDIR)")
    p.add_argument("--states", default=",".join(STATE_NAMES), help="comma-separated subset of " + ", ".join(STATE_NAMES))
    p.add_argument("--threads", type=int, default=None, help="async_ckpt io_threads (default: the library's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--s3", action="store_true",
                   help="also our s3:// backend against boto3 on a local moto S3 server (needs moto[server], boto3)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    size = args.size or ((8 << 20) if args.quick else (1 << 30))
    repeat = args.repeat or (1 if args.quick else 5)
    names = [s.strip() for s in args.states.split(",") if s.strip()]
    unknown = [n for n in names if n not in STATE_NAMES]
    if unknown:
        build_parser().error(f"unknown state(s) {unknown}; choose from {', '.join(STATE_NAMES)}")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    scratch_root = Path(tempfile.mkdtemp(prefix="async_ckpt-bench-", dir=args.dir))
    args.out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or _default_threads()
    _ceilings.PROC_DROP = not args.quick and can_drop_caches()
    argv_text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git_rev(),
        "machine": machine(scratch_root),
        "config": {"command": f"python -m benchmarks.io {argv_text}".strip(), "size": size, "repeat": repeat,
                   "quick": args.quick, "io_threads": threads, "chunk_mib": 32,
                   "cache_drop": "sync + fsync + POSIX_FADV_DONTNEED" + (" + drop_caches" if _ceilings.PROC_DROP else "")
                   + ", then the files' size of free memory faulted in on huge pages and freed",
                   "scratch": str(scratch_root)},
        "states": [],
    }
    factories = build_states(size, args.quick, names)
    methods_per_rep = 2 + len(PEERS) + len(MODES) + 2
    bar = Bar(len(factories) * repeat * methods_per_rep + 2 * len(factories), enabled=not args.no_progress)
    rows: list[_report.Row] = []
    t_start = time.monotonic()
    try:
        t0 = time.monotonic()
        warm_up(scratch_root)
        meta["warm_up_seconds"] = round(time.monotonic() - t0, 2)
        for name, factory in factories:
            t0 = time.monotonic()
            st = factory()
            build = time.monotonic() - t0
            bar.step(f"{name}: built ({st.nbytes / 2**20:.1f} MiB, {st.tensors} tensors)")
            meta["states"].append({"name": st.name, "title": st.title, "nbytes": st.nbytes, "tensors": st.tensors,
                                   "build_seconds": round(build, 2)})
            samples, stored, wall = run_state(st, repeat, scratch_root / name, args.threads, bar,
                                             settle=not args.quick)
            meta["states"][-1]["wall_seconds"] = {k: round(v, 2) for k, v in wall.items()}
            rows += _report.build_rows(st.name, st.nbytes, samples, stored)
            del st
            gc.collect()
            meta["states"][-1]["rss"] = [q for q in (measure_rss(name, size, args.quick, scratch_root, snapshot)
                                                     for snapshot in ("eager", "lazy")) if q]
            bar.step(f"{name}: memory over repeated saves")
    finally:
        bar.close()
        shutil.rmtree(scratch_root, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - t_start, 1)
    bar_list = _report.bars(rows, BAR_STATE, [s["name"] for s in meta["states"]])
    md = _report.markdown(rows, meta, bar_list)
    if args.s3:
        md += "\n\n" + object_store_section(size, repeat, args.dir)
    (args.out / "io.md").write_text(md + "\n")
    (args.out / "io.json").write_text(_report.to_json(rows, meta, bar_list) + "\n")
    _report.chart(rows, meta, args.out / "io.png")
    print(md)
    print(f"\nwrote {args.out / 'io.md'}, {args.out / 'io.json'}, {args.out / 'io.png'} "
          f"in {meta['seconds']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
