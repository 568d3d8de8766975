"""The process that gets killed: a tiny training loop that saves every step, plus the checks.

The state saved at step ``s`` of a run with seed ``k`` is a pure function
:func:`expected_state` ``(k, s)``: model/optimizer/scheduler/progress items with float32,
bfloat16, float16, int64, bool, uint8 and empty tensors, NaN/inf/-0.0, int keys, tuples,
bytes and big ints. A checker in another process regenerates it and compares bytes.

Two ways to run it:

- ``python tests/crash_worker.py run --root R --seed K --steps N [--fault after_data:2] ...``
  runs one training process (reproduce a failing trial with the printed arguments).
- ``python tests/crash_worker.py serve``: a fork server for the tests. It imports torch and
  async_ckpt once, then forks one child per request (``{"cmd": "run", "args": {...}}`` →
  ``{"pid": ...}``; ``{"cmd": "wait", "pid": ...}`` → ``{"status": ...}``, negative for a
  signal). Forking a prepared interpreter costs milliseconds, importing torch seconds:
  that is what lets the default suite run dozens of kill trials in CI time.

The log (``--log``) gets one line per event, appended with O_APPEND so a SIGKILL never
loses a line that was written: ``restored S``, ``started S``, ``queued S``,
``committed S`` (the save's handle returned: the step is durable), ``done``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from async_ckpt import faults  # noqa: E402
import ckpt_layout as layout
from async_ckpt.manager import CheckpointManager  # noqa: E402
from async_ckpt.options import CheckpointManagerOptions  # noqa: E402
from async_ckpt.storage.native_files import NativeStorage  # noqa: E402

# ----------------------------------------------------------------------------- the state


def _shapes(seed: int, size: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Names, dtypes and shapes depend on the seed only, so restore-in-place fits."""
    r = np.random.default_rng(seed)
    scale = {"small": 1, "big": 24}[size]
    shapes = {
        "w0": (torch.float32, (int(r.integers(1, 64)), int(r.integers(1, 64)) * scale)),
        "w1": (torch.bfloat16, (int(r.integers(0, 2000)) * scale,)),
        "w2": (torch.float16, (int(r.integers(1, 9)), int(r.integers(1, 9)), int(r.integers(1, 9)))),
        "idx": (torch.int64, (int(r.integers(0, 300)),)),
        "mask": (torch.bool, (int(r.integers(0, 500)),)),
        "bytes": (torch.uint8, (int(r.integers(0, 70_000)) * scale,)),
        "empty": (torch.float32, (0, 3)),
        "scalar": (torch.float64, ()),
    }
    if size == "big":
        shapes["wbig"] = (torch.float32, (600_000,))    # ~2.4 MB, many chunks: a wide mid_write window
    return shapes


