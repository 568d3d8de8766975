"""Several ranks saving one FSDP2 state: our collective save against torch.distributed.checkpoint.

    python -m benchmarks.bench_distributed [--ranks 2 4] [--size 384MiB] [--repeat 5] [--reshard 3]
                                           [--compression none] [--dir SCRATCH] [--out FILE.md] [--quick]

The state: a stack of ``Linear(d, d)`` layers and a LayerNorm, each ``fully_shard``-ed on a
1-D CPU mesh of N ranks (gloo), and its AdamW after one step; parameters and both moments
are DTensors with ``Shard(0)``. ``--size`` is the whole state (parameters + moments), so each
rank holds about size / N. For each N in ``--ranks`` the script launches N processes (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, as torchrun would), and each repetition runs every
save contender once, in an order that rotates each repetition:

  ours            CheckpointManager.save_async(step, {"model", "optimizer"}): the stall (until
                  it returns) and the time until the handle reports the commit
  DCP save        get_state_dict + torch.distributed.checkpoint.save (blocks for all of it)
  DCP async_save  get_state_dict + async_save: the blocking part, and until its future is done

then every restore contender, in place, with the page cache dropped before each:

  ours            CheckpointManager.restore({"model", "optimizer"})
  DCP load        get_state_dict + torch.distributed.checkpoint.load + set_state_dict

at N ranks and, in a second launch of ``--reshard`` ranks, from the checkpoints that N ranks
wrote (a different sharding; 3 makes the shards uneven). DCP gets a gloo process group of its
own (``dist.new_group(backend="gloo")``), as its docs ask for async_save on CPU. Every write is
durable inside its timing: ours fsyncs its files and directories before the commit; DCP fsyncs
its files, and rank 0 fsyncs the checkpoint's files and directories after DCP returns. After
each restore an exact, position-weighted checksum of every parameter and moment (integer sums
modulo 2^64, the same under any sharding) must equal the saved state's, or the run fails.

Per run, each rank times itself; a row's figure is the slowest rank's (a training step waits
for it), "fastest rank" shows the spread. The table gives medians over the repetitions, the
range of the slowest-rank times, and for peers the median of the per-repetition ratios
peer / ours (above 1: ours is faster). One untimed round of every contender comes first (our
staging buffer, DCP's plans). ``--quick`` is the smoke test: a tiny state, one repetition,
N = 2 restoring at 3; it checks that every row is produced, not how fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]

SAVE_KEYS = ("ours_stall", "ours_commit", "dcp_save", "dcp_async_stall", "dcp_async_done")
RESTORE_KEYS = ("ours_restore", "dcp_load")

# (section, key, label, key of ours to compare with)
ROWS = (
    ("stall", "ours_stall", "ours: save_async returns", None),
    ("stall", "dcp_async_stall", "DCP async_save: blocking part", "ours_stall"),
    ("stall", "dcp_save", "DCP save (blocks for the whole save)", "ours_stall"),
    ("to commit", "ours_commit", "ours: save_async → committed", None),
    ("to commit", "dcp_save", "DCP save (+ dir fsync)", "ours_commit"),
    ("to commit", "dcp_async_done", "DCP async_save → done (+ dir fsync)", "ours_commit"),
)
RESTORE_ROWS = (
    ("ours_restore", "ours: restore in place", None),
    ("dcp_load", "DCP load + set_state_dict", "ours_restore"),
)


# ----------------------------------------------------------------------------- the state

def layout_for(size: int) -> tuple[int, int]:
    """(d, layers) so that Linear(d, d) layers + AdamW moments come to about ``size`` bytes."""
    d = 2048 if size >= (192 << 20) else 512 if size >= (24 << 20) else 128
    per_layer = 3 * 4 * (d * d + d)
    return d, max(1, round(size / per_layer))


def build_state(d: int, layers: int):
    """The FSDP2 model and its AdamW after one step (the same values on any world size)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(d, d) for _ in range(layers)], torch.nn.LayerNorm(d))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, d, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def tensors_of(model, opt) -> list[tuple[str, Any]]:
    """Every parameter and DTensor moment, by name."""
    from torch.distributed.tensor import DTensor

    names = {p: n for n, p in model.named_parameters()}
    out = [(n, p) for n, p in model.named_parameters()]
    for p, st in opt.state.items():
        out.extend((f"{names[p]}.{k}", v) for k, v in st.items() if isinstance(v, DTensor))
    return out


