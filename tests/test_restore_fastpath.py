"""The restore paths that many small tensors take: typed views of shared chunks, the
in-place copy of dicts of tensors, the collector pause. Every case is checked bitwise."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions
from async_ckpt.errors import RestoreError
from async_ckpt.gc_pause import paused_gc


def _mixed_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "scalar": torch.randn((), generator=g),
        "vec": torch.randn(7, generator=g),
        "cube": torch.randn(3, 4, 5, generator=g),
        "bf16": torch.randn(9, generator=g).to(torch.bfloat16),
        "ids": torch.randint(0, 1 << 40, (5,), generator=g),
        "mask": torch.rand(13, generator=g) > 0.5,
        "bytes": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=g),
        "half_mat": torch.randn(2, 3, generator=g).half(),
    }
    tensors["tied"] = tensors["vec"]
    arrays = {"np_f64": np.random.default_rng(seed).standard_normal((2, 3)),
              "np_i16": np.arange(5, dtype=np.int16) * seed}
    return {"model": tensors, "extra": arrays, "many": [torch.full((i % 5 + 1,), float(i + seed)) for i in range(50)]}


def _assert_bitwise(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a, b.view(-1).view(torch.uint8) if b.numel() else b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_bitwise(a[k], b[k])
    else:
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_bitwise(x, y)


@pytest.mark.parametrize("atomic", [True, False])
def test_mixed_small_arrays_restore_bitwise_in_place(tmp_path, atomic):
    saved = _mixed_state(1)
    with CheckpointManager(tmp_path, CheckpointManagerOptions(handle_sigterm=False)) as mgr:
        mgr.save(1, saved)
        live = _mixed_state(2)
        ids = {k: id(v) for k, v in live["model"].items()}
        assert mgr.restore(live, step=1, atomic=atomic) == 1
    _assert_bitwise(live, saved)
    assert {k: id(v) for k, v in live["model"].items()} == ids     # restored in place
    assert live["model"]["tied"] is live["model"]["vec"]


def test_load_returns_views_with_declared_shapes_and_dtypes(tmp_path):
    saved = _mixed_state(3)
    with CheckpointManager(tmp_path, CheckpointManagerOptions(handle_sigterm=False)) as mgr:
        mgr.save(1, saved)
        loaded = mgr.load(1)
    _assert_bitwise({k: loaded[k] for k in saved}, saved)
    assert loaded["model"]["tied"] is loaded["model"]["vec"]


def test_shape_mismatch_in_a_dict_of_tensors_is_refused_before_anything_changes(tmp_path):
    saved = _mixed_state(4)
    with CheckpointManager(tmp_path, CheckpointManagerOptions(handle_sigterm=False)) as mgr:
        mgr.save(1, saved)
        live = _mixed_state(5)
        live["model"]["cube"] = torch.zeros(3, 4, 6)
        before = {k: v.clone() for k, v in live["model"].items()}
        with pytest.raises(RestoreError, match=r"model\['cube'\]: shape \(3, 4, 5\) in checkpoint"):
            mgr.restore(live, step=1)
    for k, v in before.items():
        assert torch.equal(live["model"][k], v), k


def test_restore_leaves_the_collector_as_it_found_it(tmp_path):
    with CheckpointManager(tmp_path, CheckpointManagerOptions(handle_sigterm=False)) as mgr:
        mgr.save(1, _mixed_state(6))
        assert gc.isenabled()
        mgr.restore(_mixed_state(7), step=1)
        assert gc.isenabled()
        with pytest.raises(RestoreError):
            mgr.restore({"model": {"cube": torch.zeros(1)}}, step=1)
        assert gc.isenabled()
        gc.disable()
        try:
            mgr.restore(_mixed_state(8), step=1)
            assert not gc.isenabled()       # a caller that disabled it keeps it disabled
        finally:
            gc.enable()


def test_paused_gc_nests_and_restores_on_error():
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with paused_gc():
            assert not gc.isenabled()
            with paused_gc():
                assert not gc.isenabled()
            assert not gc.isenabled()        # only the outermost block re-enables
            raise KeyError("x")
    assert gc.isenabled()
