"""CheckpointManager behaviour: API, commit, rotation, errors, backpressure, buffer reuse."""

from pathlib import Path
import time

import numpy as np
import pytest
import torch

from async_ckpt import (CheckpointError, CheckpointManager, CheckpointManagerOptions, NotCommittedError,
                        RestoreError, SaveError)
import ckpt_layout as layout
from async_ckpt.storage.native_files import NativeStorage



def train_steps(model, opt, sched, n, seed=0):
    import torch

    losses = []
    for _ in range(n):
        x = torch.randn(5, 8)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def opts(**kw):
    kw.setdefault("io_threads", 2)
    return CheckpointManagerOptions(**kw)


def test_empty_directory_restores_none(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        assert mgr.restore({"x": torch.zeros(2)}) is None
        assert mgr.latest_step() is None and mgr.all_steps() == []


def test_round_trip_model_optimizer_scheduler(tmp_path, small_model):
    model, opt, sched = small_model
    train_steps(model, opt, sched, 4)
    progress = {"step": 4, "tokens": 1234, "history": [1.0, float("nan")]}
    with CheckpointManager(tmp_path, opts()) as mgr:
        h = mgr.save_async(4, {"model": model, "optimizer": opt, "scheduler": sched, "progress": progress},
                           metrics={"loss": 0.25})
        res = h.result()
        assert res.step == 4 and res.path.name == "checkpoint-4" and res.raw_bytes > 0
        assert h.done() and mgr.all_steps() == [4]

    torch.manual_seed(123)   # a differently initialised model
    model2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                 torch.nn.Linear(16, 4))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=3, gamma=0.5)
    progress2 = {}
    with CheckpointManager(tmp_path, opts()) as mgr:
        assert mgr.restore({"model": model2, "optimizer": opt2, "scheduler": sched2,
                            "progress": progress2}) == 4
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in s1["state"][k]:
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert sched.state_dict() == sched2.state_dict()
    assert progress2["tokens"] == 1234 and np.isnan(progress2["history"][1])
    # training continues identically
    torch.manual_seed(5)
    a = train_steps(model, opt, sched, 3)
    torch.manual_seed(5)
    b = train_steps(model2, opt2, sched2, 3)
    assert a == b


def test_load_returns_raw_tree_and_rng(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(0, {"progress": {"a": 1}, "w": torch.arange(6.0).view(2, 3)})
        tree = mgr.load(0)
    assert tree["progress"] == {"a": 1}
    assert torch.equal(tree["w"], torch.arange(6.0).view(2, 3))
    assert set(tree["rng"]) >= {"python", "numpy", "torch"}


def test_restore_only_named_items_and_missing_item_error(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"a": torch.ones(3), "b": torch.full((2,), 7.0)})
        b = torch.zeros(2)
        assert mgr.restore({"b": b}) == 1
        assert torch.equal(b, torch.full((2,), 7.0))
        with pytest.raises(RestoreError, match="optimizer"):
            mgr.restore({"optimizer": {}})
        with pytest.raises(RestoreError, match="shape"):
            mgr.restore({"a": torch.zeros(4)})


def test_rng_restored_last(tmp_path):
    import random
    torch.manual_seed(1); random.seed(1); np.random.seed(1)
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(0, {"p": {}})
        expect = (torch.rand(3), random.random(), np.random.rand())
        torch.rand(100); random.random(); np.random.rand(7)
        mgr.restore({"p": {}})
        got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expect[0], got[0]) and expect[1:] == got[1:]


def test_mutation_after_save_async_does_not_leak(tmp_path):
    w = torch.zeros(1 << 20)
    with CheckpointManager(tmp_path, opts()) as mgr:
        h = mgr.save_async(0, {"w": w})
        w.fill_(42.0)           # training goes on immediately
        h.result()
        assert torch.count_nonzero(mgr.load(0)["w"]) == 0


