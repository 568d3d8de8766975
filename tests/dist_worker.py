"""One rank of a multi-rank test run (launched by tests/test_distributed.py with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, gloo on the CPU).

    python tests/dist_worker.py ddp --root R --steps N --out OUT [--save-every K] [--crash-at S]
    python tests/dist_worker.py fsdp --root R --steps N --out OUT [--save-at S] [--restore]
    python tests/dist_worker.py fail --root R --out OUT --mode raise|kill [--timeout T]

Each rank writes ``OUT.rank<r>.json``: losses per step and, at the end, hex digests of
every parameter and optimizer moment (bitwise comparison across runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from async_ckpt import CheckpointManager, CheckpointManagerOptions, ResumableSampler  # noqa: E402

DIM, N_SAMPLES, GLOBAL_BATCH = 16, 96, 12


def digest(t: torch.Tensor) -> str:
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def dataset():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, DIM, generator=g)
    y = (x @ torch.randn(DIM, 1, generator=g)).squeeze(1) + 0.1 * torch.randn(N_SAMPLES, generator=g)
    return x, y


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(32, 1))


def opts(**kw) -> CheckpointManagerOptions:
    return CheckpointManagerOptions(handle_sigterm=False, io_threads=2, max_to_keep=None,
                                    chunk_bytes=1 << 16, **kw)


def run_ddp(args) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = dataset()
    model = DDP(make_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sampler = ResumableSampler(N_SAMPLES, seed=7)
    progress = {"step": 0}
    state = {"model": model, "optimizer": opt, "data": sampler, "progress": progress}
    torch.manual_seed(100 + rank)           # per-rank dropout streams
    losses = {}
    with CheckpointManager(args.root, opts(collective_timeout_s=args.timeout)) as mgr:
        start = mgr.restore(state)
        first = 1 if start is None else progress["step"] + 1
        for step in range(first, args.steps + 1):
            idx = sampler.next_batch_for(GLOBAL_BATCH, rank, world)
            loss = torch.nn.functional.mse_loss(model(x[idx]).squeeze(1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[step] = loss.item()
            progress["step"] = step
            if args.save_every and step % args.save_every == 0:
                mgr.save(step, state)
                if step == args.crash_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        sizes = {"stored": None}
        if args.report_bytes and mgr.latest_step() is not None:
            res = mgr.save(args.steps + 1, state, force=True)
            sizes["stored"] = res.stored_bytes
    return {"losses": losses, "params": {k: digest(v) for k, v in model.module.state_dict().items()},
            "moments": {f"{i}.{k}": digest(v) for i, s in opt.state.items() for k, v in s.items()
                        if torch.is_tensor(v)}, **sizes}


def run_fail(args) -> dict:
    """Step 1 commits; at step 2 rank 1 raises ENOSPC (``--how raise``) or is SIGKILLed
    inside the write (``--how kill``, via ASYNC_CKPT_FAULT set for rank 1 only)."""
    import errno
    import time

    from async_ckpt import CheckpointError, SaveError
    from async_ckpt.storage.native_files import NativeStorage

    rank = dist.get_rank()

    class Full(NativeStorage):
        def write_rank(self, location, request):
            if rank == 1 and request.step == 2 and args.how == "raise":
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return super().write_rank(location, request)

    state = {"t": torch.full((1000,), float(rank))}
    out: dict = {}
    mgr = CheckpointManager(args.root, opts(collective_timeout_s=args.timeout), storage=Full(io_threads=2))
    mgr.save(1, state)
    t0 = time.monotonic()
    try:
        mgr.save(2, state)
        out["step2"] = "committed"
    except SaveError as e:
        out["step2"] = str(e)
    out["seconds"] = time.monotonic() - t0
    try:
        mgr.close()
    except CheckpointError as e:
        out["close"] = str(e)
    return out


def run_fsdp(args) -> dict:
    """FSDP2 (fully_shard on a CPU mesh) + AdamW: ``--phase save`` trains 3 steps and saves
    step 3; ``--phase restore`` builds fresh objects at this world size and restores. Both
    report digests of every full parameter and moment."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 30), torch.nn.ReLU(), torch.nn.Linear(30, 7),
                                torch.nn.LayerNorm(7))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    state = {"model": model, "optimizer": opt}
    with CheckpointManager(args.root, opts(collective_timeout_s=args.timeout)) as mgr:
        if args.phase == "save":
            x, _ = dataset()
            for _ in range(3):
                model(x[:8]).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            mgr.save(3, state)
        else:
            assert mgr.restore(state) == 3
    params = {k: digest(v) for k, v in model.state_dict().items()}
    moments = {f"{i}.{k}": digest(v) for i, st in opt.state_dict()["state"].items() for k, v in st.items()
               if torch.is_tensor(v)}
    return {"params": params, "moments": moments}


