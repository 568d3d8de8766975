"""Lightning + AsyncCheckpointIO: exact resume, ModelCheckpoint semantics, prompt errors.

A small MLP with dropout trains on shuffled data (RandomSampler draws its epoch order from
the global RNG) for 4 epochs with `ModelCheckpoint(monitor="val_loss", save_top_k=2,
save_last=True)`. A second run is SIGKILLed in another process during epoch 2; a third
resumes `fit(ckpt_path=".../last.ckpt")`: losses, parameters and optimizer state must be
bitwise equal to the straight run. Lightning's own TorchCheckpointIO saves no RNG, so the
same resume through it diverges: checked too, as the reason the rng item exists.

Run as a script (`python tests/test_integration_lightning.py worker DIR`) it is the worker
that gets killed.
"""

import logging
import os
import signal
import subprocess
import sys
import threading

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from async_ckpt import CheckpointManager, CheckpointManagerOptions, SaveError
from async_ckpt.integrations import IntegrationError
from async_ckpt.integrations.export import main as export_main
from async_ckpt.integrations.lightning import AsyncCheckpointIO
from bitwise import bits, same

for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
    logging.getLogger(name).setLevel(logging.ERROR)
pytestmark = [pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
              pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")]

EPOCHS, BATCHES = 4, 10      # 40 samples, batch 4


class Net(pl.LightningModule):
    def __init__(self, lr=0.01, width=16):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Dropout(0.2), torch.nn.Linear(width, 1))
        self.losses = {}

    def training_step(self, batch, i):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.losses[self.global_step] = loss.detach().clone()
        return loss

    def validation_step(self, batch, i):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return [opt], [{"scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.7), "interval": "step"}]


class Die(Callback):
    """During epoch 2: wait until the saves have committed and are linked, then SIGKILL."""

    def __init__(self, plugin, at):
        self.plugin, self.at = plugin, at

    def on_train_batch_start(self, trainer, module, batch, i):
        if trainer.global_step == self.at:
            if self.plugin is not None:
                self.plugin.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("simulated crash")


def fit(root, plugin=None, ckpt_path=None, stop=None, model_seed=0):
    torch.manual_seed(model_seed)
    module = Net()
    pl.seed_everything(0, verbose=False)
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(40, 8, generator=gen), torch.randn(40, 1, generator=gen))
    train = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    val = torch.utils.data.DataLoader(data, batch_size=8)
    ckpt = ModelCheckpoint(dirpath=root, monitor="val_loss", save_top_k=2, save_last=True)
    callbacks = [ckpt] + ([Die(plugin, stop)] if stop is not None else [])
    trainer = pl.Trainer(max_epochs=EPOCHS, plugins=[plugin] if plugin else [], callbacks=callbacks,
                         enable_progress_bar=False, enable_model_summary=False, logger=False,
                         default_root_dir=root, deterministic=True)
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    return trainer, module, ckpt


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    return (root, *fit(str(root), AsyncCheckpointIO()))


def test_sigkill_then_fit_from_last_is_bitwise_identical(straight, tmp_path):
    _, trainer, module, _ = straight
    root = tmp_path / "run"
    proc = subprocess.run([sys.executable, __file__, "worker", str(root)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # The kill came after the epoch-1 saves committed: last.ckpt names a committed step.
    assert os.path.islink(root / "last.ckpt") and os.path.isdir(root / "last.ckpt")
    r_trainer, r_module, _ = fit(str(root), AsyncCheckpointIO(), ckpt_path=str(root / "last.ckpt"), model_seed=1)
    assert min(r_module.losses) == 2 * BATCHES        # resumed at the start of epoch 2
    for step, loss in r_module.losses.items():
        assert same(module.losses[step], loss), f"loss of step {step}"
    assert same(module.state_dict(), r_module.state_dict())
    assert same(trainer.optimizers[0].state_dict(), r_trainer.optimizers[0].state_dict())
    assert r_trainer.global_step == trainer.global_step == EPOCHS * BATCHES


def test_lightnings_own_checkpoint_io_does_not_resume_exactly(straight, tmp_path):
    """Same crash and resume through TorchCheckpointIO: no RNG in the checkpoint, so the
    resumed epochs draw another data order and other dropout masks."""
    _, _, module, _ = straight
    root = str(tmp_path / "plain")
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(root, stop=2 * BATCHES + 3)
    _, r_module, _ = fit(root, ckpt_path=os.path.join(root, "last.ckpt"), model_seed=1)
    assert min(r_module.losses) == 2 * BATCHES
    assert not same(module.losses[2 * BATCHES], r_module.losses[2 * BATCHES])


def test_top_k_and_last_are_links_to_exactly_the_kept_steps(straight, tmp_path):
    root, _, module, ckpt = straight
    names = sorted(os.listdir(root))
    kept = sorted(os.path.basename(p) for p in ckpt.best_k_models) + ["last.ckpt"]
    assert names == sorted(kept + ["async_ckpt"])
    targets = {os.path.realpath(root / n) for n in kept}
    with CheckpointManager(root / "async_ckpt") as mgr:     # teardown released the root
        steps = {str(root / "async_ckpt" / f"checkpoint-{s}") for s in mgr.all_steps()}
    assert targets == steps                       # nothing leaked, nothing missing
    # validate() loads through the plugin; the dict is Lightning's own.
    plugin = AsyncCheckpointIO()
    loaded = plugin.load_checkpoint(ckpt.best_model_path)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "epoch",
            "global_step", "hyper_parameters"} <= set(loaded)
    assert loaded["hyper_parameters"] == {"lr": 0.01, "width": 16}
    last = plugin.load_checkpoint(root / "last.ckpt")
    assert same(last["state_dict"], module.state_dict())
    # And export reads the same step as a plain state dict.
    out = tmp_path / "export"
    assert export_main([str(root / "async_ckpt"), "--format", "torch", "--out", str(out)]) == 0
    assert same(torch.load(out / "pytorch_model.bin", weights_only=True), module.state_dict())


class Gate:
    """Wraps a real SaveHandle: result() waits for the test to open the gate (or fails)."""

    def __init__(self, handle, error=None):
        self.handle, self.error, self.open = handle, error, threading.Event()

    def done(self):
        return self.open.is_set() and self.handle.done()

    def result(self, timeout=None):
        assert self.open.wait(30)
        if self.error is not None:
            raise self.error
        return self.handle.result(timeout)


def gated(plugin, monkeypatch, error=None):
    gates = []
    real = plugin.manager.save_async

    def save_async(*args, **kwargs):
        gates.append(Gate(real(*args, **kwargs), error))
        return gates[-1]

    monkeypatch.setattr(plugin.manager, "save_async", save_async)
    return gates


def state(i):
    return {"state_dict": {"w": torch.full((4,), float(i))}, "epoch": 0, "global_step": i}


def test_remove_while_the_save_is_in_flight(tmp_path, monkeypatch):
    plugin = AsyncCheckpointIO(tmp_path / "root", CheckpointManagerOptions(handle_sigterm=False))
    gates = gated(plugin, monkeypatch)
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    plugin.save_checkpoint(state(1), a)
    gates[0].open.set()
    plugin.wait_until_finished()
    assert os.path.isdir(a)
    plugin.save_checkpoint(state(2), a)      # overwrite a; still writing
    plugin.save_checkpoint(state(3), b)
    assert same(plugin.manager.load(0)["model"]["w"], torch.full((4,), 1.0))
    plugin.remove_checkpoint(b)              # returns at once, b never appears
    assert not os.path.lexists(b)
    assert os.path.realpath(a).endswith("checkpoint-0")   # a still names the committed step
    for g in gates:
        g.open.set()
    plugin.wait_until_finished()
    assert not os.path.lexists(b)
    assert os.path.realpath(a).endswith("checkpoint-1")
    assert plugin.manager.all_steps() == [1]              # step 0 (old a) and 2 (b) deleted
    assert same(plugin.load_checkpoint(a)["state_dict"]["w"], torch.full((4,), 2.0))
    plugin.teardown()


def test_a_failed_save_is_raised_once_and_never_linked(tmp_path, monkeypatch):
    plugin = AsyncCheckpointIO(tmp_path / "root", CheckpointManagerOptions(handle_sigterm=False))
    gates = gated(plugin, monkeypatch, error=SaveError("disk on fire", step=0))
    plugin.save_checkpoint(state(1), tmp_path / "a.ckpt")
    gates[0].open.set()
    with pytest.raises(SaveError, match="disk on fire"):
        plugin.wait_until_finished()
    assert not os.path.lexists(tmp_path / "a.ckpt")
    plugin.remove_checkpoint(tmp_path / "a.ckpt")       # raised once: not again
    plugin.teardown()


def test_what_cannot_be_saved_is_named(tmp_path):
    plugin = AsyncCheckpointIO(tmp_path / "root")
    with pytest.raises(TypeError, match=r"\['hyper_parameters'\]\['act'\].*save_hyperparameters\(ignore"):
        plugin.save_checkpoint({"state_dict": {}, "hyper_parameters": {"act": torch.nn.ReLU()}},
                               tmp_path / "x.ckpt")
    with pytest.raises(IntegrationError, match="snapshot='eager'"):
        AsyncCheckpointIO(options=CheckpointManagerOptions(snapshot="lazy"))
    plugin.teardown()
    assert not os.path.lexists(tmp_path / "x.ckpt")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    plugin = AsyncCheckpointIO()
    fit(sys.argv[2], plugin, stop=2 * BATCHES + 3)
