"""An Accelerate project dir through ``python -m async_ckpt.fix``, with real Accelerate.

A loop with automatic checkpoint naming calls ``accelerator.save_state()`` after steps 4
and 8: ``proj/checkpoints/checkpoint_0`` and ``checkpoint_1``. verify judges both, the step
taken from the scheduler's position (4 and 8, not the save counter 0 and 1); ``--dry-run``
leaves the tree byte-identical; fix converts both into ``proj.async_ckpt`` and writes
nothing into ``proj`` (Accelerate picks the newest entry of ``checkpoints/`` by the number
in its name: a lock file or a ``checkpoint-N`` folder there breaks it); ``load_state()``
then still resumes from its own folder; the converted step restores bitwise what
``load_state`` restores. The verdict stays PARTIAL: Accelerate records only the step.
"""

from __future__ import annotations

import random

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
from accelerate.utils import ProjectConfiguration  # noqa: E402

from async_ckpt import CheckpointManager  # noqa: E402
from async_ckpt.tools import fix, legacy, verify  # noqa: E402

import fixtures_legacy as F  # noqa: E402
from test_verify import run_cli  # noqa: E402


def prepared(proj):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    acc = accelerate.Accelerator(cpu=True, project_config=ProjectConfiguration(
        project_dir=str(proj), automatic_checkpoint_naming=True))
    model, opt, sched = acc.prepare(model, opt, sched)
    return acc, model, opt, sched


def test_accelerate_project_converted_and_accelerate_still_resumes(tmp_path):
    proj, dest = tmp_path / "proj", tmp_path / "proj.async_ckpt"
    acc, model, opt, sched = prepared(proj)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 9):
        loss = model(torch.randn(3, 4, generator=gen)).pow(2).mean()
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 4 == 0:
            acc.save_state()
    assert sorted(p.name for p in (proj / "checkpoints").iterdir()) == ["checkpoint_0", "checkpoint_1"]

    rep = verify.check_path(proj)
    assert isinstance(rep, verify.RootReport) and rep.layout == legacy.ACCELERATE_PROJECT
    assert [(r.name, r.step) for r in rep.steps] == [("checkpoints/checkpoint_1", 8), ("checkpoints/checkpoint_0", 4)]
    assert rep.steps[0].step_source == "scheduler.bin last_epoch (the scheduler's position)"

    before, source = F.tree_fingerprint(tmp_path), F.tree_fingerprint(proj)
    assert fix.main(["--dry-run", str(proj)]) == 1
    assert F.tree_fingerprint(tmp_path) == before                  # nothing written, not even a lock

    r = run_cli("async_ckpt.fix", proj)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"converted steps go to: {dest}" in r.stdout and "training state reconstructed by fix" in r.stdout
    assert F.tree_fingerprint(proj) == source and sorted(p.name for p in tmp_path.iterdir()) == \
        ["proj", "proj.async_ckpt"]
    for step in (4, 8):
        r2 = verify.check_step(dest / f"checkpoint-{step}")
        assert r2.verdict == verify.PARTIAL and r2.missing == [], r2       # PARTIAL for the step alone
        assert len(r2.reconstructed) == 1 and "only the step is known" in r2.reconstructed[0]

    # Accelerate resumes from its own folder (the newest, checkpoint_1).
    acc2, model2, opt2, sched2 = prepared(proj)
    acc2.load_state()
    py_state = random.getstate()
    assert sched2.scheduler.last_epoch == 8

    # The converted step holds exactly what load_state restored.
    torch.manual_seed(123)
    m3 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 2))
    o3 = torch.optim.AdamW(m3.parameters(), lr=5e-2)
    s3 = torch.optim.lr_scheduler.StepLR(o3, step_size=7)
    with CheckpointManager(dest) as mgr:
        assert mgr.restore({"model": m3, "optimizer": o3, "scheduler": s3}) == 8
    assert random.getstate() == py_state
    F.assert_equal(m3.state_dict(), acc2.unwrap_model(model2).state_dict())
    F.assert_equal(o3.state_dict(), opt2.optimizer.state_dict())
    F.assert_equal(s3.state_dict(), sched2.scheduler.state_dict())
