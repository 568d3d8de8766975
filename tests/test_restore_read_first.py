"""A state of small arrays is read first: every chunk goes into scratch while the live
objects are matched, checked and planned on the calling thread; nothing live changes
until every chunk is read and checked and every item prechecked."""

from __future__ import annotations

import copy
import threading
import time
import types

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions
from async_ckpt.errors import ChecksumError, RestoreError
from async_ckpt.format.manifest import ArrayEntry
from async_ckpt.pipeline import restore

from ckpt_layout import flip_data_byte


def opts(**kw) -> CheckpointManagerOptions:
    return CheckpointManagerOptions(handle_sigterm=False, compression=None, chunk_bytes=1 << 16, **kw)


def small_dict(seed: int, n: int = 200) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i:03d}": torch.randn(1 + i % 29, generator=g).to((torch.float32, torch.bfloat16)[i % 2])
            for i in range(n)}


def small_model(seed: int, width: int = 4) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model of many tiny parameters and its AdamW after two steps (all state small)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(12)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(2, width)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def model_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in model.parameters()]
    for state in opt.state_dict()["state"].values():
        out += [v.clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def paths(monkeypatch):
    """Which restore path each restore took."""
    taken: list[str] = []
    for name in ("_restore_read_first", "_restore_matched"):
        real = getattr(restore, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            taken.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(restore, name, spy)
    return taken


def test_only_a_state_of_small_arrays_is_read_first(tmp_path, paths):
    g = torch.Generator().manual_seed(0)
    with CheckpointManager(tmp_path, opts(max_to_keep=None)) as mgr:
        mgr.save(1, {"sd": small_dict(1)})
        mgr.save(2, {"sd": {"big": torch.randn(1 << 20, generator=g), "b": torch.randn(3, generator=g)}})
        mgr.restore({"sd": small_dict(2)}, step=1)
        mgr.restore({"sd": {"big": torch.zeros(1 << 20), "b": torch.zeros(3)}}, step=2)
    assert paths == ["_restore_read_first", "_restore_matched"]


def test_the_read_starts_before_the_live_objects_are_looked_at(tmp_path, monkeypatch):
    events: list[str] = []
    real_read_while, real_covered = restore._read_while, restore._covered_items

    def read_while(*args):
        events.append("read")
        return real_read_while(*args)

    def covered_items(*args):
        events.append("walk")
        return real_covered(*args)

    monkeypatch.setattr(restore, "_read_while", read_while)
    monkeypatch.setattr(restore, "_covered_items", covered_items)
    saved = small_dict(1)
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"sd": saved})
        live = small_dict(2)
        mgr.restore({"sd": live}, step=1)
    assert events == ["read", "walk"]
    assert all(torch.equal(live[k], saved[k]) for k in saved)


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_model_and_optimizer_of_small_tensors_restore_exactly_into_memory_of_their_own(tmp_path, paths,
                                                                                         compression):
    # The optimizer keeps the decoded moment tensors themselves: they must not be views of
    # the scratch buffer the chunks were read into (the next save reuses it).
    model, opt = small_model(1)
    want = model_bytes(model, opt)
    options = CheckpointManagerOptions(handle_sigterm=False, compression=compression, chunk_bytes=1 << 16,
                                       max_to_keep=None)
    with CheckpointManager(tmp_path, options) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt, "sd": small_dict(1)})
        live_model, live_opt = small_model(2)
        live_sd = small_dict(2)
        mgr.restore({"model": live_model, "optimizer": live_opt, "sd": live_sd}, step=1)
        assert paths == ["_restore_read_first"]
        assert same(model_bytes(live_model, live_opt), want)
        other_model, other_opt = small_model(3)
        mgr.save(2, {"model": other_model, "optimizer": other_opt, "sd": small_dict(3)})
    assert same(model_bytes(live_model, live_opt), want)
    assert all(torch.equal(live_sd[k], v) for k, v in small_dict(1).items())


@pytest.mark.parametrize("atomic", [True, False])
def test_a_bad_chunk_changes_nothing_live(tmp_path, atomic):
    model, opt = small_model(1)
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt, "sd": small_dict(1)})
    flip_data_byte(tmp_path, 200)
    live_model, live_opt = small_model(2)
    live_sd = small_dict(2)
    before = model_bytes(live_model, live_opt)
    with CheckpointManager(tmp_path, opts()) as mgr, pytest.raises(ChecksumError):
        mgr.restore({"model": live_model, "optimizer": live_opt, "sd": live_sd}, step=1, atomic=atomic)
    assert same(model_bytes(live_model, live_opt), before)
    assert all(torch.equal(live_sd[k], v) for k, v in small_dict(2).items())


