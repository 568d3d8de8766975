"""Lazy snapshots: save_async returns before the copy; the next optimizer step is fenced."""

import threading
import time

import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions
from async_ckpt.pipeline.snapshot import Snapshot


def lazy_opts(**kw):
    return CheckpointManagerOptions(snapshot="lazy", io_threads=2, **kw)


def make(n=1 << 20):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, n // 1024), torch.nn.BatchNorm1d(n // 1024))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    return model, opt


def step(model, opt):
    loss = model(torch.randn(8, 1024)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.fixture
def slow_copier(monkeypatch):
    """Slow the background copy down, so that a fence is what makes a test pass."""
    import async_ckpt.pipeline.snapshot as snap_mod
    real = snap_mod._copy_cpu

    def slow_copy(*args, **kwargs):
        if threading.current_thread().name.startswith("async_ckpt-snapshot"):
            time.sleep(0.3)
        real(*args, **kwargs)

    monkeypatch.setattr(snap_mod, "_copy_cpu", slow_copy)


def test_mutation_through_optimizer_waits_for_the_copy(tmp_path, monkeypatch, slow_copier):
    model, opt = make()
    step(model, opt)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_mom = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    fenced = []
    real_fence = Snapshot.fence
    monkeypatch.setattr(Snapshot, "fence", lambda self: (fenced.append(1), real_fence(self))[1])

    with CheckpointManager(tmp_path, lazy_opts()) as mgr:
        t0 = time.perf_counter()
        h = mgr.save_async(1, {"model": model, "optimizer": opt})
        assert time.perf_counter() - t0 < 0.3        # returned before the (slowed) copy finished
        step(model, opt)                              # forward mutates BN stats; opt.step is fenced
        assert fenced, "the optimizer step must pass through the fence"
        h.result()
        tree = mgr.load(1)
    for k, v in expected.items():
        assert torch.equal(tree["model"][k], v), k
    for i, mom in enumerate(expected_mom):
        assert torch.equal(tree["optimizer"]["state"][i]["momentum_buffer"], mom)
    # and training really moved on afterwards
    assert not torch.equal(model[0].weight, expected["0.weight"])


def test_wait_for_snapshot_for_mutations_outside_the_optimizer(tmp_path):
    model, opt = make(1 << 14)
    with CheckpointManager(tmp_path, lazy_opts()) as mgr:
        before = model[0].weight.detach().clone()
        mgr.save_async(0, {"model": model, "optimizer": opt})
        mgr.wait_for_snapshot()
        with torch.no_grad():
            model[0].weight.add_(1.0)                 # e.g. an EMA or weight surgery
        mgr.wait_until_finished()
        assert torch.equal(mgr.load(0)["model"]["0.weight"], before)


def test_lazy_and_eager_write_identical_bytes(tmp_path):
    model, opt = make(1 << 14)
    step(model, opt)
    with CheckpointManager(tmp_path / "lazy", lazy_opts()) as a:
        a.save(3, {"model": model, "optimizer": opt})
        la = a.load(3)
    with CheckpointManager(tmp_path / "eager", CheckpointManagerOptions(io_threads=2)) as b:
        b.save(3, {"model": model, "optimizer": opt})
        lb = b.load(3)
    for k in la["model"]:
        assert torch.equal(la["model"][k], lb["model"][k])


def test_hooks_removed_on_close(tmp_path):
    model, opt = make(1 << 12)
    mgr = CheckpointManager(tmp_path, lazy_opts())
    mgr.save_async(0, {"model": model, "optimizer": opt})
    assert len(opt._optimizer_step_pre_hooks) == 1
    mgr.close()
    assert len(opt._optimizer_step_pre_hooks) == 0


def test_restore_waits_for_a_lazy_copy_of_the_tensors_it_overwrites(tmp_path, slow_copier):
    model, opt = make()
    step(model, opt)
    with CheckpointManager(tmp_path, lazy_opts(max_inflight_saves=2)) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        step(model, opt)
        want = {k: v.clone() for k, v in model.state_dict().items()}
        mgr.save_async(2, {"model": model, "optimizer": opt})    # the weights' copy is still to come
        mgr.restore({"model": model, "optimizer": opt}, step=1)   # overwrites them in place
        mgr.wait_until_finished()
        got = mgr.load(2)["model"]
    for k, v in want.items():
        assert torch.equal(got[k], v), k
