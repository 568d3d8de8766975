"""The restore paths that many small tensors take: typed views of shared chunks, the
in-place copy of dicts of tensors, the collector pause. Every case is checked bitwise."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions
from async_ckpt.errors import ChecksumError, RestoreError
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


# ------------------------------------------------------------- read in place, backed up
# An atomic restore reads saved arrays straight into the live tensors that match them; the
# reader first copies each tensor's bytes into the manager's staging buffer, and they are
# put back if anything fails before the tensor's item is applied.

@pytest.fixture
def staged_counts(monkeypatch):
    """How many arrays each atomic restore read in place, backed up (the tests below must
    exercise that path)."""
    from async_ckpt.pipeline import restore
    counts: list[int] = []
    real = restore._in_place

    def spy(*args, single_owner):
        out = real(*args, single_owner=single_owner)
        if single_owner:
            counts.append(sum(len(v) for v in out.values()))
        return out

    monkeypatch.setattr(restore, "_in_place", spy)
    return counts


def _big_opts(**kw):
    return CheckpointManagerOptions(handle_sigterm=False, io_threads=2, compression=None,
                                    chunk_bytes=1 << 20, **kw)


def _big_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 512))   # 2 MiB weights


def _trained(seed: int):
    model = _big_model(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 512)).sum().backward()
    opt.step()
    return model, opt


def _copy_of(model, opt):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(opt.state.values())})


def _assert_holds(model, opt, want_model, want_opt) -> None:
    got_model, got_opt = _copy_of(model, opt)
    for k, v in want_model.items():
        assert torch.equal(got_model[k], v), k
    for i, state in want_opt.items():
        for k, v in state.items():
            assert torch.equal(got_opt[i][k], v), (i, k)


def test_staged_restore_is_bitwise_in_place_and_keeps_no_reference_to_the_staging_buffer(tmp_path, staged_counts):
    model, opt = _trained(1)
    want_model, want_opt = _copy_of(model, opt)
    big = {"w": torch.randn(524_288)}
    want_big = big["w"].clone()
    with CheckpointManager(tmp_path, _big_opts()) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt, "big": big})
        live_model, live_opt = _trained(2)
        live_big = {"w": torch.zeros(524_288)}
        ptrs = [p.data_ptr() for p in live_model.parameters()] + [live_big["w"].data_ptr()]
        allocations = mgr._pool.allocations
        assert mgr.restore({"model": live_model, "optimizer": live_opt, "big": live_big}, step=1) == 1
        assert mgr._pool.allocations == allocations        # the save's staging buffer was reused
        assert [p.data_ptr() for p in live_model.parameters()] + [live_big["w"].data_ptr()] == ptrs
        # Every array: both layers' weights and biases, the big tensor, and the optimizer's
        # existing state (moments and step counts).
        assert staged_counts == [17]
        # The next saves overwrite the staging buffer: the restored state must not change.
        for step, seed in ((2, 7), (3, 8)):
            other, other_opt = _trained(seed)
            mgr.save(step, {"model": other, "optimizer": other_opt, "big": {"w": torch.randn(524_288)}})
    _assert_holds(live_model, live_opt, want_model, want_opt)
    assert torch.equal(live_big["w"], want_big)


def test_staged_restore_with_a_bad_chunk_changes_nothing(tmp_path, staged_counts):
    model, opt = _trained(3)
    with CheckpointManager(tmp_path, _big_opts()) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
    data = tmp_path / "checkpoint-1" / "data-r0-0.bin"
    raw = bytearray(data.read_bytes())
    raw[-4096] ^= 0x01                      # the last chunk: every staged array read before it
    data.write_bytes(bytes(raw))
    live_model, live_opt = _trained(4)
    before_model, before_opt = _copy_of(live_model, live_opt)
    with CheckpointManager(tmp_path, _big_opts()) as mgr:
        with pytest.raises(ChecksumError):
            mgr.restore({"model": live_model, "optimizer": live_opt})
    assert staged_counts == [16]          # weights, biases, moments and step counts
    _assert_holds(live_model, live_opt, before_model, before_opt)


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_a_tensor_shared_by_two_items_is_restored_in_both(tmp_path, order, staged_counts):
    shared = torch.randn(524_288)
    with CheckpointManager(tmp_path, _big_opts()) as mgr:
        mgr.save(1, {"a": {"w": shared}, "b": {"w": shared}})
        live = {"a": {"w": torch.zeros(524_288)}, "b": {"w": torch.ones(524_288)}}
        a, b = live["a"], live["b"]
        mgr.restore({k: live[k] for k in order}, step=1)
    assert staged_counts == [0]        # never copied in before the other item is applied
    assert torch.equal(a["w"], shared) and torch.equal(b["w"], shared)


def test_a_module_that_keeps_the_tensor_it_is_given_keeps_a_live_tensor(tmp_path, staged_counts):
    class Keeper(torch.nn.Module):
        """Keeps the state dict's tensor itself, as some quantised modules do."""

        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.zeros(524_288))

        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            self.table = state_dict[prefix + "table"]

    saved = Keeper()
    saved.table.normal_()
    want = saved.table.clone()
    with CheckpointManager(tmp_path, _big_opts()) as mgr:
        mgr.save(1, {"m": saved})
        live = Keeper()
        mgr.restore({"m": live}, step=1)
        assert staged_counts == [1]
        mgr.save(2, {"m": Keeper()})          # overwrites the staging buffer with zeros
    assert torch.equal(live.table, want)