def _fill(name: str, dtype: torch.dtype, shape: tuple[int, ...], g: torch.Generator, step: int) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype in (torch.int64, torch.uint8):
        hi = 256 if dtype == torch.uint8 else 1 << 62
        t = torch.randint(0, hi, shape, generator=g, dtype=dtype)
        if name == "bytes" and t.numel():
            t[: t.numel() // 2] = step % 7     # half compressible: zstd and raw chunks both occur
        return t
    t = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
    flat = t.view(-1)
    if flat.numel() >= 4:   # values that compare unequal to themselves or hide their sign
        flat[0], flat[1], flat[2], flat[3] = float("nan"), float("inf"), -0.0, float("-inf")
    return t


def frozen_backbone(seed: int) -> torch.nn.Module:
    """A module whose parameters are frozen and depend on the seed only: from the second save
    of a process on, its data file is hard-linked from the previous step (storage.FrozenFile),
    so every fault point also cuts through that path."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(32, 16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(16, 32, generator=g))
        layer.bias.copy_(torch.randn(16, generator=g))
    layer.requires_grad_(False)
    return layer


def expected_state(seed: int, step: int, size: str = "small") -> dict[str, Any]:
    """The state the training loop holds (and saves) at ``step``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    model = {name: _fill(name, dt, shape, g, step) for name, (dt, shape) in _shapes(seed, size).items()}
    exp_avg = torch.randn(5, generator=g, dtype=torch.float32)
    lr = 0.1 / (step + 1)
    return {
        "model": model,
        "backbone": frozen_backbone(seed),
        "optimizer": {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": exp_avg}},
                      "param_groups": [{"lr": lr, "betas": (0.9, 0.999), "params": [0], "amsgrad": False}]},
        "scheduler": {"last_epoch": step, "base_lrs": [0.1], "_last_lr": [lr]},
        "progress": {"step": step, "seed": seed, "loss": 1.0 / (step + 1), "nan": float("nan"),
                     "tag": b"\x00step%d" % step, "pair": (step, -step), "big": 2 ** 70 + step,
                     "none": None},
    }


def assign(state: dict[str, Any], new: dict[str, Any]) -> None:
    """Make ``state`` equal to ``new`` by mutating it in place (what a training step does)."""
    for k, v in new.items():
        cur = state.get(k)
        if isinstance(v, torch.nn.Module) and isinstance(cur, torch.nn.Module):
            if difference(cur, v) is not None:     # frozen: untouched unless it differs
                cur.load_state_dict(v.state_dict())
        elif isinstance(v, torch.Tensor) and isinstance(cur, torch.Tensor) and cur.shape == v.shape:
            cur.copy_(v)
        elif isinstance(v, dict) and isinstance(cur, dict):
            assign(cur, v)
        else:
            state[k] = v


def difference(a: Any, b: Any, path: str = "state") -> Optional[str]:
    """None when ``a`` and ``b`` are equal bit for bit (NaN payloads, -0.0 included)."""
    if isinstance(a, torch.nn.Module):
        a = dict(a.state_dict())
    if isinstance(b, torch.nn.Module):
        b = dict(b.state_dict())
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if a.numel() and not torch.equal(a.contiguous().view(-1).view(torch.uint8),
                                         b.contiguous().view(-1).view(torch.uint8)):
            return f"{path}: bytes differ"
        return None
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"{path}: keys {list(a)} vs {list(b)}"
        for k in a:
            d = difference(a[k], b[k], f"{path}[{k!r}]")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            d = difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return None
    if isinstance(a, float) and a == b and math.copysign(1, a) != math.copysign(1, b):
        return f"{path}: sign of zero differs"
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def state_nbytes(state: Any) -> int:
    if isinstance(state, torch.nn.Module):
        return state_nbytes(dict(state.state_dict()))
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0


ITEMS = ("model", "backbone", "optimizer", "scheduler", "progress")

# ----------------------------------------------------------------------------- the training process


class SlowStorage(NativeStorage):
    """A disk slower than training: every write sleeps first (SIGTERM and backpressure tests)."""

    def __init__(self, delay: float, **kw) -> None:
        super().__init__(**kw)
        self.delay = delay

    def write_rank(self, location, request):
        time.sleep(self.delay)
        return super().write_rank(location, request)


def options_from(d: dict) -> CheckpointManagerOptions:
    return CheckpointManagerOptions(**d)


def run(root: str, seed: int, steps: int, log: str, options: Optional[dict] = None,
        fault: str = "", size: str = "small", sleep: float = 0.0, storage_delay: float = 0.0,
        hold: float = 0.0) -> int:
    """Resume from the newest committed step (checking it bitwise), then save ``steps`` more."""
    faults.arm(fault)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def note(*words: Any) -> None:
        os.write(fd, (" ".join(map(str, words)) + "\n").encode())

    opts = options_from(options or {})
    storage = None
    if storage_delay:
        storage = SlowStorage(storage_delay, io_threads=opts.io_threads, compression=opts.compression,
                              level=opts.compression_level, fsync=opts.fsync)
    with CheckpointManager(root, opts, storage=storage) as mgr:
        state = expected_state(seed, 0, size)
        last = mgr.restore(state)
        if last is not None:
            diff = difference(state, expected_state(seed, last, size))
            if diff:
                note("mismatch", last, diff)
                return 3
            note("restored", last)
        start = 0 if last is None else last + 1
        note("started", start)
        if hold:                      # keep the directory lock (lock tests)
            time.sleep(hold)
        pending = []
        for step in range(start, start + steps):
            assign(state, expected_state(seed, step, size))
            pending.append(mgr.save_async(step, state, metrics={"loss": 1.0 / (step + 1)}))
            note("queued", step)
            while pending and pending[0].done():
                pending[0].result()
                note("committed", pending.pop(0).step)
            if sleep:
                time.sleep(sleep)
        for h in pending:
            h.result()
            note("committed", h.step)
    note("done")
    os.close(fd)
    return 0


def read_log(path: str) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"queued": [], "committed": [], "restored": [], "started": [], "done": []}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        word, _, rest = line.partition(" ")
        if word == "mismatch":
            raise AssertionError(f"the resumed process found a mismatch: {line}")
        if word in out:
            out[word].append(int(rest) if rest else 0)
    return out


# ----------------------------------------------------------------------------- the checks after a kill


class Stats:
    def __init__(self) -> None:
        self.trials = self.kills = self.steps_checked = self.bytes_checked = 0
        self.bytes_lost = 0
        self.leftovers_removed = 0

    def line(self, what: str) -> str:
        return (f"{what}: trials={self.trials} kills={self.kills} steps_checked={self.steps_checked} "
                f"bytes_checked={self.bytes_checked} leftovers_removed={self.leftovers_removed} "
                f"committed_bytes_lost={self.bytes_lost}")


