"""The layout cache: reused while nothing that shapes the layout changed, rebuilt on any change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions
from async_ckpt.pipeline.plan import LayoutCache, plan_save

CHUNK = 1 << 16


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(300, 100), torch.nn.LayerNorm(100), torch.nn.Linear(100, 10))


def layout(plan):
    return plan.offsets, plan.chunks, plan.parts, plan.staging_bytes, plan.chunk_ends, plan.frozen_from


def state_of(m, opt, **extra):
    return {"model": m, "optimizer": opt, "progress": {"step": 1}, **extra}


def test_reused_when_nothing_changed_and_equal_to_a_fresh_plan():
    m = model()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 300)).sum().backward()
    opt.step()
    cache = LayoutCache()
    first = plan_save(state_of(m, opt), CHUNK, cache=cache)
    opt.step()                                    # values change, structure does not
    second = plan_save(state_of(m, opt), CHUNK, cache=cache)
    assert cache.hits == 1 and cache.misses == 1
    assert layout(second) == layout(first) == layout(plan_save(state_of(m, opt), CHUNK))
    assert second.arrays[0].value is not None and second.tree is not first.tree


def _changes():
    """(description, mutate(state) -> new state) for every kind of structural change."""
    def shape(s):
        s["model"] = torch.nn.Sequential(torch.nn.Linear(300, 101), torch.nn.LayerNorm(101), torch.nn.Linear(101, 10))
        s["optimizer"] = torch.optim.AdamW(s["model"].parameters())
        return s

    def dtype(s):
        s["model"] = s["model"].double()
        return s

    def add_key(s):
        s["extra"] = torch.zeros(7)
        return s

    def drop_key(s):
        del s["optimizer"]
        return s

    def moments(s):        # optimizer state appears after the first step: new arrays
        s["model"](torch.randn(2, 300)).sum().backward()
        s["optimizer"].step()
        return s

    def param_groups(s):
        m = s["model"]
        s["optimizer"] = torch.optim.AdamW([{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.1}])
        return s

    def freeze(s):
        for p in s["model"][0].parameters():
            p.requires_grad_(False)
        return s

    def ndarray(s):
        s["table"] = np.zeros((3, 4), np.float32)
        return s

    def reorder(s):
        return dict(reversed(list(s.items())))

    return [shape, dtype, add_key, drop_key, moments, param_groups, freeze, ndarray, reorder]


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_every_structural_change_is_caught(change):
    m = model()
    s = state_of(m, torch.optim.AdamW(m.parameters()))
    cache = LayoutCache()
    before = plan_save(s, CHUNK, cache=cache)
    changed = change(s)
    fresh = plan_save(changed, CHUNK)
    cached = plan_save(changed, CHUNK, cache=cache)
    assert layout(cached) == layout(fresh)
    assert [(a.dtype, a.shape) for a in cached.arrays] == [(a.dtype, a.shape) for a in fresh.arrays]
    assert cached.tree == fresh.tree
    same_arrays = ([(a.dtype, a.shape) for a in before.arrays] == [(a.dtype, a.shape) for a in fresh.arrays]
                   and before.frozen_arrays == fresh.frozen_arrays)
    # reused only where the arrays that shape the layout are the same (the tree is always fresh)
    assert cache.misses == (1 if same_arrays else 2)


def test_chunk_bytes_change_is_caught():
    m = model()
    s = state_of(m, torch.optim.AdamW(m.parameters()))
    cache = LayoutCache()
    plan_save(s, CHUNK, cache=cache)
    assert layout(plan_save(s, CHUNK * 2, cache=cache)) == layout(plan_save(s, CHUNK * 2))
    assert cache.misses == 2


def test_manager_round_trip_across_structure_changes(tmp_path):
    opts = CheckpointManagerOptions(handle_sigterm=False, io_threads=2, chunk_bytes=CHUNK, max_to_keep=None)
    with CheckpointManager(tmp_path, opts) as mgr:
        for step, width in enumerate([10, 10, 11, 11, 10]):
            t = {"w": torch.arange(width * 50, dtype=torch.float32) + step}
            mgr.save(step, {"t": t})
        for step, width in enumerate([10, 10, 11, 11, 10]):
            got = mgr.load(step)["t"]["w"]
            assert torch.equal(got, torch.arange(width * 50, dtype=torch.float32) + step)
        assert mgr._layouts.hits == 2 and mgr._layouts.misses == 3