def test_the_first_save_after_a_restore_in_a_new_manager_reuses_its_buffer(tmp_path, staged_counts):
    model, opt = _trained(5)
    with CheckpointManager(tmp_path, _big_opts()) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
    live_model, live_opt = _trained(6)
    with CheckpointManager(tmp_path, _big_opts()) as mgr:        # a resumed run: nothing saved yet
        mgr.restore({"model": live_model, "optimizer": live_opt})
        assert staged_counts == [16] and mgr._pool.allocations == 1
        mgr.save(2, {"model": live_model, "optimizer": live_opt})
        assert mgr._pool.allocations == 1          # the save fitted in the restore's buffer


# ------------------------------------------------------------ shared chunks, scattered
# A chunk shared by several arrays is read in pieces: straight into the live tensors that
# match its arrays, and into a buffer of the chunk's own for the others.

def _medium(seed: int, count: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(40_000 + 1000 * i, generator=g) for i in range(count)}    # 160-204 KiB


def test_an_existing_optimizer_state_is_restored_in_place(tmp_path, staged_counts):
    model, opt = _trained(11)
    _, want_opt = _copy_of(model, opt)
    with CheckpointManager(tmp_path, _big_opts()) as mgr:
        mgr.save(1, {"model": model, "optimizer": opt})
        live_model, live_opt = _trained(12)
        weights = [0, 1, 2, 3]
        moments = [list(live_opt.state.values())[i]["exp_avg"].data_ptr() for i in weights]
        mgr.restore({"model": live_model, "optimizer": live_opt}, step=1)
        assert [list(live_opt.state.values())[i]["exp_avg"].data_ptr() for i in weights] == moments
        mgr.save(2, {"model": _trained(13)[0], "optimizer": _trained(13)[1]})   # overwrites the staging buffer
    assert staged_counts == [16]
    _, got_opt = _copy_of(live_model, live_opt)
    for i, state in want_opt.items():
        for k, v in state.items():
            assert torch.equal(got_opt[i][k], v), (i, k)