def check_after_kill(root: str, seed: int, log: str, keep: Optional[int], size: str = "small",
                     stats: Optional[Stats] = None, context: str = "") -> list[int]:
    """What must hold after any kill; returns the committed steps. ``log`` spans every run on ``root``.

    - a fresh manager opens at once (the dead process's flock is gone) and removes leftovers;
    - it lists only steps some run queued, and never loses one a run saw committed (beyond
      what ``max_to_keep`` rotates away);
    - every listed step loads bit for bit equal to ``expected_state(seed, step)``, the
      newest restores in place equal to it, and verify calls each COMPLETE.
    """
    from async_ckpt.tools import verify

    events = read_log(log)
    leftovers = layout.find_leftovers(Path(root))
    opts = CheckpointManagerOptions(max_to_keep=keep, handle_sigterm=False, io_threads=2)
    with CheckpointManager(root, opts) as mgr:
        listed = mgr.all_steps()
        assert not layout.find_leftovers(Path(root)), f"{context}: leftovers survive a fresh manager"
        names = sorted(os.listdir(root))
        expect_names = sorted([layout.LOCK_NAME] + [layout.step_dir_name(s) for s in listed])
        assert names == expect_names, f"{context}: unexpected entries {names} (listed {listed})"
        assert set(listed) <= set(events["queued"]), f"{context}: lists {listed}, never queued"
        known = sorted(set(listed) | set(events["committed"]))
        must = known[-keep:] if keep else known
        lost = [s for s in must if s not in listed]
        if stats is not None:
            stats.bytes_lost += sum(state_nbytes(expected_state(seed, s, size)) for s in lost)
        assert not lost, f"{context}: committed step(s) {lost} lost; listed {listed}, log {events}"
        for s in listed:
            tree = mgr.load(s)
            exp = expected_state(seed, s, size)
            for item in ITEMS:
                diff = difference(tree[item], exp[item], f"step {s} {item}")
                assert diff is None, f"{context}: {diff}"
            rep = verify.check_step(Path(root) / layout.step_dir_name(s))
            assert rep.verdict == verify.COMPLETE, f"{context}: verify says {rep.verdict} for step {s}: " \
                                                   f"{rep.reason} {rep.problems} {rep.missing}"
            if stats is not None:
                stats.steps_checked += 1
                stats.bytes_checked += state_nbytes(exp)
        if listed:
            state = expected_state(seed, 0, size)
            assert mgr.restore(state) == listed[-1]
            diff = difference(state, expected_state(seed, listed[-1], size))
            assert diff is None, f"{context}: restored newest differs: {diff}"
    if stats is not None:
        stats.leftovers_removed += len(leftovers)
    return listed


# ----------------------------------------------------------------------------- fork server


def _single_threaded() -> bool:
    return len(os.listdir("/proc/self/task")) == 1


def serve() -> None:
    """Fork one child per request; see the module docstring for the protocol."""
    torch.set_num_threads(1)
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "run":
            assert _single_threaded(), "the fork server must not have started threads"
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    err = os.open(req["args"]["log"] + ".stderr", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    os.dup2(err, 1)
                    os.dup2(err, 2)
                    devnull = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(devnull, 0)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    code = run(**req["args"])
                except BaseException:
                    traceback.print_exc()
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(code)
            out.write(json.dumps({"pid": pid}) + "\n")
        elif req["cmd"] == "wait":
            _, status = os.waitpid(req["pid"], 0)
            rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            out.write(json.dumps({"status": rc}) + "\n")
        elif req["cmd"] == "quit":
            break
        out.flush()


class ForkServer:
    """The test side of :func:`serve`."""

    def __init__(self) -> None:
        import subprocess

        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   ASYNC_CKPT_IO_THREADS="2", OMP_NUM_THREADS="1")
        env.pop("ASYNC_CKPT_FAULT", None)
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def _ask(self, req: dict) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (rc {self.proc.poll()})")
        return json.loads(line)

    def start(self, **args: Any) -> int:
        return self._ask({"cmd": "run", "args": args})["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"cmd": "wait", "pid": pid})["status"]

    def run(self, **args: Any) -> int:
        return self.wait(self.start(**args))

    def close(self) -> None:
        try:
            self._ask({"cmd": "quit"})
        except (RuntimeError, BrokenPipeError, ValueError):
            pass
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()


_SHARED: Optional[ForkServer] = None


def shared_server() -> ForkServer:
    """One fork server per test process, shared by every test module (torch imports once)."""
    global _SHARED
    if _SHARED is None or _SHARED.proc.poll() is not None:
        import atexit

        _SHARED = ForkServer()
        atexit.register(_SHARED.close)
    return _SHARED


def stderr_of(log: str) -> str:
    try:
        return Path(log + ".stderr").read_text()[-3000:]
    except FileNotFoundError:
        return ""


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve")
    r = sub.add_parser("run")
    r.add_argument("--root", required=True)
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--steps", type=int, default=8)
    r.add_argument("--log", required=True)
    r.add_argument("--fault", default="")
    r.add_argument("--size", default="small", choices=("small", "big"))
    r.add_argument("--options", default="{}", help="CheckpointManagerOptions as JSON")
    r.add_argument("--sleep", type=float, default=0.0)
    r.add_argument("--storage-delay", type=float, default=0.0)
    r.add_argument("--hold", type=float, default=0.0)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        serve()
        return 0
    return run(a.root, a.seed, a.steps, a.log, json.loads(a.options), a.fault, a.size, a.sleep,
               a.storage_delay, a.hold)


if __name__ == "__main__":
    sys.exit(main())