def test_tied_weights_written_once_and_restored_tied(tmp_path):
    emb = torch.nn.Embedding(100, 32)
    head = torch.nn.Linear(32, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    with CheckpointManager(tmp_path, opts(compression=None)) as mgr:
        res = mgr.save(0, {"model": model})
        assert res.raw_bytes < 2 * 100 * 32 * 4       # the tied tensor is stored once
        tree = mgr.load(0)
        sd = tree["model"]
        assert sd["emb.weight"] is sd["head.weight"]
        model2 = torch.nn.ModuleDict({"emb": torch.nn.Embedding(100, 32),
                                      "head": torch.nn.Linear(32, 100, bias=False)})
        model2["head"].weight = model2["emb"].weight
        mgr.restore({"model": model2})
    assert model2["head"].weight is model2["emb"].weight
    assert torch.equal(model2["emb"].weight, emb.weight)


def test_rotation_keeps_latest_n_on_disk(tmp_path):
    with CheckpointManager(tmp_path, opts(max_to_keep=2, keep_every_n_steps=4)) as mgr:
        for step in range(1, 8):
            mgr.save_async(step, {"x": torch.tensor([step])})
        mgr.wait_until_finished()
        assert mgr.all_steps() == [4, 6, 7]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-4", "checkpoint-6", "checkpoint-7"]


def test_best_step_and_best_policy(tmp_path):
    with CheckpointManager(tmp_path, opts(max_to_keep=2, best_metric="loss", best_mode="min")) as mgr:
        for step, loss in enumerate([5.0, 1.0, 3.0, 0.5, 9.0]):
            mgr.save(step, {"x": torch.tensor([step])}, metrics={"loss": loss})
        assert mgr.best_step() == 3
        assert mgr.all_steps() == [1, 3, 4]    # two best plus the newest


def test_steps_must_increase_and_interval(tmp_path):
    with CheckpointManager(tmp_path, opts(save_interval_steps=5)) as mgr:
        assert mgr.should_save(0) and not mgr.should_save(3)
        assert mgr.save_async(3, {"x": torch.ones(1)}).skipped
        mgr.save_async(5, {"x": torch.ones(1)}).result()
        with pytest.raises(ValueError, match="strictly increase"):
            mgr.save_async(5, {"x": torch.ones(1)})
        with pytest.raises(ValueError):
            mgr.save_async(-1, {"x": torch.ones(1)})


def test_unsupported_value_names_its_path(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        with pytest.raises(TypeError, match=r"optimizer\.param_groups\[0\]\.foo"):
            mgr.save_async(0, {"optimizer": {"param_groups": [{"foo": {1, 2}}]}})
        assert mgr.all_steps() == []
        mgr.save(1, {"ok": 1})       # the manager is still usable


class FailingStorage(NativeStorage):
    def __init__(self, fail_steps, delay=0.0):
        super().__init__(io_threads=2)
        self.fail_steps, self.delay, self.calls = set(fail_steps), delay, 0

    def write_rank(self, location, request):
        self.calls += 1
        time.sleep(self.delay)
        if self.calls in self.fail_steps:
            # leave a partial file behind, as a real failure would
            (Path(location) / "data-r0-0.bin").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return super().write_rank(location, request)


def test_background_error_raised_once_with_step_and_tmp_removed(tmp_path):
    mgr = CheckpointManager(tmp_path, opts(), storage=FailingStorage({2}))
    mgr.save(1, {"x": torch.ones(2)})
    mgr.save_async(2, {"x": torch.ones(2)})
    time.sleep(0.3)
    with pytest.raises(SaveError) as info:
        mgr.save_async(3, {"x": torch.ones(2)})
    assert info.value.step == 2 and "No space" in str(info.value)
    assert layout.find_leftovers(tmp_path) == []
    mgr.save_async(3, {"x": torch.ones(2)})      # raised once only; saving goes on
    mgr.wait_until_finished()
    assert mgr.all_steps() == [1, 3]
    mgr.close()


def test_error_surfaces_on_close(tmp_path):
    mgr = CheckpointManager(tmp_path, opts(), storage=FailingStorage({1}))
    mgr.save_async(1, {"x": torch.ones(2)})
    with pytest.raises(SaveError):
        mgr.close()
    assert mgr.all_steps() == []


def test_backpressure_bounds_inflight_and_memory(tmp_path):
    storage = FailingStorage(set(), delay=0.2)
    with CheckpointManager(tmp_path, opts(max_inflight_saves=1, max_to_keep=None), storage=storage) as mgr:
        t0 = time.perf_counter()
        for step in range(4):
            mgr.save_async(step, {"x": torch.randn(1000)})
        elapsed = time.perf_counter() - t0
        assert elapsed >= 0.5          # saves 1..3 each waited for the previous write
        mgr.wait_until_finished()
        assert mgr._pool.allocations == 1
        assert mgr.all_steps() == [0, 1, 2, 3]


def test_staging_buffers_reused_over_100_saves(tmp_path):
    w = torch.randn(4096)
    with CheckpointManager(tmp_path, opts(max_inflight_saves=2, max_to_keep=1, fsync=False)) as mgr:
        for step in range(100):
            w.add_(1.0)
            mgr.save_async(step, {"w": w})
        mgr.wait_until_finished()
        assert mgr._pool.allocations <= 2
        assert torch.equal(mgr.load(99)["w"], w)


def test_leftovers_removed_on_open_and_never_listed(tmp_path):
    (tmp_path / layout.tmp_dir_name(9)).mkdir()
    (tmp_path / "checkpoint-10").mkdir()           # final name but no marker
    with CheckpointManager(tmp_path, opts()) as mgr:
        assert mgr.all_steps() == []
        assert layout.find_leftovers(tmp_path) == []
        with pytest.raises(NotCommittedError):
            mgr.restore({"x": torch.zeros(1)}, step=10)


def test_second_live_manager_is_refused(tmp_path):
    with CheckpointManager(tmp_path, opts()):
        with pytest.raises(CheckpointError, match="in use"):
            CheckpointManager(tmp_path, opts())
    CheckpointManager(tmp_path, opts()).close()     # free again after close


def test_close_waits_for_inflight_saves(tmp_path):
    mgr = CheckpointManager(tmp_path, opts(), storage=FailingStorage(set(), delay=0.3))
    mgr.save_async(0, {"x": torch.ones(3)})
    mgr.close()
    assert CheckpointManager(tmp_path, opts()).all_steps() == [0]


def test_delete(tmp_path):
    with CheckpointManager(tmp_path, opts(max_to_keep=None)) as mgr:
        mgr.save(1, {"x": 1})
        mgr.save(2, {"x": 2})
        mgr.delete(1)
        assert mgr.all_steps() == [2]
        with pytest.raises(RestoreError):
            mgr.delete(1)


@pytest.mark.parametrize("compression", [None, "zstd", "auto"])
def test_large_state_multi_chunk(tmp_path, compression):
    big = torch.randn(3_000_000).to(torch.bfloat16)     # > 1 chunk at 1 MiB chunks
    small = {f"t{i}": torch.full((i + 1,), float(i)) for i in range(300)}
    o = opts(compression=compression, chunk_bytes=1 << 20)
    with CheckpointManager(tmp_path, o) as mgr:
        mgr.save(0, {"big": big, "small": small, "zeros": torch.zeros(2_000_000)})
        tree = mgr.load(0)
    assert torch.equal(tree["big"], big)
    assert all(torch.equal(tree["small"][k], v) for k, v in small.items())
    assert torch.count_nonzero(tree["zeros"]) == 0


def test_restore_decodes_straight_into_parameters(tmp_path, monkeypatch):
    from async_ckpt.pipeline import restore as restore_mod

    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
    plain = {"a": torch.randn(100), "nested": [torch.randn(3, 3)]}
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(0, {"model": src, "plain": plain})
        dst = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.BatchNorm1d(64))
        dst_plain = {"a": torch.zeros(100), "nested": [torch.zeros(3, 3)]}
        ptrs = [p.data_ptr() for p in dst.state_dict().values()]
        allocated = []
        real = restore_mod._allocate
        monkeypatch.setattr(restore_mod, "_allocate", lambda *a: allocated.append(a) or real(*a))
        mgr.restore({"model": dst, "plain": dst_plain}, restore_rng=False, atomic=False)
    assert allocated == []                      # every array went straight into its target
    assert [p.data_ptr() for p in dst.state_dict().values()] == ptrs
    for a, b in zip(src.state_dict().values(), dst.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(dst_plain["a"], plain["a"]) and torch.equal(dst_plain["nested"][0], plain["nested"][0])


def test_restore_into_other_dtype_goes_through_load_state_dict(tmp_path):
    src = torch.nn.Linear(4, 4)
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(0, {"model": src})
        dst = torch.nn.Linear(4, 4).double()
        mgr.restore({"model": dst})
    assert dst.weight.dtype == torch.float64
    assert torch.equal(dst.weight, src.weight.double())


def test_done_callback_sees_the_outcome_once(tmp_path):
    seen = []
    with CheckpointManager(tmp_path, opts(save_interval_steps=2)) as mgr:
        h = mgr.save_async(2, {"x": torch.ones(3)})
        h.add_done_callback(lambda handle: seen.append(handle.result().step))
        mgr.wait_until_finished()
        skipped = mgr.save_async(3, {"x": torch.ones(3)})
    assert seen == [2]
    assert skipped.skipped
    calls = []
    skipped.add_done_callback(calls.append)
    assert calls == [skipped]


def _thread_niceness() -> dict[int, int]:
    import os
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                out[int(tid)] = int(f.read().rsplit(")", 1)[1].split()[16])    # field 19: nice
        except (FileNotFoundError, ProcessLookupError):
            continue    # the thread ended between the listing and the read
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread niceness from Linux /proc")
@pytest.mark.parametrize("nice", [0, 7])
def test_background_writers_run_nicer_than_the_training_thread(tmp_path, nice):
    import threading
    before = _thread_niceness()
    base = before[threading.get_native_id()]
    opts = CheckpointManagerOptions(handle_sigterm=False, io_threads=3, writer_nice=nice)
    with CheckpointManager(tmp_path, opts) as mgr:
        mgr.save(1, {"w": torch.randn(1000)})
        after = _thread_niceness()
        commit = next(t.native_id for t in threading.enumerate() if t.name.startswith("async_ckpt-commit"))
        new = {tid: n for tid, n in after.items() if tid not in before}
        assert after[threading.get_native_id()] == base          # the training thread is left alone
        assert after[commit] == min(19, base + nice)
        # the native writer's 2 pool threads (the commit thread is its third worker); the
        # reader's and everything else keep the training thread's niceness
        assert sorted(new.values()).count(min(19, base + nice)) == (3 if nice else len(new))
    with pytest.raises(ValueError, match="writer_nice"):
        CheckpointManagerOptions(writer_nice=20)
