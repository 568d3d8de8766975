"""Accelerate + async_ckpt helpers: a resumed loop continues bit for bit.

The loop Accelerate documents (prepare, seedable sampler, `set_epoch`, skip the batches
already trained) with a dropout MLP, AdamW and a step LR schedule, saving every 4 steps.
A run is SIGKILLed mid-epoch in another process; another, stopped at an epoch boundary,
crashes in this one; each resumes from its latest committed step with other initial
weights and must match the straight run bitwise (losses, parameters, optimizer state,
`accelerator.step`). Accelerate's own save_state/load_state in the same loop does not: see
`test_accelerates_own_resume_diverges`.

Run as a script (`python tests/test_integration_accelerate.py worker ROOT STOP`) it is the
worker that gets killed.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from async_ckpt import CheckpointManager, CheckpointManagerOptions
from async_ckpt.integrations import IntegrationError
from async_ckpt.integrations.accelerate import load_state, resume_dataloader, save_state
from bitwise import bits, same

EPOCHS, BATCHES, SAVE_EVERY = 3, 10, 4


class Scale(torch.nn.Module):
    """A registered custom object (accelerator.register_for_checkpointing)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))


def run(root, mode="ours", stop=None, kill=False, resume=False):
    """Train; returns (losses by step, model, optimizer, accelerator, custom object)."""
    set_seed(0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 8, generator=gen), torch.randn(40, 1, generator=gen)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    if resume:
        with torch.no_grad():               # other weights: the restore has to overwrite them
            for p in model.parameters():
                p.add_(1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.7)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    model, opt, dl, sched = acc.prepare(model, opt, dl, sched)
    scale = Scale()
    acc.register_for_checkpointing(scale)
    progress = {"epoch": 0, "batch": 0, "step": 0}
    losses = {}
    mgr = CheckpointManager(root, CheckpointManagerOptions(handle_sigterm=False)) if mode == "ours" else None
    restored = None
    if resume and mode == "ours":
        restored = load_state(acc, mgr, extra={"progress": progress})
    elif resume:
        last = max(os.listdir(root), key=lambda d: int(d.split("-")[1]))
        acc.load_state(os.path.join(root, last))
        with open(os.path.join(root, last, "progress.json")) as f:
            progress.update(json.load(f))
    try:
        for epoch in range(progress["epoch"], EPOCHS):
            dl.set_epoch(epoch)
            if mode == "ours":
                batches = resume_dataloader(acc, dl, progress["batch"], mgr, restored)
            else:           # Accelerate's documented way
                batches = acc.skip_first_batches(dl, progress["batch"]) if progress["batch"] else dl
            for xb, yb in batches:
                if progress["step"] == stop:
                    if mgr is not None:
                        mgr.wait_until_finished()
                    if kill:
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise RuntimeError("simulated crash")
                loss = torch.nn.functional.mse_loss(model(xb), yb)
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
                scale.count += 1
                progress["step"] += 1
                progress["batch"] += 1
                losses[progress["step"]] = loss.detach().clone()
                if progress["step"] % SAVE_EVERY == 0:
                    if mode == "ours":
                        save_state(acc, mgr, progress["step"], extra={"progress": progress})
                    else:
                        out = os.path.join(root, f"ckpt-{progress['step']}")
                        acc.save_state(out)
                        with open(os.path.join(out, "progress.json"), "w") as f:
                            json.dump(progress, f)
            progress.update(epoch=epoch + 1, batch=0)
            restored = None
    finally:
        if mgr is not None:
            mgr.close()
    return losses, acc.unwrap_model(model), opt, acc, scale


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return run(str(tmp_path_factory.mktemp("straight")))


def check_resumed(straight, resumed, resumed_from):
    losses, model, opt, acc, scale = straight
    r_losses, r_model, r_opt, r_acc, r_scale = resumed
    assert min(r_losses) == resumed_from + 1 and max(r_losses) == EPOCHS * BATCHES
    for step, loss in r_losses.items():
        assert same(losses[step], loss), f"loss of step {step}"
    assert same(model.state_dict(), r_model.state_dict())
    assert same(opt.state_dict(), r_opt.state_dict())
    assert r_acc.step == acc.step and int(r_scale.count) == int(scale.count) == EPOCHS * BATCHES


def test_sigkill_mid_epoch_then_resume_is_bitwise_identical(straight, tmp_path):
    root = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, __file__, "worker", root, "15"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # Steps 4, 8, 12 committed; 12 is batch 2 of epoch 1.
    check_resumed(straight, run(root, resume=True), resumed_from=12)


def test_crash_at_an_epoch_boundary_then_resume_is_bitwise_identical(straight, tmp_path):
    root = str(tmp_path / "run")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(root, stop=21)          # step 20 (the end of epoch 1) committed
    check_resumed(straight, run(root, resume=True), resumed_from=20)


@pytest.mark.parametrize("stop, resumed_from", [(15, 12), (21, 20)])
def test_accelerates_own_resume_diverges(straight, tmp_path, stop, resumed_from):
    """Accelerate's load_state restores RNG before skip_first_batches builds the iterator,
    which draws from the global RNG; the uninterrupted run drew that at the epoch start."""
    root = str(tmp_path / "plain")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(root, mode="accelerate", stop=stop)
    losses = run(root, mode="accelerate", resume=True)[0]
    assert min(losses) == resumed_from + 1
    assert not all(same(straight[0][s], losses[s]) for s in losses)


def test_extra_items_may_not_shadow_ours(tmp_path):
    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 2))
    with CheckpointManager(tmp_path / "root", CheckpointManagerOptions(handle_sigterm=False)) as mgr:
        with pytest.raises(IntegrationError, match="collides"):
            save_state(acc, mgr, 0, extra={"model": {}})
        assert load_state(acc, mgr) is None           # nothing committed yet
        save_state(acc, mgr, 1).result()
        with torch.no_grad():
            model.weight.add_(1)
        assert load_state(acc, mgr) == 1
    assert mgr.all_steps() == [1]


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    run(sys.argv[2], stop=int(sys.argv[3]), kill=True)