def test_a_shared_chunk_is_scattered_into_live_tensors_and_the_rest_owns_its_memory(tmp_path, staged_counts):
    saved = _medium(21)
    want = {k: v.clone() for k, v in saved.items()}
    extra = np.arange(30_000, dtype=np.int64)
    with CheckpointManager(tmp_path, _big_opts()) as mgr:
        mgr.save(1, {"m": {**saved, "np": extra}})
        assert len(mgr._commit.status_of_step(1).manifest.chunks) < 13     # tensors share chunks
        live = _medium(22)
        del live["t3"]                       # restored as a new entry of the dict
        ptrs = {k: v.data_ptr() for k, v in live.items()}
        mgr.restore({"m": live}, step=1)
        assert staged_counts == [11]
        assert {k: v.data_ptr() for k, v in live.items() if k in ptrs} == ptrs
        # The next save overwrites the staging buffer (the backups): t3 and the ndarray, read
        # into their chunks' own memory, must not change.
        mgr.save(2, {"m": {**{k: torch.zeros_like(v) for k, v in saved.items()}, "np": extra * 0}})
    for k, v in want.items():
        assert torch.equal(live[k], v), k
    assert np.array_equal(live["np"], extra)


def test_a_state_of_tiny_tensors_is_not_staged(tmp_path, staged_counts):
    saved = {f"p{i}": torch.full((8,), float(i)) for i in range(300)}
    with CheckpointManager(tmp_path, _big_opts()) as mgr:
        mgr.save(1, {"m": saved})
        live = {k: torch.zeros(8) for k in saved}
        mgr.restore({"m": live}, step=1)
    assert staged_counts == []              # read first: nothing is matched, read in place or backed up
    assert all(torch.equal(live[k], v) for k, v in saved.items())


def test_a_large_ndarray_is_staged_and_restored_in_place(tmp_path, staged_counts):
    arr = np.random.default_rng(5).standard_normal(300_000)       # 2.3 MiB: whole chunks
    with CheckpointManager(tmp_path, _big_opts()) as mgr:
        mgr.save(1, {"a": {"x": arr}})
        live = {"x": np.zeros_like(arr)}
        target = live["x"]
        mgr.restore({"a": live}, step=1)
        mgr.save(2, {"a": {"x": np.ones_like(arr)}})
    assert staged_counts == [1] and live["x"] is target
    assert np.array_equal(target, arr)


# ---------------------------------------------------------------- manifests already known
# A manager restoring a step it published (or parsed) does not parse its manifest again when
# the file's bytes have the same SHA-256; any other bytes are parsed afresh.

@pytest.fixture
def parses(monkeypatch):
    from async_ckpt.storage import commit
    count = [0]
    real = commit.parse_manifest_bytes

    def spy(data):
        count[0] += 1
        return real(data)

    monkeypatch.setattr(commit, "parse_manifest_bytes", spy)
    return count


def test_a_step_this_manager_published_is_restored_without_parsing_its_manifest(tmp_path, parses):
    state = {"m": {"w": torch.randn(100)}}
    with CheckpointManager(tmp_path, _big_opts()) as mgr:
        mgr.save(1, state)
        live = {"m": {"w": torch.zeros(100)}}
        assert mgr.restore(live, step=1) == 1 and parses[0] == 0
        assert torch.equal(live["m"]["w"], state["m"]["w"])
    with CheckpointManager(tmp_path, _big_opts()) as mgr:        # a new manager parses once
        mgr.restore({"m": {"w": torch.zeros(100)}}, step=1)
        mgr.restore({"m": {"w": torch.zeros(100)}}, step=1)
    assert parses[0] == 1


def test_a_step_whose_files_were_replaced_is_read_from_the_new_manifest(tmp_path, parses):
    import shutil
    with CheckpointManager(tmp_path / "a", _big_opts()) as mgr:
        mgr.save(1, {"m": {"w": torch.full((100,), 1.0)}})
        with CheckpointManager(tmp_path / "b", _big_opts()) as other:
            other.save(1, {"m": {"w": torch.full((100,), 2.0), "extra": torch.ones(3)}})
        shutil.rmtree(tmp_path / "a" / "checkpoint-1")
        shutil.copytree(tmp_path / "b" / "checkpoint-1", tmp_path / "a" / "checkpoint-1")
        live = {"m": {"w": torch.zeros(100)}}
        mgr.restore(live, step=1)
    assert parses[0] == 1
    assert torch.equal(live["m"]["w"], torch.full((100,), 2.0)) and torch.equal(live["m"]["extra"], torch.ones(3))