def checksums(model, opt) -> dict[str, int]:
    """Per tensor, sum(bits32[i] * (i + 1)) over its global flat index i, modulo 2^64: exact
    and independent of the sharding (each rank adds its local shard's terms; all-reduced)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    items = tensors_of(model, opt)
    sums = torch.zeros(len(items), dtype=torch.int64)
    for j, (name, t) in enumerate(items):
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        if any(offset[1:]):
            raise RuntimeError(f"{name}: only row shards are checked, got offset {offset}")
        base = offset[0] * math.prod(t.shape[1:]) if t.dim() else 0
        bits = t.to_local().detach().contiguous().reshape(-1).view(torch.int32).to(torch.int64)
        index = torch.arange(base + 1, base + 1 + bits.numel(), dtype=torch.int64)
        sums[j] = (bits * index).sum()
    dist.all_reduce(sums)
    return {name: int(s) for (name, _), s in zip(items, sums)}


def zero_state(model, opt) -> None:
    import torch

    with torch.no_grad():
        for _, t in tensors_of(model, opt):
            t.to_local().zero_()


def state_bytes(model, opt) -> int:
    return sum(t.numel() * t.element_size() for _, t in tensors_of(model, opt))


# ----------------------------------------------------------------------------- one rank

class Rank:
    """What every contender needs on one rank: the state, the groups, the scratch root."""

    def __init__(self, args) -> None:
        import torch.distributed as dist

        from async_ckpt import CheckpointManager, CheckpointManagerOptions

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.model, self.opt = build_state(args.d, args.layers)
        self.dcp_group = dist.new_group(backend="gloo")
        self.root = Path(args.root)
        threads = {"io_threads": args.io_threads} if args.io_threads else {}
        options = CheckpointManagerOptions(max_to_keep=None, handle_sigterm=False, **threads,
                                           compression=None if args.compression == "none" else args.compression)
        self.mgr = CheckpointManager(self.root / "ours", options)

    def sd(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def durable(self, path: Path) -> None:
        """Rank 0 fsyncs the DCP checkpoint's files and directories (inside the timing)."""
        from benchmarks._ceilings import fsync_tree

        if self.rank == 0:
            fsync_tree(path)

    def settle(self) -> None:
        """Untimed: flush other dirty pages, then start every rank together."""
        import torch.distributed as dist

        if self.rank == 0:
            os.sync()
        dist.barrier()

    def cold(self) -> None:
        """Untimed: evict every checkpoint file from the page cache."""
        import torch.distributed as dist

        from benchmarks._ceilings import drop_caches, files_under

        if self.rank == 0:
            drop_caches(files_under(self.root))
        dist.barrier()

    # ------------------------------------------------------------------ save contenders

    def ours(self, step: int) -> dict[str, float]:
        state = {"model": self.model, "optimizer": self.opt}
        t0 = time.perf_counter()
        handle = self.mgr.save_async(step, state, force=True)
        stall = time.perf_counter() - t0
        handle.result()
        return {"ours_stall": stall, "ours_commit": time.perf_counter() - t0}

    def dcp_save(self, path: Path) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        dcp.save(self.sd(), checkpoint_id=str(path), process_group=self.dcp_group)
        self.durable(path)
        return {"dcp_save": time.perf_counter() - t0}

    def dcp_async(self, path: Path) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        future = dcp.async_save(self.sd(), checkpoint_id=str(path), process_group=self.dcp_group)
        stall = time.perf_counter() - t0
        future.result()
        self.durable(path)
        return {"dcp_async_stall": stall, "dcp_async_done": time.perf_counter() - t0}

    # ------------------------------------------------------------------ restore contenders

    def ours_restore(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        got = self.mgr.restore({"model": self.model, "optimizer": self.opt}, step)
        seconds = time.perf_counter() - t0
        assert got == step, got
        return {"ours_restore": seconds}

    def dcp_load(self, path: Path) -> dict[str, float]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        t0 = time.perf_counter()
        sd = self.sd()
        dcp.load(sd, checkpoint_id=str(path), process_group=self.dcp_group)
        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        return {"dcp_load": time.perf_counter() - t0}

    def remove(self, path: Path) -> None:
        import torch.distributed as dist

        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()


def gather(rank: Rank, times: dict[str, float], keys: tuple[str, ...]) -> list[dict[str, float]]:
    """Every rank's ``times`` (rank order), on every rank."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor([times.get(k, math.nan) for k in keys], dtype=torch.float64)
    parts = [torch.empty_like(mine) for _ in range(rank.world)]
    dist.all_gather(parts, mine)
    return [{k: float(v) for k, v in zip(keys, p.tolist()) if not math.isnan(v)} for p in parts]


def restore_round(r: Rank, step: int, dcp_path: Path, want: dict[str, int], order: int) -> dict[str, float]:
    """One timed restore by each contender (rotated by ``order``), each checked exactly."""
    contenders: list[tuple[str, Callable[[Any], dict[str, float]], Any]] = [
        ("ours", r.ours_restore, step), ("dcp", r.dcp_load, dcp_path)]
    times: dict[str, float] = {}
    for i in range(len(contenders)):
        name, fn, arg = contenders[(i + order) % len(contenders)]
        zero_state(r.model, r.opt)
        r.cold()
        times.update(fn(arg))
        got = checksums(r.model, r.opt)
        if got != want:
            bad = sorted(k for k in want if got.get(k) != want[k])
            raise RuntimeError(f"{name} restored different bytes at {r.world} ranks: {bad[:5]}")
    return times


def run_save_phase(args) -> dict[str, Any]:
    r = Rank(args)
    want = checksums(r.model, r.opt)
    out: dict[str, Any] = {"world": r.world, "state_bytes": state_bytes(r.model, r.opt), "checksums": want,
                           "save": [], "restore": []}
    kept: dict[str, Any] = {}
    for step, rep in enumerate(range(-1, args.repeat), start=1):      # rep -1: the untimed warm-up round
        paths = {"dcp": r.root / f"dcp-{step}", "dcp_async": r.root / f"dcp-async-{step}"}
        contenders: list[tuple[Callable[[Any], dict[str, float]], Any]] = [
            (r.ours, step), (r.dcp_save, paths["dcp"]), (r.dcp_async, paths["dcp_async"])]
        times: dict[str, float] = {}
        for i in range(len(contenders)):
            fn, arg = contenders[(i + max(rep, 0)) % len(contenders)]
            r.settle()
            times.update(fn(arg))
        per_rank = gather(r, times, SAVE_KEYS)
        if rep >= 0:
            out["save"].append(per_rank)
        # Keep the last round's checkpoints for the restores; delete the others (untimed).
        if kept:
            r.mgr.delete(kept["step"])
            r.remove(kept["dcp"])
        r.remove(paths["dcp_async"])
        kept = {"step": step, "dcp": paths["dcp"]}
    for rep in range(args.repeat):
        out["restore"].append(gather(r, restore_round(r, kept["step"], kept["dcp"], want, rep), RESTORE_KEYS))
    out["kept"] = {"step": kept["step"], "dcp": str(kept["dcp"])}
    r.mgr.close()
    return out


def run_restore_phase(args) -> dict[str, Any]:
    saved = json.loads(Path(args.saved).read_text())
    r = Rank(args)
    out: dict[str, Any] = {"world": r.world, "restore": []}
    want = {k: int(v) for k, v in saved["checksums"].items()}
    step, dcp_path = saved["kept"]["step"], Path(saved["kept"]["dcp"])
    for rep in range(args.repeat):
        out["restore"].append(gather(r, restore_round(r, step, dcp_path, want, rep), RESTORE_KEYS))
    r.mgr.close()
    return out


def worker(args) -> int:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")      # DCP's and ours' notes on world-size changes, FSDP's on gloo
    dist.init_process_group("gloo")
    try:
        out = (run_save_phase if args.worker == "save" else run_restore_phase)(args)
        if dist.get_rank() == 0:
            Path(args.result).write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- launcher

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, argv: list[str], timeout: float) -> None:
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.bench_distributed", *argv], env=env,
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise
    for rank, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode != 0:
            raise SystemExit(f"rank {rank} of {world} exited with {p.returncode}:\n{log[-4000:]}")


def fmt_s(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


def summarize(runs: list[list[dict[str, float]]], key: str, base: Optional[str]) -> dict[str, Any]:
    """Median of the slowest rank, median of the fastest, range, and peer/ours per-run ratios."""
    slow = [max(rank[key] for rank in run) for run in runs]
    fast = [min(rank[key] for rank in run) for run in runs]
    out = {"median": statistics.median(slow), "fastest": statistics.median(fast),
           "min": min(slow), "max": max(slow), "samples": slow}
    if base is not None:
        ours = [max(rank[base] for rank in run) for run in runs]
        out["ratio"] = statistics.median(s / o for s, o in zip(slow, ours))
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines = [("| ranks | what | method | slowest rank (median) | fastest rank | runs (min – max) | GB/s "
              "| peer / ours (per-run, median) |"),
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]

    def row(n: int, what: str, label: str, s: dict[str, Any], nbytes: int) -> None:
        ratio = f"{s['ratio']:.2f}" if "ratio" in s else ""
        lines.append(f"| {n} | {what} | {label} | {fmt_s(s['median'])} | {fmt_s(s['fastest'])} | "
                     f"{fmt_s(s['min'])} – {fmt_s(s['max'])} | {nbytes / s['median'] / 1e9:.2f} | {ratio} |")

    for res in results:
        n, nbytes = res["world"], res["state_bytes"]
        for what, key, label, base in ROWS:
            row(n, what, label, summarize(res["save"], key, base), nbytes)
        for m, runs in [(n, res["restore"])] + [(rs["world"], rs["restore"]) for rs in res["reshard"]]:
            for key, label, base in RESTORE_ROWS:
                row(n, f"restore at {m}", label, summarize(runs, key, base), nbytes)
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    from benchmarks.bench_native import parse_size

    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", help="world sizes that save (default: 2 4; --quick: 2)")
    p.add_argument("--size", type=parse_size,
                   help="parameters + AdamW moments, all ranks together (default: 384MiB; --quick: 2MiB)")
    p.add_argument("--repeat", type=int, help="timed repetitions (default: 5; --quick: 1)")
    p.add_argument("--reshard", type=int, default=3,
                   help="world size that restores the checkpoints of each N (default: %(default)s)")
    p.add_argument("--compression", choices=["none", "zstd", "auto"], default="none",
                   help="ours (DCP writes raw bytes; default: %(default)s)")
    p.add_argument("--io-threads", type=int, default=0,
                   help="ours, per rank (default: the library's default, for each rank)")
    p.add_argument("--dir", help="scratch folder (default: a temporary folder, removed afterwards)")
    p.add_argument("--out", help="also write the table here (and the samples as JSON beside it)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny state, one repetition, N = 2")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per launch before it is killed")
    # One rank (set by the launcher):
    p.add_argument("--worker", choices=["save", "restore"], help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--saved", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        if args.quick:
            import benchmarks._ceilings as ceilings
            ceilings.PROC_DROP = False
        return worker(args)

    args.ranks = args.ranks or ([2] if args.quick else [2, 4])
    args.size = args.size or (2 << 20 if args.quick else 384 << 20)
    args.repeat = args.repeat or (1 if args.quick else 5)
    d, layers = layout_for(args.size)
    scratch = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_distributed-"))
    scratch.mkdir(parents=True, exist_ok=True)
    common = ["--d", str(d), "--layers", str(layers), "--repeat", str(args.repeat),
              "--compression", args.compression, "--io-threads", str(args.io_threads)] + (
                  ["--quick"] if args.quick else [])
    results = []
    t0 = time.perf_counter()
    try:
        for n in args.ranks:
            root = scratch / f"saved-by-{n}"
            shutil.rmtree(root, ignore_errors=True)
            saved = scratch / f"save-{n}.json"
            print(f"{n} ranks: saving and restoring ({args.repeat} runs)...", file=sys.stderr, flush=True)
            launch(n, ["--worker", "save", "--root", str(root), "--result", str(saved), *common], args.timeout)
            res = json.loads(saved.read_text())
            res["reshard"] = []
            if args.reshard and args.reshard != n:
                print(f"{args.reshard} ranks: restoring what {n} saved...", file=sys.stderr, flush=True)
                out = scratch / f"restore-{n}-at-{args.reshard}.json"
                launch(args.reshard, ["--worker", "restore", "--root", str(root), "--saved", str(saved),
                                      "--result", str(out), *common], args.timeout)
                res["reshard"].append(json.loads(out.read_text()))
            results.append(res)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(scratch, ignore_errors=True)

    import torch

    mib = results[0]["state_bytes"] / 2 ** 20 if results else 0
    head = (f"FSDP2 ({layers} x Linear({d}, {d}) + LayerNorm) + AdamW: {mib:.1f} MiB of parameters and moments "
            f"over all ranks; {args.repeat} run(s), interleaved; gloo on CPU; ours with compression="
            f"{args.compression}, io_threads {args.io_threads or 'default'} per rank; torch {torch.__version__}, "
            f"{os.cpu_count()} CPUs, {platform.machine()}; {time.perf_counter() - t0:.0f} s in all.\n\n"
            f"`python -m benchmarks.bench_distributed {shlex.join(sys.argv[1:] if argv is None else argv)}`\n")
    text = head + "\n" + table(results) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(
            {"d": d, "layers": layers, "repeat": args.repeat, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
