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


# --- device checksums and grouped copies (csrc/cuda/, async_ckpt/device_copy.py) ----------

import numpy as np  # noqa: E402

from async_ckpt import native  # noqa: E402
from async_ckpt.pipeline import device_copy
from async_ckpt.pipeline import device_crc
from native_helpers import chunk_pieces_with_gaps  # noqa: E402

needs_module = pytest.mark.skipif(device_crc.module_path() is None,
                                  reason="the CUDA module was not built (no nvcc at install time)")


@needs_module
@pytest.mark.parametrize("seed", range(6))
def test_kernel_matches_the_host_crc32c(seed):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 3 << 20)) if seed else (64 << 20) + 5
    data = torch.from_numpy(rng.integers(0, 256, size, dtype=np.uint8))
    chunk_len = int(rng.integers(1, size + 1))
    gaps = sorted(set(int(g) for g in rng.integers(0, size, 5)))
    staged = data.clone()
    staged[gaps] = 0
    on_device = data.cuda()
    rows, lens = chunk_pieces_with_gaps(on_device.data_ptr(), size, chunk_len, gaps)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    out, _ = device_crc.launch(device_crc.pieces_array(rows), lens, stream, 0)
    stream.synchronize()
    host = staged.numpy()
    want = [native.crc32c(host[s:s + chunk_len]) for s in range(0, size, chunk_len)]
    assert out.numpy().view(np.uint32).tolist() == want


@needs_module
def test_self_test_passes_on_this_device():
    assert device_crc.available(torch.cuda.current_device())


@needs_module
@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_saves_use_device_crcs_group_by_group(tmp_path, monkeypatch, mode):
    monkeypatch.setenv(device_crc.ENV, "check")          # the writer re-checks every device word
    monkeypatch.setattr(device_copy, "GROUP_BYTES", 1 << 20)
    launches = []
    real = device_crc.launch
    monkeypatch.setattr(device_crc, "launch", lambda *a: (launches.append(len(a[1])), real(*a))[1])
    model, opt = make()
    step(model, opt)
    extra = {"t": torch.randn(300, 7, device="cuda").t(),                   # non-contiguous
             "cpu": torch.arange(10.0), "small": torch.ones(3, device="cuda", dtype=torch.bfloat16)}
    state = {"model": model, "optimizer": opt, "extra": extra}
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with CheckpointManager(tmp_path, CheckpointManagerOptions(snapshot=mode, chunk_bytes=1 << 20)) as mgr:
        mgr.save_async(1, state).result()
        tree = mgr.load(1)
    assert len(launches) >= 2 and sum(launches) >= 2
    for k, v in expected.items():
        assert torch.equal(tree["model"][k], v), k
    assert torch.equal(tree["extra"]["t"], extra["t"].cpu())
    assert torch.equal(tree["extra"]["cpu"], extra["cpu"])
