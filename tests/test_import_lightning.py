"""A folder of Lightning ``.ckpt`` files through ``python -m async_ckpt.fix``, with real Lightning.

Two epochs with ``ModelCheckpoint(save_top_k=-1, save_last=True)`` leave
``epoch=0-step=4.ckpt``, ``epoch=1-step=8.ckpt`` and ``last.ckpt``. verify judges each
(optimizer and scheduler found in ``optimizer_states`` / ``lr_schedulers``, the step from
``global_step``); ``--dry-run`` leaves the tree byte-identical; fix converts them into
``ckpts.async_ckpt`` (step 8 once) and changes nothing in the folder; Lightning still
resumes from it with ``ckpt_path="last"``; the converted step restores into the module,
optimizer and scheduler that ``configure_optimizers`` builds, bitwise equal to the file.
"""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")
from pytorch_lightning.callbacks import ModelCheckpoint  # noqa: E402

from async_ckpt import CheckpointManager  # noqa: E402
from async_ckpt.tools import fix, legacy, verify  # noqa: E402

import fixtures_legacy as F  # noqa: E402
from test_verify import run_cli  # noqa: E402


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.l1, self.drop, self.l2 = torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 2)
        self.batches = 0

    def training_step(self, batch, batch_idx):
        self.batches += 1
        x, y = batch
        return torch.nn.functional.mse_loss(self.l2(self.drop(torch.relu(self.l1(x)))), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(root, epochs, ckpt_path=None):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 2))
    model = Net()
    trainer = pl.Trainer(max_epochs=epochs, default_root_dir=str(root), logger=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1,
                         callbacks=[ModelCheckpoint(dirpath=str(root / "ckpts"), save_top_k=-1, save_last=True)])
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
    return trainer


def test_lightning_folder_converted_and_lightning_still_resumes(tmp_path):
    fit(tmp_path, 2)
    ckpts, dest = tmp_path / "ckpts", tmp_path / "ckpts.async_ckpt"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]

    rep = verify.check_path(ckpts)
    assert isinstance(rep, verify.RootReport) and rep.layout == legacy.LIGHTNING_DIR
    assert [(r.name, r.step) for r in rep.steps] == [("epoch=1-step=8.ckpt", 8), ("last.ckpt", 8),
                                                     ("epoch=0-step=4.ckpt", 4)]
    for r in rep.steps:
        assert r.layout == legacy.LIGHTNING and r.step_source == f"{r.name}['global_step']"
        present = {c.kind for c in r.components if c.present}
        assert {"model", "optimizer", "scheduler", "progress"} <= present, present
        assert r.missing == ["RNG states missing: dropout and shuffling will differ"]   # Lightning saves none

    before, source = F.tree_fingerprint(tmp_path), F.tree_fingerprint(ckpts)
    assert fix.main(["--dry-run", str(ckpts)]) == 1
    assert F.tree_fingerprint(tmp_path) == before                  # nothing written, not even a lock

    r = run_cli("async_ckpt.fix", ckpts)
    assert r.returncode == 1, r.stdout + r.stderr          # the RNG is derived from a seed: PARTIAL, said so
    assert f"converted steps go to: {dest}" in r.stdout
    assert "last.ckpt: step 8 again, as in epoch=1-step=8.ckpt" in r.stdout
    assert F.tree_fingerprint(ckpts) == source and sorted(p.name for p in tmp_path.iterdir()) == \
        ["ckpts", "ckpts.async_ckpt"]
    with CheckpointManager(dest) as mgr:
        assert mgr.all_steps() == [4, 8]
        for step, name in ((4, "epoch=0-step=4.ckpt"), (8, "epoch=1-step=8.ckpt")):
            model = Net()
            conf = model.configure_optimizers()
            opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
            mgr.restore({"model": model, "optimizer": opt, "scheduler": sched}, step=step)
            saved = legacy.safe_torch_load(ckpts / name)
            F.assert_equal(model.state_dict(), dict(saved["state_dict"]))
            F.assert_equal(opt.state_dict(), saved["optimizer_states"][0])
            F.assert_equal(sched.state_dict(), saved["lr_schedulers"][0])
        assert mgr.load(8)["progress"] == {"step": 8, "global_step": 8, "epoch": 1}

    # Lightning finds and resumes its own last checkpoint, as if fix had never run.
    resumed = fit(tmp_path, 3, ckpt_path="last")
    assert resumed.global_step == 12 and resumed.lightning_module.batches == 4   # epoch 3 only
