"""PyTorch Lightning ``CheckpointIO`` plugin: async, atomic, bit-exact checkpoints.

>>> from async_ckpt.integrations.lightning import AsyncCheckpointIO          # doctest: +SKIP
>>> trainer = pl.Trainer(plugins=[AsyncCheckpointIO()],
...                      callbacks=[ModelCheckpoint(monitor="val_loss", save_top_k=2)])
>>> trainer.fit(model, dm, ckpt_path="last")          # or any path Lightning saved

Layout. Every ``save_checkpoint(checkpoint, path)`` becomes one committed step of a
:class:`~async_ckpt.CheckpointManager` whose root is ``directory`` (default: an
``async_ckpt`` folder next to the first path saved). Steps are numbered by save, in order
(two paths saved at one global step are two steps). The Lightning ``path`` itself becomes
a relative symlink to its step folder, created atomically once the step has committed:
until then ``path`` keeps naming what it named before (``last.ckpt`` always points at a
complete checkpoint, even when the process dies mid-save). Items of a step: ``model``
(Lightning's ``state_dict``), ``optimizer`` (``optimizer_states``), ``scheduler``
(``lr_schedulers``), ``lightning`` (everything else: epoch, global step, loops, callback
states, hyperparameters) and ``rng`` (python, numpy, torch and CUDA streams: Lightning
itself saves none of them).

The checkpoint dict must be plain data: dict/list/tuple/str/int/float/bool/None, tensors,
ndarrays, numpy scalars, ``torch.dtype``/``torch.Size``/``bytes``. Anything else (an
``nn.Module`` or a ``Path`` in ``save_hyperparameters()``, say) is rejected with a
``TypeError`` naming its key before anything is written; ``save_hyperparameters(ignore=...)``
keeps such objects out. Nothing is pickled, so loading never runs code.

Who calls what, on which thread:

- Lightning calls ``save_checkpoint``, ``remove_checkpoint``, ``load_checkpoint`` and
  ``teardown`` on the training thread. ``save_checkpoint`` returns once the state is copied
  to host memory (``snapshot="eager"``; ``"lazy"`` is refused: Lightning hands over state
  dicts, not optimizers, so there is nothing to fence).
- One finisher thread per plugin waits for each save to commit, in save order, then
  swaps its symlink in and marks the step the path named before for deletion.
- Steps nobody names any more are deleted on the training thread, at the next call made
  while no save is in flight, and at ``teardown``: a deletion never waits on a write.
- ``remove_checkpoint(path)`` on a save still in flight cancels its symlink (the step is
  deleted once written) instead of waiting for it; the path is gone when it returns.
- A failed save is raised (as :class:`async_ckpt.SaveError`) by the next
  ``save_checkpoint``/``remove_checkpoint``/``load_checkpoint``/``wait_until_finished``,
  at the latest by ``teardown``, which Lightning calls when ``fit`` ends; each error once.

``load_checkpoint`` follows the symlink to its step (any root, not only this plugin's),
restores the RNG streams (``restore_rng=True``) and returns Lightning's dict with CPU
tensors; ``map_location`` may name a device. A regular ``.ckpt`` file (written by
Lightning's own ``TorchCheckpointIO``) is read with ``torch.load(weights_only=True)``.
``LightningModule.load_from_checkpoint`` does not go through ``CheckpointIO`` plugins: use
``trainer.validate/test/predict(ckpt_path=...)``, this plugin's ``load_checkpoint``, or
``python -m async_ckpt.integrations.export``.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import enum
import os
import re
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .. import CheckpointManager, CheckpointManagerOptions, NotCommittedError, SaveError
from . import IntegrationError

try:
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError:  # pragma: no cover - exercised only without Lightning
    try:
        from lightning.fabric.plugins.io.checkpoint_io import (
            CheckpointIO,  # the unified `lightning` package
        )
    except ImportError as e:
        raise ImportError("async_ckpt.integrations.lightning needs Lightning: "
                          "pip install 'pytorch-lightning==2.6.6'") from e

__all__ = ["AsyncCheckpointIO"]

_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")
# Lightning's dict keys that get an item of their own (the item names verify reports by kind).
_ITEMS = (("state_dict", "model"), ("optimizer_states", "optimizer"), ("lr_schedulers", "scheduler"))
_REST = "lightning"
_PLAIN_LEAVES = (str, int, float, bool, type(None), bytes, torch.Tensor, np.ndarray, np.generic,
                 torch.dtype, torch.Size)


def _check_plain(obj: Any, path: str) -> None:
    """Reject what a checkpoint dict should not hold, naming the key (before any write)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(value, f"{path}[{key!r}]")
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        for i, value in enumerate(obj):
            _check_plain(value, f"{path}[{i}]")
    elif isinstance(obj, enum.Enum) and not isinstance(obj, (int, str)):
        raise TypeError(f"checkpoint{path}: enum {obj!r} is not plain data; store its value")
    elif not isinstance(obj, _PLAIN_LEAVES):
        hint = (" (keep it out with save_hyperparameters(ignore=[...]))"
                if "hyper_parameters" in path else "")
        raise TypeError(f"checkpoint{path}: a {type(obj).__module__}.{type(obj).__qualname__} is not "
                        f"plain data and async_ckpt never pickles{hint}")


