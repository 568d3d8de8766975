"""Hugging Face ``Trainer`` with async, atomic, bit-exact checkpoints.

>>> from async_ckpt.integrations.hf import AsyncCheckpointTrainer      # doctest: +SKIP
>>> trainer = AsyncCheckpointTrainer(model=model, args=args, train_dataset=ds)
>>> trainer.train(resume_from_checkpoint=True)      # latest committed step, or a fresh start error

Why a ``Trainer`` subclass and not a ``TrainerCallback`` (checked against transformers 5.23):

- A callback's ``on_save`` runs *after* ``Trainer._save_checkpoint`` has already written the
  Trainer's own folder with ``torch.save``: the stall we remove would already be paid. A
  callback can clear ``control.should_save`` earlier, but with ``save_strategy="best"`` the
  Trainer sets it again after ``on_evaluate``, and saving earlier than the Trainer (before its
  evaluation) captures the RNG before the evaluation dataloader consumed it: not exact.
- On resume the Trainer positions itself from ``resume_from_checkpoint`` alone: the epoch
  loop starts at ``global_step // steps_per_epoch`` and skips batches only when that path is
  given. ``on_train_begin`` runs after those decisions; a callback can load weights but
  cannot move the data position.

So :class:`AsyncCheckpointMixin` overrides the Trainer's checkpoint methods
(``_save_checkpoint``, ``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``,
``_load_scaler``, ``_load_rng_state``, ``_load_best_model``) and ``train``, and nothing else.
Put it first in the bases of any ``Trainer`` subclass (``class T(AsyncCheckpointMixin,
SFTTrainer)``); :class:`AsyncCheckpointTrainer` is the mixin on the plain ``Trainer``.

What each checkpoint holds (items of one committed step, step = ``state.global_step``):
``model`` (the module), ``optimizer``, ``scheduler``, ``scaler`` (when Accelerate has one),
``trainer_state`` (``TrainerState`` as a dict, log history and callback states included),
``config`` (``config.json`` / ``generation_config.json`` text, as ``save_pretrained`` writes
them, so ``python -m async_ckpt.integrations.export`` can produce a ``from_pretrained``
folder), ``integration`` (which items were written) and ``rng`` (captured by the manager
at the moment the Trainer would have written ``rng_state.pth``).

Resume reuses the Trainer's own bookkeeping: ``train`` writes the saved ``TrainerState`` as
``trainer_state.json`` into a scratch folder and hands that folder to the Trainer as
``resume_from_checkpoint``; the overridden loaders read everything else from the committed
step. The Trainer then computes the epoch and the batches to skip exactly as for its own
folders, and restores the RNG streams at the very points where it restores its own
``rng_state.pth``.

Retention follows ``TrainingArguments``: ``save_total_limit`` keeps the newest steps, and the
best step by ``metric_for_best_model`` is always kept, as ``rotate_checkpoints`` does. Old
steps are deleted when the next save starts (never while a save is still writing, never the
newest committed step before the new one commits) and once more when ``train`` returns, so
at most one step beyond the limit stays on disk while a save is in flight.

Threads: every method here runs on the training thread (the Trainer calls them from
``train``). The manager's background thread writes and commits each save; a failure is
raised as :class:`async_ckpt.SaveError` by the next save, or at the latest when ``train``
returns (where all saves are waited for and the manager is closed).

Limits: one process (``world_size == 1``), no DeepSpeed/FSDP, no ``push_to_hub`` (export a
step and push that), hyperparameter-search trials keep the Trainer's own folders.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional, Union

from .. import CheckpointError, CheckpointManager, CheckpointManagerOptions
from . import IntegrationError

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("async_ckpt.integrations.hf needs transformers: pip install 'transformers==5.23.0'") from e

__all__ = ["AsyncCheckpointMixin", "AsyncCheckpointTrainer", "hf_steps_to_delete"]

_STEP_PREFIX = "checkpoint-"
_STATE_NAME = "trainer_state.json"      # what the Trainer reads from resume_from_checkpoint


def hf_steps_to_delete(steps: list[int], limit: Optional[int], best: Optional[int],
                       protect: tuple[int, ...] = ()) -> list[int]:
    """The steps ``transformers.trainer_utils.rotate_checkpoints`` would delete.

    Oldest first; the newest step and ``best`` (and ``protect``) are never deleted; at most
    ``max(limit, number protected)`` remain. ``limit`` None or <= 0 deletes nothing.
    """
    if not limit or limit <= 0:
        return []
    ordered = sorted(set(steps))
    if len(ordered) <= limit:
        return []
    protected = {ordered[-1], *protect}
    if best is not None:
        protected.add(best)
    protected &= set(ordered)
    keep = max(limit, len(protected))
    doomed: list[int] = []
    remaining = len(ordered)
    for step in ordered:
        if remaining <= keep:
            break
        if step not in protected:
            doomed.append(step)
            remaining -= 1
    return doomed


@dataclasses.dataclass
class _Resume:
    step: int
    scratch: str             # the folder handed to the Trainer as resume_from_checkpoint
    items: frozenset         # items present in the step
    rng_pending: bool = True


class AsyncCheckpointMixin:
    """Makes a ``transformers.Trainer`` (subclass) save through a :class:`CheckpointManager`.

    Extra keyword arguments (everything else goes to the Trainer):

    - ``checkpoint_dir``: the manager's root; default ``<args.output_dir>/async_ckpt``
      (a folder of its own, so the Trainer's ``checkpoint-*`` handling of ``output_dir``
      never touches our steps).
    - ``checkpoint_options``: :class:`CheckpointManagerOptions` for the IO knobs
      (compression, io_threads, snapshot, ...). Retention is the Trainer's
      (``save_total_limit``, ``metric_for_best_model``): ``max_to_keep``, ``best_metric``
      and ``keep_every_n_steps`` are replaced so the manager itself never deletes a step.

    ``train(resume_from_checkpoint=...)`` accepts ``True`` (latest committed step), a step
    number, or the path of one of our ``checkpoint-N`` folders; a path to a Trainer folder
    (with ``trainer_state.json``) is resumed by the Trainer itself.
    """

    def __init__(self, *args: Any, checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
                 checkpoint_options: Optional[CheckpointManagerOptions] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        targs = self.args
        if targs.world_size > 1:
            raise IntegrationError(f"AsyncCheckpointTrainer saves from one process; this run has "
                                   f"world_size={targs.world_size}")
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise IntegrationError("AsyncCheckpointTrainer does not checkpoint DeepSpeed/FSDP engines")
        if targs.push_to_hub:
            raise IntegrationError("push_to_hub uploads the Trainer's own folders; export a step with "
                                   "`python -m async_ckpt.integrations.export` and push that instead")
        self.checkpoint_dir = Path(checkpoint_dir if checkpoint_dir is not None
                                   else os.path.join(targs.output_dir, "async_ckpt"))
        opts = checkpoint_options or CheckpointManagerOptions()
        # The Trainer decides when to save and what to keep (hf_steps_to_delete).
        self.checkpoint_options = dataclasses.replace(opts, max_to_keep=None, best_metric=None,
                                                      keep_every_n_steps=None, save_interval_steps=1)
        self._ckpt_manager: Optional[CheckpointManager] = None
        self._ckpt_last_handle = None
        self._ckpt_resume: Optional[_Resume] = None

    # ------------------------------------------------------------------ manager

    @property
    def checkpoint_manager(self) -> CheckpointManager:
        """The manager of ``checkpoint_dir``, opened on first use and closed when ``train`` returns."""
        if self._ckpt_manager is None:
            self._ckpt_manager = CheckpointManager(self.checkpoint_dir, self.checkpoint_options)
        return self._ckpt_manager

    def _ckpt_step_dir(self, step: int) -> str:
        return str(self.checkpoint_dir / f"{_STEP_PREFIX}{step}")

    def _ckpt_step_of(self, path: Any) -> Optional[int]:
        """The step number when ``path`` names one of our step folders, else None."""
        if path is None or isinstance(path, bool):
            return None
        p = Path(path)
        if not p.name.startswith(_STEP_PREFIX) or not p.name[len(_STEP_PREFIX):].isdigit():
            return None
        try:
            if p.parent.resolve() != self.checkpoint_dir.resolve():
                return None
        except OSError:
            return None
        return int(p.name[len(_STEP_PREFIX):])

    # ------------------------------------------------------------------ saving

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Called by the Trainer (training thread) exactly where it would write ``checkpoint-N``."""
        if trial is not None and getattr(self, "hp_search_backend", None) is not None:
            return super()._save_checkpoint(model, trial)   # per-trial folders stay the Trainer's
        mgr = self.checkpoint_manager
        step = self.state.global_step
        self.store_flos()
        if step in mgr.all_steps() or (self._ckpt_last_handle is not None and self._ckpt_last_handle.step >= step):
            warnings.warn(f"async_ckpt: step {step} is already saved; not saving it again", RuntimeWarning,
                          stacklevel=2)
            return
        # As the Trainer does: best_model_checkpoint names the best step once its folder exists
        # (this save's own step counts: the state saved with it must already name it).
        best = self.state.best_global_step
        if best and (best == step or best in mgr.all_steps()):
            self.state.best_model_checkpoint = self._ckpt_step_dir(best)
        self._ckpt_update_callback_states()
        state = self._ckpt_state()
        # Rotate before queueing: deleting after it would wait for this very save to commit.
        self._ckpt_rotate(saving=step)
        self._ckpt_last_handle = mgr.save_async(step, state, metrics=self._ckpt_metrics(step), force=True)

    def _ckpt_update_callback_states(self) -> None:
        # Mirrors Trainer._save_checkpoint: ExportableState callbacks (and TrainerControl)
        # record their state in TrainerState.stateful_callbacks before it is saved.
        from transformers.trainer_callback import ExportableState

        for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
            name = cb.__class__.__name__
            if isinstance(self.state.stateful_callbacks.get(name), list):
                self.state.stateful_callbacks[name].append(cb.state())
            else:
                self.state.stateful_callbacks[name] = cb.state()

    def _ckpt_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"model": self.model, "trainer_state": dataclasses.asdict(self.state)}
        if not self.args.save_only_model:
            # The torch optimizer inside Accelerate's wrapper: the same state dict, and the
            # optimizer whose step() a lazy snapshot fences.
            if self.optimizer is not None:
                state["optimizer"] = getattr(self.optimizer, "optimizer", self.optimizer)
            if self.lr_scheduler is not None:
                state["scheduler"] = self.lr_scheduler
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                state["scaler"] = scaler
        config = config_files(self.model)
        if config:
            state["config"] = config
        import transformers

        state["integration"] = {"framework": "transformers", "version": transformers.__version__,
                                "items": sorted(state)}
        return state

    def _ckpt_metrics(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {"epoch": float(self.state.epoch or 0.0)}
        name = self.args.metric_for_best_model
        if name:
            key = name if name.startswith("eval_") else f"eval_{name}"
            for entry in reversed(self.state.log_history):
                if entry.get("step") == step and isinstance(entry.get(key), (int, float)) \
                        and not isinstance(entry.get(key), bool):
                    metrics[key] = float(entry[key])
                    break
        return metrics

    def _ckpt_best_step(self) -> Optional[int]:
        return self._ckpt_step_of(self.state.best_model_checkpoint)

    def _ckpt_rotate(self, saving: Optional[int] = None) -> None:
        """Delete what ``save_total_limit`` no longer keeps, without ever waiting on a save."""
        limit = self.args.save_total_limit
        if not limit or limit <= 0 or self._ckpt_manager is None:
            return
        if self._ckpt_last_handle is not None and not self._ckpt_last_handle.done():
            return   # deleting now would block on the write in flight; the next call catches up
        mgr = self._ckpt_manager
        committed = mgr.all_steps()
        if saving is None:
            steps, protect = committed, ()
        else:
            # The step being queued counts as the newest, but the newest committed one stays
            # until the new one has committed (a crash in between must leave a good step).
            steps, protect = committed + [saving], tuple(committed[-1:])
        for step in hf_steps_to_delete(steps, limit, self._ckpt_best_step(), protect):
            if step in committed:
                mgr.delete(step)

    # ------------------------------------------------------------------ training entry point

    def train(self, resume_from_checkpoint: Union[str, bool, int, None] = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, resuming from a committed step when asked; waits for every save
        and closes the manager before returning (raising a failed save's ``SaveError``)."""
        step = self._ckpt_resolve_resume(resume_from_checkpoint)
        if step is not None:
            resume_from_checkpoint = self._ckpt_prepare_resume(step)
        try:
            output = super().train(resume_from_checkpoint, *args, **kwargs)
        except BaseException:
            self._ckpt_close(quiet=True)
            raise
        finally:
            if self._ckpt_resume is not None:
                shutil.rmtree(self._ckpt_resume.scratch, ignore_errors=True)
                self._ckpt_resume = None
        self._ckpt_close(quiet=False)
        return output

    def _ckpt_resolve_resume(self, arg: Any) -> Optional[int]:
        if arg is None or arg is False:
            return None
        if arg is True:
            step = self.checkpoint_manager.latest_step()
            if step is None:
                raise IntegrationError(f"resume_from_checkpoint=True but {self.checkpoint_dir} holds no "
                                       "committed checkpoint")
            return step
        if isinstance(arg, int):
            return arg
        step = self._ckpt_step_of(arg)
        if step is not None:
            return step
        if os.path.isfile(os.path.join(str(arg), _STATE_NAME)):
            return None     # a Trainer folder: the Trainer resumes from it itself
        raise IntegrationError(f"resume_from_checkpoint={arg!r} is neither a step of {self.checkpoint_dir} "
                               "(checkpoint-N) nor a Trainer checkpoint folder")

    def _ckpt_prepare_resume(self, step: int) -> str:
        box: dict[str, Any] = {"trainer_state": {}, "integration": {}}
        self.checkpoint_manager.restore(box, step=step, restore_rng=False)
        ts = box["trainer_state"]
        scratch = tempfile.mkdtemp(prefix=f"async_ckpt-resume-{step}-")
        with open(os.path.join(scratch, _STATE_NAME), "w", encoding="utf-8") as f:
            json.dump(ts, f)
        self._ckpt_resume = _Resume(step, scratch, frozenset(box["integration"].get("items", ())))
        return scratch

    def _ckpt_ours(self, checkpoint: Any) -> Optional[_Resume]:
        r = self._ckpt_resume
        return r if r is not None and checkpoint is not None and str(checkpoint) == r.scratch else None

    def _ckpt_close(self, quiet: bool) -> None:
        """Wait for every save, apply the end-of-training retention, close the manager."""
        mgr = self._ckpt_manager
        if mgr is None:
            return
        try:
            mgr.wait_until_finished()
            self._ckpt_last_handle = None
            self._ckpt_rotate()
            best = self._ckpt_best_step()
            if self.args.save_total_limit == 1 and best is not None:
                # Trainer._finalize_training: with a limit of 1 only the best step survives training.
                for step in mgr.all_steps():
                    if step != best:
                        mgr.delete(step)
        except CheckpointError as e:
            if not quiet:
                raise
            # Do not mask the training loop's own exception with a save error.
            warnings.warn(f"async_ckpt: {e}", RuntimeWarning, stacklevel=3)
        finally:
            self._ckpt_manager = None
            self._ckpt_last_handle = None
            mgr.close()   # idempotent; after the wait above nothing is left to raise

    # ------------------------------------------------------------------ resuming (Trainer hooks)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Called by ``Trainer.train`` before ``accelerator.prepare``: the model weights."""
        r = self._ckpt_ours(resume_from_checkpoint)
        if r is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.checkpoint_manager.restore({"model": self.model if model is None else model},
                                        step=r.step, restore_rng=False)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """Called by the Trainer once optimizer and scheduler exist."""
        r = self._ckpt_ours(checkpoint)
        if r is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        state: dict[str, Any] = {}
        if "optimizer" in r.items and self.optimizer is not None:
            state["optimizer"] = getattr(self.optimizer, "optimizer", self.optimizer)
        if "scheduler" in r.items and self.lr_scheduler is not None:
            state["scheduler"] = self.lr_scheduler
        if state:
            self.checkpoint_manager.restore(state, step=r.step, restore_rng=False)

    def _load_scaler(self, checkpoint: Optional[str]) -> None:
        r = self._ckpt_ours(checkpoint)
        if r is None:
            return super()._load_scaler(checkpoint)
        scaler = getattr(self.accelerator, "scaler", None)
        if "scaler" in r.items and scaler is not None:
            self.checkpoint_manager.restore({"scaler": scaler}, step=r.step, restore_rng=False)

    def _load_rng_state(self, checkpoint: Optional[str]) -> None:
        """Called by the Trainer where its own resume restores RNG: before the first epoch's
        iterator starts (a resume at an epoch boundary), or right after the first fetch of a
        mid-epoch resume (the fetch builds the dataloader iterator, which draws from the global
        RNG, as the uninterrupted run did at the start of the epoch)."""
        r = self._ckpt_ours(checkpoint)
        if r is None:
            return super()._load_rng_state(checkpoint)
        if r.rng_pending:
            r.rng_pending = False
            # An empty state restores the RNG streams alone (restore puts them back last).
            self.checkpoint_manager.restore({}, step=r.step)

    def _load_best_model(self) -> None:
        """Called by the Trainer at the end of training when ``load_best_model_at_end``."""
        step = self._ckpt_best_step()
        if step is None:
            return super()._load_best_model()
        mgr = self.checkpoint_manager
        mgr.wait_until_finished()
        mgr.restore({"model": self.model}, step=step, restore_rng=False)


class AsyncCheckpointTrainer(AsyncCheckpointMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints go through async_ckpt (see the module doc)."""


def config_files(model: Any) -> dict[str, str]:
    """``config.json`` (and ``generation_config.json``) text as ``save_pretrained`` writes it.

    Like ``save_pretrained``, records the architecture and dtype in the config, on a copy:
    the live model's config is not changed.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return {}
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    dtype = getattr(model, "dtype", None)
    if dtype is not None:
        config.dtype = str(dtype).split(".")[-1]
    files = {"config.json": config.to_json_string(use_diff=True)}
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if generation is not None and callable(can_generate) and can_generate():
        files["generation_config.json"] = generation.to_json_string(use_diff=True)
    return files
