"""Accelerate: ``accelerator.save_state``/``load_state`` through a :class:`~async_ckpt.CheckpointManager`.

>>> from async_ckpt.integrations.accelerate import load_state, resume_dataloader, save_state
>>> model, opt, dl, sched = accelerator.prepare(model, opt, dl, sched)     # doctest: +SKIP
>>> progress = {"epoch": 0, "batch": 0}                   # your position, saved with the rest
>>> with CheckpointManager("runs/exp1") as mgr:
...     step = load_state(accelerator, mgr, extra={"progress": progress})   # None: fresh start
...     for epoch in range(progress["epoch"], epochs):
...         dl.set_epoch(epoch)
...         batches = resume_dataloader(accelerator, dl, progress["batch"], mgr, step)
...         for batch in batches:
...             ...                                   # forward, backward, opt.step(), sched.step()
...             progress["batch"] += 1; gstep += 1
...             save_state(accelerator, mgr, gstep, extra={"progress": progress})
...         progress.update(epoch=epoch + 1, batch=0); step = None

Why helpers and not ``register_save_state_pre_hook``: Accelerate's hooks only let one
replace how *models* are written; ``save_state`` still writes optimizers, schedulers,
samplers and RNG with ``torch.save``/pickle on the training thread. The helpers save what
``save_state`` saves (every prepared model, optimizer, scheduler, the GradScaler, objects
passed to ``register_for_checkpointing``, ``accelerator.step``) plus what it does not:
each prepared dataloader's epoch counter and seedable-sampler seed, and the RNG streams
(captured by the manager, restored with a typed tree, never unpickled). Item names follow
Accelerate's file names: ``model``, ``model_1``, ``optimizer``, ``scheduler``, ``data``,
``custom_0``, ``scaler``, ``accelerator``; ``extra`` adds your own items (a progress dict).

Data position: Accelerate's ``DataLoaderShard`` builds its iterator (which draws a seed
from the global torch RNG) and fetches one batch ahead when the first batch is requested.
An uninterrupted run did that at the start of the epoch, before it saved; a resumed run
does it after ``load_state``. :func:`resume_dataloader` skips the batches already trained
and puts the saved RNG streams back right after that first fetch, which is where the
uninterrupted run stood when it saved (at an epoch boundary, ``num_batches=0``, the
streams restored by ``load_state`` are already right). ``accelerate.skip_first_batches``
plus Accelerate's own ``load_state`` restores RNG before that draw instead. Exact
mid-epoch resume also needs a data order that does not depend on when the epoch started:
``DataLoaderConfiguration(use_seedable_sampler=True)`` (or a stateful dataloader).

Threads: everything here runs on the caller's (training) thread; ``save_state`` returns the
manager's :class:`~async_ckpt.SaveHandle` once the snapshot is taken. One process only
(``accelerator.num_processes == 1``), no DeepSpeed/FSDP/Megatron.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Optional

from .. import CheckpointManager, SaveHandle
from . import IntegrationError

__all__ = ["load_state", "resume_dataloader", "save_state"]

_ACCEL_ITEM = "accelerator"


class _DataLoaderState:
    """The resumable position of one prepared dataloader, as a stateful object.

    ``iteration`` is the epoch counter ``DataLoaderShard.__iter__`` passes to ``set_epoch``
    (Accelerate's own ``save_state`` does not keep it: a resumed run that never calls
    ``set_epoch`` would replay epoch 0's order); a ``SeedableRandomSampler`` also keeps its
    seed and epoch; a stateful dataloader (``use_stateful_dataloader``) its whole state.
    """

    def __init__(self, dataloader: Any) -> None:
        self.dataloader = dataloader

    def _sampler(self) -> Any:
        get = getattr(self.dataloader, "get_sampler", None)
        return get() if callable(get) else getattr(self.dataloader, "sampler", None)

    def state_dict(self) -> dict[str, Any]:
        dl = self.dataloader
        state: dict[str, Any] = {"iteration": int(getattr(dl, "iteration", 0))}
        sampler = self._sampler()
        if hasattr(sampler, "initial_seed") and hasattr(sampler, "epoch"):
            state["sampler"] = {"initial_seed": int(sampler.initial_seed), "epoch": int(sampler.epoch)}
        if getattr(dl, "use_stateful_dataloader", False):
            state["dataloader"] = dl.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        dl = self.dataloader
        if "iteration" in state and hasattr(dl, "iteration"):
            dl.iteration = int(state["iteration"])
        sampler = self._sampler()
        saved = state.get("sampler")
        if saved and hasattr(sampler, "initial_seed"):
            sampler.initial_seed = int(saved["initial_seed"])
            sampler.epoch = int(saved["epoch"])
        if "dataloader" in state and getattr(dl, "use_stateful_dataloader", False):
            dl.load_state_dict(state["dataloader"])


class _AcceleratorState:
    """``accelerator.step`` (the gradient-accumulation counter ``save_state`` keeps)."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        return {"step": int(self.accelerator.step)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accelerator.step = int(state["step"])


def _check(accelerator: Any) -> None:
    if getattr(accelerator, "num_processes", 1) != 1:
        raise IntegrationError(f"async_ckpt's Accelerate helpers save from one process; this run has "
                               f"{accelerator.num_processes}")
    kind = str(getattr(accelerator, "distributed_type", "NO"))
    if any(name in kind for name in ("DEEPSPEED", "FSDP", "MEGATRON")):
        raise IntegrationError(f"async_ckpt's Accelerate helpers do not checkpoint {kind} engines")
    for attr in ("_models", "_optimizers", "_schedulers", "_dataloaders", "_custom_objects"):
        if not isinstance(getattr(accelerator, attr, None), list):
            raise IntegrationError(f"this accelerate version has no Accelerator.{attr} list; "
                                   "tested with accelerate==1.15.0")


def _numbered(name: str, i: int) -> str:
    return name if i == 0 else f"{name}_{i}"   # Accelerate's file naming: model, model_1, ...


def accelerator_state(accelerator: Any) -> dict[str, Any]:
    """The items ``save_state``/``load_state`` use, as live stateful objects (restored in place)."""
    _check(accelerator)
    state: dict[str, Any] = {}
    for i, model in enumerate(accelerator._models):
        state[_numbered("model", i)] = accelerator.unwrap_model(model)
    # The wrapped torch optimizer/scheduler: same state dicts, and a lazy snapshot can then
    # fence the step that torch actually runs.
    for i, opt in enumerate(accelerator._optimizers):
        state[_numbered("optimizer", i)] = getattr(opt, "optimizer", opt)
    for i, sched in enumerate(accelerator._schedulers):
        state[_numbered("scheduler", i)] = getattr(sched, "scheduler", sched)
    for i, dl in enumerate(accelerator._dataloaders):
        state[_numbered("data", i)] = _DataLoaderState(dl)
    for i, obj in enumerate(accelerator._custom_objects):
        state[f"custom_{i}"] = obj
    if getattr(accelerator, "scaler", None) is not None:
        state["scaler"] = accelerator.scaler
    state[_ACCEL_ITEM] = _AcceleratorState(accelerator)
    return state


def _with_extra(state: dict[str, Any], extra: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    for name, value in (extra or {}).items():
        if name in state or name == "rng":
            raise IntegrationError(f"extra item {name!r} collides with an item async_ckpt saves itself "
                                   f"({sorted(state)} and 'rng')")
        state[name] = value
    return state


def save_state(accelerator: Any, manager: CheckpointManager, step: int, *,
               metrics: Optional[Mapping[str, float]] = None, extra: Optional[Mapping[str, Any]] = None,
               force: bool = True) -> SaveHandle:
    """Save what ``accelerator.save_state`` saves (and ``extra``) as ``step``, asynchronously.

    Called on the training thread; returns once the snapshot is taken (the manager's
    handle). ``force=False`` lets the manager's ``save_interval_steps`` skip the step.
    """
    state = _with_extra(accelerator_state(accelerator), extra)
    return manager.save_async(step, state, metrics=metrics, force=force)


def load_state(accelerator: Any, manager: CheckpointManager, step: Optional[int] = None, *,
               extra: Optional[Mapping[str, Any]] = None) -> Optional[int]:
    """Restore a step saved by :func:`save_state` in place (latest when ``step`` is None).

    Returns the step, or None when nothing is committed. Models, optimizers, schedulers,
    scaler, registered objects, dataloader positions, ``accelerator.step``, ``extra`` (a
    dict is updated in place) and then the RNG streams are restored. A mid-epoch resume
    then iterates through :func:`resume_dataloader`.
    """
    state = _with_extra(accelerator_state(accelerator), extra)
    return manager.restore(state, step=step)


def resume_dataloader(accelerator: Any, dataloader: Any, num_batches: int,
                      manager: Optional[CheckpointManager] = None, step: Optional[int] = None) -> Iterator[Any]:
    """Iterate ``dataloader`` from batch ``num_batches`` on, exactly as the saved run would have.

    ``accelerator.skip_first_batches`` does the skipping. When ``num_batches > 0`` and
    ``step`` names the restored step, the RNG streams of that step are put back right
    after the first batch is fetched: building the iterator draws from the global RNG
    and fetches one batch ahead, which the uninterrupted run did before it saved. With
    ``num_batches == 0`` (or no ``step``) this is plain iteration.
    """
    if num_batches < 0:
        raise ValueError(f"num_batches must be >= 0, got {num_batches}")
    if num_batches == 0 or step is None:
        yield from dataloader
        return
    if manager is None:
        raise ValueError("resume_dataloader needs the manager to restore the RNG of step")
    iterator = iter(accelerator.skip_first_batches(dataloader, num_batches))
    first = next(iterator, _END)
    manager.restore({}, step=step)   # an empty state restores the RNG streams alone
    if first is _END:
        return
    yield first
    yield from iterator


_END = object()