def _to_device(obj: Any, device: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj


def _is_remote(path: Union[str, os.PathLike]) -> bool:
    return "://" in os.fspath(path)


class AsyncCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` that saves through a :class:`~async_ckpt.CheckpointManager`.

    ``directory``: the manager's root (default: ``async_ckpt`` next to the first path saved).
    ``options``: IO knobs (compression, io_threads, ...); retention is Lightning's (what
    ``ModelCheckpoint`` removes is deleted), so ``max_to_keep``/``best_metric``/
    ``keep_every_n_steps`` are replaced. ``restore_rng``: whether ``load_checkpoint`` puts
    the saved RNG streams back (what makes a resumed ``fit`` continue bit for bit).
    """

    def __init__(self, directory: Optional[Union[str, os.PathLike]] = None,
                 options: Optional[CheckpointManagerOptions] = None, *, restore_rng: bool = True) -> None:
        opts = options or CheckpointManagerOptions()
        if opts.snapshot != "eager":
            raise IntegrationError("AsyncCheckpointIO needs snapshot='eager': Lightning passes state dicts, "
                                   "not optimizers, so a lazy snapshot could not fence the next step")
        self.options = dataclasses.replace(opts, max_to_keep=None, best_metric=None, keep_every_n_steps=None,
                                           save_interval_steps=1)
        self.directory: Optional[Path] = Path(os.path.abspath(directory)) if directory is not None else None
        self.restore_rng = restore_rng
        self._manager: Optional[CheckpointManager] = None
        self._finisher: Optional[cf.ThreadPoolExecutor] = None
        self._futures: list[cf.Future] = []
        self._next_step = 0
        self._lock = threading.Lock()     # guards everything below; finisher and training thread
        self._links: dict[str, int] = {}  # path -> committed step its symlink names
        self._wanted: dict[str, int] = {}  # path -> step in flight that will replace its link
        self._doomed: set[int] = set()     # steps no path names any more
        self._errors: list[BaseException] = []
        self._raised: list[BaseException] = []

    # ------------------------------------------------------------------ manager and errors

    @property
    def manager(self) -> CheckpointManager:
        """The manager of ``directory`` (opened on first use; ``teardown`` closes it)."""
        if self._manager is None:
            if self.directory is None:
                raise IntegrationError("AsyncCheckpointIO has no directory yet: nothing was saved")
            self._manager = CheckpointManager(self.directory, self.options)
            latest = self._manager.latest_step()
            self._next_step = max(self._next_step, 0 if latest is None else latest + 1)
            for path, step in self._scan_links().items():
                self._links.setdefault(path, step)
        return self._manager

    def _scan_links(self) -> dict[str, int]:
        """Symlinks next to the root that name its steps (a restarted run keeps deleting what
        ModelCheckpoint removes, and never deletes a step an old link still names)."""
        found: dict[str, int] = {}
        assert self.directory is not None
        parent = self.directory.parent
        real_root = Path(os.path.realpath(self.directory))
        try:
            entries = list(os.scandir(parent))
        except OSError:
            return found
        for entry in entries:
            if not entry.is_symlink():
                continue
            target = Path(os.path.realpath(entry.path))
            m = _STEP_DIR.match(target.name)
            if m and target.parent == real_root:
                found[os.path.abspath(entry.path)] = int(m.group(1))
        return found

    def _raise_errors(self) -> None:
        with self._lock:
            while self._errors:
                error = self._errors.pop(0)
                if not any(error is seen for seen in self._raised):
                    self._raised.append(error)
                    raise error

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a manager call on the training thread; a SaveError it raises is not raised again."""
        try:
            return fn(*args, **kwargs)
        except SaveError as e:
            with self._lock:
                self._raised.append(e)
            raise

    # ------------------------------------------------------------------ CheckpointIO

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Union[str, os.PathLike],
                        storage_options: Optional[Any] = None) -> None:
        """Snapshot ``checkpoint`` and return; ``path`` names it once it has committed."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        if _is_remote(path):
            raise IntegrationError(f"{path}: AsyncCheckpointIO writes local paths only")
        self._raise_errors()
        path = os.path.abspath(os.fspath(path))
        if self.directory is None:
            self.directory = Path(os.path.dirname(path)) / "async_ckpt"
        _check_plain(checkpoint, "")
        state = {item: checkpoint[key] for key, item in _ITEMS if key in checkpoint}
        state[_REST] = {k: v for k, v in checkpoint.items() if k not in dict(_ITEMS)}
        metrics = {k: float(checkpoint[k]) for k in ("epoch", "global_step")
                   if isinstance(checkpoint.get(k), (int, float)) and not isinstance(checkpoint.get(k), bool)}
        mgr = self.manager
        os.makedirs(os.path.dirname(path), exist_ok=True)
        step = self._next_step
        handle = self._call(mgr.save_async, step, state, metrics=metrics, force=True)
        self._next_step = step + 1
        with self._lock:
            self._wanted[path] = step     # an earlier save of path still in flight is superseded
        if self._finisher is None:
            self._finisher = cf.ThreadPoolExecutor(1, thread_name_prefix="async_ckpt-lightning")
        self._futures.append(self._finisher.submit(self._finish, handle, path, step))
        self._collect()

    def _finish(self, handle: Any, path: str, step: int) -> None:
        """Finisher thread: wait for ``step`` to commit, then point ``path`` at it."""
        try:
            handle.result()
        except BaseException as e:
            with self._lock:
                if self._wanted.get(path) == step:
                    del self._wanted[path]
                if not any(e is seen for seen in self._raised):
                    self._errors.append(e)
            return
        with self._lock:
            if self._wanted.get(path) != step:
                self._doomed.add(step)     # removed or saved again while this one was writing
                return
            del self._wanted[path]
            try:
                self._point(path, step)
            except OSError as e:
                self._doomed.add(step)
                self._errors.append(e)
                return
            old = self._links.get(path)
            self._links[path] = step
            if old is not None and old != step and old not in self._links.values():
                self._doomed.add(old)

    def _point(self, path: str, step: int) -> None:
        """Atomically make ``path`` a relative symlink to ``step``'s folder."""
        assert self.directory is not None
        target = os.path.relpath(self.directory / f"checkpoint-{step}", os.path.dirname(path))
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        os.symlink(target, tmp)
        try:
            os.replace(tmp, path)   # atomic: readers see the old target or the new one
        except BaseException:
            os.unlink(tmp)
            raise
        if self.options.fsync:
            fd = os.open(os.path.dirname(path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _collect(self, wait: bool = False) -> None:
        """Training thread: delete the steps nobody names, if no save is in flight (or ``wait``)."""
        if wait:
            cf.wait(self._futures)
        if any(not f.done() for f in self._futures):
            return
        self._futures = [f for f in self._futures if not f.done()]
        with self._lock:
            doomed = sorted(self._doomed)
            self._doomed.clear()
        if not doomed or self._manager is None:
            return
        committed = set(self._manager.all_steps())
        for step in doomed:
            if step in committed:
                self._call(self._manager.delete, step)

    def remove_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Forget ``path``: its symlink goes now, its step once no save is in flight."""
        self._raise_errors()
        path = os.path.abspath(os.fspath(path))
        with self._lock:
            self._wanted.pop(path, None)     # a save in flight for path: cancel its link
            step = self._links.pop(path, None)
            if step is not None:
                if os.path.islink(path):
                    os.unlink(path)
                if step not in self._links.values():
                    self._doomed.add(step)
            elif os.path.islink(path) or os.path.isfile(path):
                os.unlink(path)            # not ours (e.g. a link Lightning made): as TorchCheckpointIO
            elif os.path.isdir(path):
                shutil.rmtree(path)
        self._collect()

    def load_checkpoint(self, path: Union[str, os.PathLike], map_location: Optional[Any] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Lightning's checkpoint dict of the step ``path`` names (RNG restored: see the class doc).

        ``weights_only`` is accepted for Lightning's signature; nothing here can run code.
        """
        self.wait_until_finished()
        if _is_remote(path):
            raise IntegrationError(f"{path}: AsyncCheckpointIO reads local paths only")
        path = os.path.abspath(os.fspath(path))
        target = Path(os.path.realpath(path))
        m = _STEP_DIR.match(target.name)
        if m is None:
            if os.path.isfile(path):
                from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
                return TorchCheckpointIO().load_checkpoint(path, map_location=map_location, weights_only=True)
            if os.path.islink(path) or os.path.lexists(path):
                raise NotCommittedError(f"{path} names {target}, which is not a committed async_ckpt step")
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        step = int(m.group(1))
        root = target.parent
        ours = (self._manager is not None and self.directory is not None
                and root == Path(os.path.realpath(self.directory)))
        mgr = self._manager if ours else CheckpointManager(root, dataclasses.replace(
            self.options, cleanup_leftovers=False, handle_sigterm=False))
        try:
            tree = mgr.load(step)
            if self.restore_rng and "rng" in tree:
                mgr.restore({}, step=step)   # an empty state restores the RNG streams alone
        finally:
            if not ours:
                mgr.close()
        checkpoint = dict(tree.get(_REST, {}))
        for key, item in _ITEMS:
            if item in tree:
                checkpoint[key] = tree[item]
        if isinstance(map_location, (str, torch.device)) and str(map_location) != "cpu":
            checkpoint = _to_device(checkpoint, map_location)
        return checkpoint

    def wait_until_finished(self) -> None:
        """Block until every save has committed and its path is linked; raise a failure once."""
        self._raise_errors()
        self._collect(wait=True)
        self._raise_errors()

    def teardown(self) -> None:
        """Called by Lightning when a stage ends: wait for every save, delete what nobody
        names, close the manager (the next save reopens it) and raise a failed save."""
        try:
            self.wait_until_finished()
        finally:
            if self._finisher is not None:
                self._finisher.shutdown(wait=True)
                self._finisher = None
            mgr, self._manager = self._manager, None
            if mgr is not None:
                self._call(mgr.close)