def run_dtensor2d(args) -> dict:
    """Plain DTensors in a dict: ``--phase save`` on a (2, 2) mesh with [Shard(0), Replicate()]
    and [Shard(1), Shard(0)] placements; ``--phase restore`` on a 1-D mesh of this world size
    with [Shard(1)] and [Replicate()]. Reports digests of the full tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    world = dist.get_world_size()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(10, 6, generator=g), torch.randn(7, 9, generator=g).to(torch.bfloat16)
    if args.phase == "save":
        mesh = init_device_mesh("cpu", (2, world // 2))
        tp = {"a": distribute_tensor(a, mesh, [Shard(0), Replicate()]),
              "b": distribute_tensor(b, mesh, [Shard(1), Shard(0)])}
    else:
        mesh = init_device_mesh("cpu", (world,))
        tp = {"a": distribute_tensor(torch.zeros_like(a), mesh, [Shard(1)]),
              "b": distribute_tensor(torch.zeros_like(b), mesh, [Replicate()])}
    with CheckpointManager(args.root, opts(collective_timeout_s=args.timeout)) as mgr:
        if args.phase == "save":
            mgr.save(1, {"tp": tp})
        else:
            assert mgr.restore({"tp": tp}) == 1
            assert tp["a"].placements == (Shard(1),) and tp["b"].placements == (Replicate(),)
    return {"a": digest(tp["a"]), "b": digest(tp["b"]), "want_a": digest(a), "want_b": digest(b)}


def run_dcp_dicts(args) -> dict:
    """FSDP2 through torch.distributed.checkpoint.state_dict: save the dicts that
    ``get_state_dict`` returns, restore into fresh ones and ``set_state_dict`` them."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 30), torch.nn.ReLU(), torch.nn.Linear(30, 7))
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, _ = dataset()
    with CheckpointManager(args.root, opts(collective_timeout_s=args.timeout)) as mgr:
        if args.phase == "save":
            for _ in range(2):
                model(x[:8]).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
            msd, osd = get_state_dict(model, opt)
            mgr.save(2, {"model": msd, "optimizer": osd})
        else:
            model(x[:8]).pow(2).mean().backward()     # creates the optimizer's state to restore into
            opt.step()
            opt.zero_grad()
            msd, osd = get_state_dict(model, opt)
            assert mgr.restore({"model": msd, "optimizer": osd}) == 2
            set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    msd, osd = get_state_dict(model, opt)
    return {"params": {k: digest(v) for k, v in msd.items()},
            "moments": {f"{p}.{k}": digest(v) for p, st in osd["state"].items() for k, v in st.items()
                        if torch.is_tensor(v)}}


def run_perrank(args) -> dict:
    """Tensors of the same shape that hold different values on each rank (no DDP): each rank
    must get its own values back."""
    rank = dist.get_rank()
    state = {"t": torch.full((1000,), float(rank)), "stats": {"seen": torch.tensor([10 * rank + 1])}}
    with CheckpointManager(args.root, opts(collective_timeout_s=args.timeout)) as mgr:
        mgr.save(1, state)
        fresh = {"t": torch.zeros(1000), "stats": {"seen": torch.tensor([0])}}
        assert mgr.restore(fresh) == 1
    return {"t": float(fresh["t"][0]), "seen": int(fresh["stats"]["seen"][0]), "rank": rank}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--crash-at", type=int, default=-1)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--report-bytes", action="store_true")
    ap.add_argument("--how", default="raise")
    ap.add_argument("--phase", default="save")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    try:
        out = {"ddp": run_ddp, "fail": run_fail, "fsdp": run_fsdp, "dtensor2d": run_dtensor2d,
               "dcp_dicts": run_dcp_dicts, "perrank": run_perrank}[args.mode](args)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:   # a peer died: nothing left to tear down cleanly
            pass
    Path(f"{args.out}.rank{int(os.environ['RANK'])}.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    code = main()
    # Skip interpreter finalization: a gloo work thread that outlives destroy_process_group
    # can drop the last reference to a tensor during it and abort the process (seen under
    # gdb here: ProcessGroupGloo::runLoop -> ~AsyncAllgatherCoalescedWork -> decref -> the
    # GIL of a finalizing interpreter -> std::terminate; torch issue #190489). Everything
    # the test reads was written and flushed above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
