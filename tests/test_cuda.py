"""GPU snapshots: side-stream copies into the pinned pool, eager and lazy.

Run on a machine with a CUDA device (the device tool); CI has none, so every test here
is skipped with the reason.
"""

import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def make(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.BatchNorm1d(512)).cuda().to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def step(model, opt):
    x = torch.randn(64, 512, device="cuda", dtype=next(model.parameters()).dtype)
    loss = model(x).float().square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("mode", ["eager", "lazy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_state_round_trips_and_is_not_raced(tmp_path, mode, dtype):
    model, opt = make(dtype)
    step(model, opt)
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path, CheckpointManagerOptions(snapshot=mode)) as mgr:
        assert mgr._pool.pin_memory
        h = mgr.save_async(1, {"model": model, "optimizer": opt})
        step(model, opt)            # forward updates BN stats, step updates weights: both after the save
        h.result()
        tree = mgr.load(1)
    for k, v in expected.items():
        assert torch.equal(tree["model"][k], v), k


def test_gpu_rng_and_restore_into_device_model(tmp_path):
    model, opt = make()
    step(model, opt)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(0, {"model": model, "optimizer": opt})
        expect = torch.rand(4, device="cuda")
        torch.rand(100, device="cuda")
        other, other_opt = make()
        mgr.restore({"model": other, "optimizer": other_opt})
        assert torch.equal(torch.rand(4, device="cuda"), expect)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b) and b.is_cuda