def test_a_module_of_another_shape_is_refused_before_any_item_changes(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"sd": small_dict(1), "model": torch.nn.Linear(3, 4)})
        live_sd = small_dict(2)
        live_model = torch.nn.Linear(3, 5)
        weight = live_model.weight.detach().clone()
        with pytest.raises(RestoreError, match="shape"):
            mgr.restore({"sd": live_sd, "model": live_model}, step=1)
    assert all(torch.equal(live_sd[k], v) for k, v in small_dict(2).items())
    assert torch.equal(live_model.weight, weight)


def test_restoring_some_items_reads_first_and_restores_those_exactly(tmp_path, paths):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"a": small_dict(1), "b": small_dict(2, n=50), "c": [torch.arange(5)]})
        live_b = small_dict(3, n=50)
        mgr.restore({"b": live_b}, step=1)
    assert paths == ["_restore_read_first"]
    assert all(torch.equal(live_b[k], v) for k, v in small_dict(2, n=50).items())


def test_own_memory_fills_the_arrays_when_its_copies_run_and_not_after():
    scratch = torch.zeros(64, dtype=torch.uint8)
    entries = [ArrayEntry("torch.float32", (2,), 8, ((0, 8, 8),)), ArrayEntry("torch.int16", (3,), 6, ((0, 17, 6),))]
    arrays = {0: restore.ChunkBytes(scratch, 8), 1: restore.ChunkBytes(scratch, 17)}
    copies = restore._own_memory(arrays, [0, 1], entries)
    assert arrays[0].dtype == torch.float32 and arrays[1].shape == (3,)
    scratch.copy_(torch.arange(64, dtype=torch.uint8))      # the read lands after the plan
    for src, dst in copies:
        dst.copy_(src)
    scratch.zero_()                                          # scratch reused afterwards
    assert bytes(arrays[0].view(torch.uint8).tolist()) == bytes(range(8, 16))
    assert bytes(arrays[1].view(torch.uint8).tolist()) == bytes(range(17, 23))


@pytest.mark.parametrize("path", ["read first", "matched"])
def test_items_holding_random_generators_restore_their_streams(tmp_path, monkeypatch, paths, path):
    # A generator is built from its saved state when its item is decoded: that item must
    # be decoded once its chunks are read, not beside the read.
    if path == "matched":
        monkeypatch.setattr(restore, "_READ_FIRST_MEAN_BELOW", 0)

    def generators(seed: int) -> dict:
        return {"torch": torch.Generator().manual_seed(seed), "rs": np.random.RandomState(seed),
                "mt": np.random.Generator(np.random.MT19937(seed)), "pcg": np.random.default_rng(seed)}

    def draws(gens: dict) -> list:
        return [torch.rand(4, generator=gens["torch"]), gens["rs"].rand(4), gens["mt"].random(4),
                gens["pcg"].random(4)]

    saved = generators(1)
    draws(saved)                                    # move every stream off its seed
    expected = draws(copy.deepcopy({k: v for k, v in saved.items() if k != "torch"}) |
                     {"torch": torch.Generator().set_state(saved["torch"].get_state())})
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"gens": saved, "sd": small_dict(1)})
        live = {"gens": generators(2), "sd": small_dict(2)}
        mgr.restore(live, step=1)
    assert paths == ["_restore_matched" if path == "matched" else "_restore_read_first"]
    got = draws(live["gens"])
    assert torch.equal(got[0], expected[0])
    for a, b in zip(got[1:], expected[1:]):
        assert np.array_equal(a, b)


def test_an_interrupt_while_the_reader_starts_still_waits_for_the_reader(monkeypatch):
    # The reader may be writing into scratch (or live tensors): whatever interrupts the
    # calling thread, _read_while returns only once the reader is done.
    class Interrupted(threading.Event):
        def wait(self, timeout=None):
            super().wait(timeout)
            raise KeyboardInterrupt

    monkeypatch.setattr(restore, "threading", types.SimpleNamespace(Thread=threading.Thread, Event=Interrupted))
    done: list[bool] = []

    def read() -> None:
        time.sleep(0.2)
        done.append(True)

    with pytest.raises(KeyboardInterrupt):
        restore._read_while(read, lambda: None)
    assert done == [True]
