"""async_ckpt itself: one long-lived CheckpointManager per compression mode, as in training.

Each manager takes one untimed save when it is opened, so its staging buffer exists (a
training job pays that allocation once, at its first save); every timed save after it
reuses the buffer. Rotation is off (``max_to_keep=None``) so that no timing includes deleting
an older step (peers delete nothing either); the previous step is deleted untimed instead.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from async_ckpt import CheckpointManager, CheckpointManagerOptions
from async_ckpt.format import names as layout

from ._ceilings import drop_caches, files_under
from ._states import BenchState

MODES = {"none": None, "zstd": "zstd", "auto": "auto"}


def _verify(step_dir: Path) -> str:
    """Full verify (every chunk's CRC) through verify's Python entry, else its CLI."""
    try:
        from async_ckpt.tools.verify import check_step
    except ImportError:   # the module is optional for the benchmark: use the CLI
        import subprocess
        import sys
        rc = subprocess.run([sys.executable, "-m", "async_ckpt.verify", str(step_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        return "ok" if rc in (0, 1) else f"exit {rc}"
    rep = check_step(step_dir, quick=False, show_progress=False)
    return rep.verdict


class Ours:
    """Managers for one state; ``run_*`` methods return {row_id: seconds}."""

    def __init__(self, st: BenchState, folder: Path, io_threads: Optional[int] = None) -> None:
        self.st = st
        self.folder = Path(folder)
        self.step = 0
        self.managers: dict[str, CheckpointManager] = {}
        kw = {} if io_threads is None else {"io_threads": io_threads}
        self.options: dict[str, CheckpointManagerOptions] = {}
        for mode, compression in MODES.items():
            opts = self.options[mode] = CheckpointManagerOptions(max_to_keep=None, compression=compression,
                                                                 handle_sigterm=False, **kw)
            mgr = CheckpointManager(self.folder / mode, options=opts)
            mgr.save(self._next(), st.ours)          # untimed: allocates the staging buffer
            self.managers[mode] = mgr
        # With huge_pages on (ASYNC_CKPT_HUGE_PAGES=1), a run saving every few minutes has its
        # staging buffers on huge pages after the first save (pipeline/huge_pages.py, once per
        # buffer, in the background): wait for that here, so it neither runs inside another
        # contender's timing nor is skipped. Off, there is nothing to wait for.
        for mgr in self.managers.values():
            mgr._tidier.wait_idle()
        # One step for the "restore by a new manager" row, written once by a manager closed at once.
        self.fresh_folder = self.folder / "fresh"
        with CheckpointManager(self.fresh_folder, options=self.options["none"]) as writer:
            writer.save(1, st.ours)
        # The same state through the TensorStore kvstore backend (file driver), uncompressed:
        # what an object-store run costs on local disk, against the native backend above.
        opts = CheckpointManagerOptions(max_to_keep=None, compression=None, handle_sigterm=False, **kw)
        self.kv_folder = self.folder / "kvstore"
        self.kv = CheckpointManager({"driver": "file", "path": str(self.kv_folder)}, options=opts)
        self.kv.save(self._next(), st.ours)
        self.kv._tidier.wait_idle()

    def _next(self) -> int:
        self.step += 1
        return self.step

    def close(self) -> None:
        for mgr in self.managers.values():
            mgr.close()
        self.kv.close()

    def run_kvstore(self) -> dict[str, float]:
        """save (to committed) and restore through the TensorStore file driver, uncompressed."""
        step = self._next()
        t0 = time.perf_counter()
        self.kv.save(step, self.st.ours)
        out = {"ours_kv_save": time.perf_counter() - t0}
        for old in self.kv.all_steps():
            if old != step:
                self.kv.delete(old)
        drop_caches(files_under(self.kv_folder))
        t0 = time.perf_counter()
        got = self.kv.restore(self.st.ours, step=step)
        out["ours_kv_restore"] = time.perf_counter() - t0
        assert got == step, (got, step)
        return out

    def _prune(self, mode: str, keep: int) -> None:
        """Delete every step but ``keep`` (untimed)."""
        mgr = self.managers[mode]
        for old in mgr.all_steps():
            if old != keep:
                mgr.delete(old)

    def _read_back(self, mode: str, step: int, out: dict[str, float], verify: bool) -> None:
        mgr = self.managers[mode]
        step_dir = mgr.directory / layout.step_dir_name(step)
        drop_caches(files_under(step_dir))
        t0 = time.perf_counter()
        got = mgr.restore(self.st.ours, step=step)
        out[f"ours_restore_{mode}"] = time.perf_counter() - t0
        assert got == step, (got, step)
        if mode == "none":      # what all-or-nothing costs: the same restore decoding in place
            drop_caches(files_under(step_dir))
            t0 = time.perf_counter()
            mgr.restore(self.st.ours, step=step, atomic=False)
            out["ours_restore_direct_none"] = time.perf_counter() - t0
            # A resumed run's first restore: a new manager, whose staging buffer the restore
            # allocates. It reads a step of its own folder, so the long-lived managers are
            # never reopened (a manager reopened in the same process measured slower reads).
            drop_caches(files_under(self.fresh_folder))
            t0 = time.perf_counter()
            with CheckpointManager(self.fresh_folder, options=self.options[mode]) as fresh:
                fresh.restore(self.st.ours, step=1)
            out["ours_restore_new_none"] = time.perf_counter() - t0
        if verify:
            drop_caches(files_under(step_dir))
            t0 = time.perf_counter()
            verdict = _verify(step_dir)
            out[f"ours_verify_{mode}"] = time.perf_counter() - t0
            if verdict not in ("COMPLETE", "PARTIAL", "ok"):
                raise RuntimeError(f"verify says {verdict} for {step_dir}")

    def run_async(self, mode: str) -> dict[str, float]:
        """save_async: the stall, then the time until committed; then restore (and verify)."""
        mgr = self.managers[mode]
        step = self._next()
        handle = mgr.save_async(step, self.st.ours, force=True)
        result = handle.result()
        self._prune(mode, step)
        out = {f"ours_stall_{mode}": result.stall_seconds,
               f"ours_commit_{mode}": result.seconds_to_commit,
               f"stored:ours_commit_{mode}": result.stored_bytes}
        self._read_back(mode, step, out, verify=mode == "none")
        return out

    def run_blocking(self) -> dict[str, float]:
        """``save`` (blocks until committed), uncompressed."""
        mgr = self.managers["none"]
        t0 = time.perf_counter()
        step = self._next()
        mgr.save(step, self.st.ours)
        out = {"ours_save_none": time.perf_counter() - t0}
        self._prune("none", step)
        return out
