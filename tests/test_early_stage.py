"""The early copy: arrays staged while the tree is still encoded, into the last save's
layout, kept only when the plan confirms that layout; the native StageQueue under it."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions, FormatError, native
from async_ckpt.pipeline import early_stage
from bitwise import same
from test_plan_cache import CHUNK, _changes, model, state_of


# ----------------------------------------------------------------------------- StageQueue

def _regions(sources, offsets):
    return (np.array([s.ctypes.data for s in sources], np.uint64), np.array(offsets, np.uint64),
            np.array([s.nbytes for s in sources], np.uint64))


def test_stage_queue_copies_every_batch_in_any_order():
    rng = np.random.default_rng(0)
    dst = np.zeros(1 << 16, np.uint8)
    sources = [rng.integers(0, 255, n, dtype=np.uint8) for n in (1, 100, 4096, 7000, 0, 13)]
    offsets = [60000, 0, 200, 20000, 5, 50000]       # unsorted is fine: no gate to open
    q = native.StageQueue()
    q.submit(dst, *_regions(sources[:3], offsets[:3]))
    q.submit(dst, *_regions(sources[3:], offsets[3:]))
    q.wait()
    expected = np.zeros_like(dst)
    for s, o in zip(sources, offsets):
        expected[o:o + s.nbytes] = s
    assert np.array_equal(dst, expected)
    q.wait()                                           # idle: returns at once


def test_stage_queue_refuses_a_region_outside_the_buffer_and_queues_nothing():
    dst = np.zeros(64, np.uint8)
    src = np.full(8, 7, np.uint8)
    q = native.StageQueue()
    with pytest.raises(FormatError, match="outside the 64-byte buffer"):
        q.submit(dst, *_regions([src, src], [0, 60]))
    with pytest.raises(FormatError, match="same length"):
        q.submit(dst, np.zeros(2, np.uint64), np.zeros(1, np.uint64), np.zeros(2, np.uint64))
    q.wait()
    assert not dst.any()


def test_stage_queue_finishes_its_queue_before_it_is_destroyed():
    dst = np.zeros(32 << 20, np.uint8)
    src = np.full(8 << 20, 3, np.uint8)
    q = native.StageQueue()
    for k in range(4):
        q.submit(dst, *_regions([src], [k << 23]))
    del q
    assert (dst == 3).all()


# ----------------------------------------------------------------------------- in a manager

@pytest.fixture
def early_every(monkeypatch):
    """Batches of 2 arrays (the small test states then take the early path), and a record
    of every early copy: how many arrays it staged and kept, or None (a wrong guess)."""
    monkeypatch.setattr(early_stage, "EVERY", 2)
    found: list = []
    real_init, real_finish = early_stage.EarlyStage.__init__, early_stage.EarlyStage.finish

    def init(self, *args):
        real_init(self, *args)
        found.append(None)

    def finish(self, plan):
        mask = real_finish(self, plan)
        found[-1] = None if mask is None else int(mask.sum())
        return mask

    monkeypatch.setattr(early_stage.EarlyStage, "__init__", init)
    monkeypatch.setattr(early_stage.EarlyStage, "finish", finish)
    return found


def _manager(path, **kw) -> CheckpointManager:
    opts = dict(handle_sigterm=False, io_threads=2, chunk_bytes=CHUNK, max_to_keep=None, save_rng=False)
    opts.update(kw)
    return CheckpointManager(path, CheckpointManagerOptions(**opts))


def _plain(state):
    """What loading ``state`` back gives: stateful objects as their state dicts."""
    return {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}


def _trained():
    m = model()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 300)).sum().backward()
    opt.step()
    return m, opt


def test_a_repeated_save_is_staged_while_encoding_and_holds_the_new_values(tmp_path, early_every):
    m, opt = _trained()
    with _manager(tmp_path) as mgr:
        mgr.save(1, state_of(m, opt))
        assert early_every == []                      # nothing to guess from yet
        m(torch.randn(2, 300)).sum().backward()
        opt.step()                                    # new values, same structure
        mgr.save(2, state_of(m, opt))
        assert len(early_every) == 1 and early_every[0] > 10
        assert same(mgr.load(2), _plain(state_of(m, opt)))


def test_save_async_returns_only_once_the_early_copy_is_done(tmp_path, early_every):
    tensors = {f"t{i}": torch.full((1000 + i,), float(i)) for i in range(40)}
    with _manager(tmp_path) as mgr:
        mgr.save(1, {"model": tensors})
        mgr.save_async(2, {"model": tensors})
        for t in tensors.values():
            t.add_(1000)                              # training goes on at once
        mgr.wait_until_finished()
        assert early_every[-1] == 40
        loaded = mgr.load(2)["model"]
        assert all(torch.equal(loaded[k], t - 1000) for k, t in tensors.items())


@pytest.mark.parametrize("change", _changes(), ids=lambda f: f.__name__)
def test_a_structure_change_after_an_early_copy_still_saves_exactly_the_state(tmp_path, early_every, change):
    m, opt = _trained()
    s = state_of(m, opt)
    with _manager(tmp_path) as mgr:
        mgr.save(1, s)
        s = change(s)
        hits = mgr._layouts.hits
        mgr.save(2, s)
        reused = mgr._layouts.hits > hits             # some changes leave the layout as it was
        mgr.save(3, s)                                # and the next save guesses from the new layout
        assert (early_every[0] is not None) == reused  # kept exactly when the plan reused the layout
        assert early_every[1] is not None
        assert same(mgr.load(2), _plain(s)) and same(mgr.load(3), _plain(s))


@pytest.mark.parametrize("what", ["grown", "shrunk", "strided", "shifted"])
def test_an_array_that_changed_under_the_guess_is_copied_again(tmp_path, early_every, what):
    """A guess is wrong for the arrays after the change and right before it; the save is
    exact either way (a grown state also needs a bigger staging buffer)."""
    tensors = {f"t{i}": torch.arange(100 * (i + 1), dtype=torch.float32) + i for i in range(20)}
    with _manager(tmp_path) as mgr:
        mgr.save(1, {"model": tensors})
        if what == "grown":
            tensors["t3"] = torch.arange(1 << 20, dtype=torch.float32)
        elif what == "shrunk":
            tensors["t3"] = torch.arange(5, dtype=torch.float32)
        elif what == "strided":
            tensors["t3"] = torch.arange(400, dtype=torch.float32).reshape(20, 20).t()
        else:
            tensors = {"new": torch.ones(3), **tensors}
        mgr.save(2, {"model": tensors})
        assert early_every == [None]
        assert same(mgr.load(2)["model"], tensors)


def test_a_bad_value_found_while_copying_early_gives_the_slot_back(tmp_path, early_every):
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(40)}
    with _manager(tmp_path, max_inflight_saves=1) as mgr:
        mgr.save(1, {"model": tensors})
        with pytest.raises(TypeError, match="bad"):
            mgr.save(2, {"model": tensors, "bad": threading.Lock()})
        done = threading.Event()
        threading.Thread(target=lambda: (mgr.save(3, {"model": tensors}), done.set()), daemon=True).start()
        assert done.wait(30), "the failed save kept its staging slot"
        assert same(mgr.load(3)["model"], tensors)


def test_an_early_copy_that_cannot_start_gives_the_slot_back(tmp_path, early_every, monkeypatch):
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(40)}

    def no_thread(self, *args):
        raise RuntimeError("no thread to be had")

    with _manager(tmp_path, max_inflight_saves=1) as mgr:
        mgr.save(1, {"model": tensors})
        monkeypatch.setattr(early_stage.EarlyStage, "__init__", no_thread)
        with pytest.raises(RuntimeError, match="no thread"):
            mgr.save(2, {"model": tensors})
        monkeypatch.undo()
        done = threading.Event()
        threading.Thread(target=lambda: (mgr.save(3, {"model": tensors}), done.set()), daemon=True).start()
        assert done.wait(30), "the failed save kept its staging slot"
        assert same(mgr.load(3)["model"], tensors)


def test_back_to_back_saves_with_two_in_flight_each_hold_their_own_values(tmp_path, early_every):
    tensors = {f"t{i}": torch.zeros(3000 + i) for i in range(40)}
    with _manager(tmp_path, max_inflight_saves=2) as mgr:
        for step in range(1, 7):
            for t in tensors.values():
                t.fill_(float(step))
            mgr.save_async(step, {"model": tensors})     # returns once its copy is done
        mgr.wait_until_finished()
        assert sum(1 for kept in early_every if kept) == 5
        for step in range(1, 7):
            loaded = mgr.load(step)["model"]
            assert all(torch.equal(loaded[k], torch.full_like(t, float(step))) for k, t in tensors.items()), step
