"""The save path for states of many small tensors: the encoder's columns (and the host
addresses it records), ties found by address first and full key second, the vectorised
snapshot copy, the layout key, and the manifest entries kept on a reused layout. Every
shortcut is checked against the slow answer, and every change it depends on against a
fresh plan.
"""

import gc
import random
import threading

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions, native
from async_ckpt.format.tree import encode_table, encode_tree
from async_ckpt.pipeline import plan as plan_mod
from async_ckpt.pipeline import snapshot as snapshot_mod
from async_ckpt.pipeline.plan import LayoutCache, plan_save
from async_ckpt.pipeline.saving import _build_entries, array_entries

CHUNK = 1 << 16


class Sub(torch.Tensor):
    """A tensor subclass: encoded by the general path, tied like any other tensor."""


def tensors_sharing_memory():
    base = torch.arange(24, dtype=torch.float32)
    view = base.view(4, 6)
    empty = torch.empty(0)
    c = torch.arange(6.0).to(torch.complex64)
    return [
        base, base,                        # one object twice
        view, base.view(4, 6),             # the same view through two objects
        base[:12], base[12:],              # same address, other shape; another address
        base.view(6, 4).t(),               # strided: not plain host memory
        torch._neg_view(base), torch._neg_view(base),   # lazy neg bit at base's address
        c, c.conj(), c.conj(),             # lazy conj bit
        empty, empty, torch.empty(0),      # empty: tied by identity only
        base.as_subclass(Sub),             # a subclass viewing base: tied to base
        torch.nn.Parameter(torch.ones(3)),
        torch.arange(5, dtype=torch.int64)[::2],
    ]


def reference_indices(tensors):
    """What the format promises: same object, or same memory viewed alike, is one array;
    empty tensors only by identity. Indices are given in first-seen order."""
    seen, out = {}, []
    for t in tensors:
        key = (("id", id(t)) if not t.nbytes else
               (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device, t.is_conj(), t.is_neg()))
        out.append(seen.setdefault(key, len(seen)))
    return out


def orders(n, count=6):
    rng = random.Random(0)
    yield list(range(n))
    yield list(reversed(range(n)))
    for _ in range(count):
        order = list(range(n))
        rng.shuffle(order)
        yield order


@pytest.mark.parametrize("order", list(orders(len(tensors_sharing_memory()))), ids=lambda o: "-".join(map(str, o[:4])))
def test_ties_match_the_full_key_in_any_order(order):
    pool = tensors_sharing_memory()
    tensors = [pool[k] for k in order]
    node, table = encode_table(tensors)
    got = [n["array"] for n in node["v"]]
    assert got == reference_indices(tensors)
    for t, i in zip(tensors, got):
        value = table.values[i]
        assert torch.equal(value, t.resolve_conj().resolve_neg())
        assert (table.dtypes[i], table.shapes[i], table.nbytes[i]) == (str(t.dtype), tuple(t.shape), t.nbytes)
        plain = t.is_contiguous() and not t.is_conj() and not t.is_neg() and t.nbytes > 0
        # the address recorded is where the value's bytes are, or -1 for a copy that must look again
        assert table.host[i] == (value.data_ptr() if plain else -1)


@pytest.mark.parametrize("first, then", [
    ("sub", "base"), ("base", "sub"), ("neg", "base"), ("base", "neg"), ("strided", "base"),
    ("base", "strided"), ("param", "view"), ("view", "param")])
def test_ties_between_the_fast_and_the_general_path(first, then):
    base = torch.arange(24, dtype=torch.float32)
    make = {"base": lambda: base, "sub": lambda: base.as_subclass(Sub), "neg": lambda: torch._neg_view(base),
            "strided": lambda: base.view(6, 4).t(), "param": lambda: torch.nn.Parameter(base, requires_grad=False),
            "view": lambda: base.view(24)}
    tensors = [make[first](), make[then]()]
    node, _ = encode_table(tensors)
    assert [n["array"] for n in node["v"]] == reference_indices(tensors)


def test_table_rows_are_what_encode_tree_returns():
    state = {"a": tensors_sharing_memory(), "n": np.arange(6, dtype=">i4").reshape(2, 3),
             "f": np.asfortranarray(np.ones((3, 4)))}
    node, table = encode_table(state)
    node2, refs = encode_tree(state)
    assert node == node2 and len(table) == len(refs)
    for i, ref in enumerate(refs):
        row = table[i]
        assert (row.dtype, row.shape, row.nbytes, row.global_shape) == (ref.dtype, ref.shape, ref.nbytes, None)
    big_endian = table.values[node["values"][1]["array"]]
    assert big_endian.dtype.str == "<i4" and table.host[node["values"][1]["array"]] == big_endian.ctypes.data
    assert table.host[node["values"][2]["array"]] == -1          # Fortran order: copied by numpy
    assert [r.dtype for r in table] == [r.dtype for r in refs] and table[-1].dtype == refs[-1].dtype


def mixed_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    small = {f"s{k}": torch.randn(int(torch.randint(1, 900, (1,), generator=g)), generator=g).to(dt)
             for k, dt in zip(range(300), [torch.float32, torch.bfloat16, torch.float64] * 100)}
    base = torch.randn(64, 32, generator=g)
    return {"model": {
        "small": small,
        "big": torch.randn((20 << 20) // 4 + 1000, generator=g),   # shared among the stager's threads
        "strided": base.t(), "base": base, "tied": base.view(32, 64),
        "neg": torch._neg_view(torch.randn(40, generator=g)),
        "empty": torch.empty(0),
        "np": np.arange(1000, dtype=np.float32), "np_f": np.asfortranarray(np.ones((20, 30))),
    }}


def staged_value(plan, buf, i):
    return torch.as_tensor(snapshot_mod._host_destination(plan, buf, buf.numpy(), i)[1])


def expected_value(v):
    return torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v


@pytest.mark.parametrize("chunk", [CHUNK, 4 << 20])
def test_snapshot_copies_every_kind_of_array_and_opens_every_chunk(chunk):
    plan = plan_save(mixed_state(), chunk)
    buf = torch.full((plan.staging_bytes,), 0xAB, dtype=torch.uint8)
    snap = snapshot_mod.take_snapshot(plan, buf, gate=native.Gate())
    assert snap.gate.ready == len(plan.chunks)
    for i, v in enumerate(plan.arrays.values):
        assert torch.equal(staged_value(plan, buf, i), expected_value(v)), i


def test_the_training_threads_copy_opens_no_chunk_until_it_is_done(monkeypatch):
    """Writers streaming behind the training thread's copy would only slow it down: the
    chunks it staged open together when it is done."""
    plan = plan_save(mixed_state(), 4 << 20)
    assert len(plan.chunks) > 1
    gate = native.Gate()
    seen: list[int] = []
    real = snapshot_mod._Batch.stage

    def spy(self, a, b):
        seen.append(gate.ready)
        real(self, a, b)
        seen.append(gate.ready)

    monkeypatch.setattr(snapshot_mod._Batch, "stage", spy)
    buf = torch.zeros(plan.staging_bytes, dtype=torch.uint8)
    snapshot_mod.take_snapshot(plan, buf, gate=gate)
    assert seen and set(seen) == {0}
    assert gate.ready == len(plan.chunks)


def test_the_copier_reads_addresses_afresh():
    """Only the copy on the training thread, right after planning, trusts the addresses
    encoding saw: a copy made later (the lazy copier's) looks at the tensors again."""
    state = {"w": torch.zeros(100), "b": torch.zeros(7)}
    plan = plan_save(state, CHUNK)
    state["w"].data = torch.full((100,), 7.0)        # new memory behind the same tensor object
    buf = torch.zeros(plan.staging_bytes, dtype=torch.uint8)
    snapshot_mod._copy_cpu(plan, buf, plan.layout.staged)
    assert torch.equal(staged_value(plan, buf, 0), torch.full((100,), 7.0))


def test_a_copy_after_other_code_ran_reads_addresses_afresh():
    """copy_into(recorded_addresses=False), what save_async uses after waiting for a slot."""
    state = {"w": torch.zeros(100), "b": torch.zeros(7)}
    plan = plan_save(state, CHUNK)
    state["w"].data = torch.full((100,), 7.0)        # new memory behind the same tensor object
    buf = torch.zeros(plan.staging_bytes, dtype=torch.uint8)
    snapshot_mod.copy_into(snapshot_mod.Snapshot(plan, buf), recorded_addresses=False)
    assert torch.equal(staged_value(plan, buf, 0), torch.full((100,), 7.0))


def test_a_save_that_waited_for_a_slot_copies_what_the_tensors_hold_then(tmp_path, monkeypatch):
    seen = []
    real = snapshot_mod.copy_into

    def spy(*args, **kwargs):
        seen.append(kwargs.get("recorded_addresses", True))
        return real(*args, **kwargs)

    monkeypatch.setattr("async_ckpt.manager.copy_into", spy)
    opts = CheckpointManagerOptions(handle_sigterm=False, io_threads=2, chunk_bytes=CHUNK, max_inflight_saves=1)
    with CheckpointManager(tmp_path, opts) as mgr:
        mgr.save(1, {"w": torch.ones(10)})
        assert seen == [True]                         # a free slot: the recorded addresses
        mgr._slots.acquire()                          # as if an earlier save still held it
        threading.Timer(0.2, mgr._slots.release).start()
        mgr.save(2, {"w": torch.ones(10)})
        assert seen == [True, False]


def test_lazy_deferred_arrays_are_copied_by_the_copier(tmp_path):
    state = mixed_state(3)
    opts = CheckpointManagerOptions(handle_sigterm=False, io_threads=2, chunk_bytes=CHUNK, snapshot="lazy")
    model = torch.nn.Linear(50, 20)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 50)).sum().backward()
    opt.step()
    state.update(net=model, optimizer=opt)
    with CheckpointManager(tmp_path, opts) as mgr:
        mgr.save(1, state)
        got = mgr.load(1)
    for k, v in state["model"].items():
        if k != "small":
            assert torch.equal(torch.as_tensor(np.asarray(got["model"][k])), expected_value(v).resolve_neg()), k
    for k, v in model.state_dict().items():
        assert torch.equal(got["net"][k], v), k


# ----------------------------------------------------------------------------- layout key

def with_shards(monkeypatch, shards):
    """Make plan_save see arrays ``shards`` (index -> (global shape, offset)) as DTensor shards."""
    real = plan_mod.encode_table

    def encode(state, **options):
        node, table = real(state, **options)
        table.globals.update(shards)
        return node, table

    monkeypatch.setattr(plan_mod, "encode_table", encode)


def test_which_arrays_are_shards_is_part_of_the_layout_key(monkeypatch):
    state = {"a": torch.ones(10), "b": torch.ones(10), "c": torch.ones(10)}
    cache = LayoutCache()
    with_shards(monkeypatch, {0: ((20,), (0,))})
    first = plan_save(state, CHUNK, cache=cache)
    monkeypatch.undo()
    with_shards(monkeypatch, {1: ((20,), (0,))})        # same dtypes, shapes and count of shards
    cached = plan_save(state, CHUNK, cache=cache)
    fresh = plan_save(state, CHUNK)
    assert cache.misses == 2
    assert cached.offsets == fresh.offsets != first.offsets
    assert cached.parts == fresh.parts


def test_layout_index_arrays_match_the_layout():
    plan = plan_save(mixed_state(), CHUNK)
    lay = plan.layout
    staged = [i for i in range(len(plan.arrays)) if plan.arrays.nbytes[i] and i not in plan.stored_by]
    assert sorted(lay.staged.tolist()) == staged
    assert lay.offset_array.tolist() == list(plan.offsets)
    assert lay.nbytes_array.tolist() == plan.arrays.nbytes
    assert np.all(np.diff(lay.offset_array[lay.staged]) > 0)          # staging order


# ----------------------------------------------------------------------------- manifest entries

def test_entries_are_kept_while_nothing_changed():
    cache = LayoutCache()
    state = mixed_state()
    first = array_entries(plan_save(state, CHUNK, cache=cache))
    second_plan = plan_save(state, CHUNK, cache=cache)
    assert array_entries(second_plan) is first
    assert first == _build_entries(second_plan)


def test_entries_follow_replica_owners_on_a_reused_layout():
    state = {"a": torch.ones(10), "b": torch.ones(10), "c": torch.ones(3)}
    cache = LayoutCache()
    p1 = plan_save(state, CHUNK, cache=cache, replicas=lambda s, a: {1: (1, 1)})
    e1 = array_entries(p1)
    p2 = plan_save(state, CHUNK, cache=cache, replicas=lambda s, a: {1: (2, 1)})  # same layout, other owner
    assert cache.hits == 1 and p2.layout is p1.layout
    e2 = array_entries(p2)
    assert e2 == _build_entries(p2) and e2[1].stored_by == (2, 1) and e1[1].stored_by == (1, 1)


def test_entries_follow_shard_offsets_on_a_reused_layout(monkeypatch):
    state = {"a": torch.ones(10), "b": torch.ones(4)}
    cache = LayoutCache()
    with_shards(monkeypatch, {0: ((20,), (0,))})
    p1 = plan_save(state, CHUNK, cache=cache)
    e1 = array_entries(p1)
    monkeypatch.undo()
    with_shards(monkeypatch, {0: ((20,), (10,))})      # the same index is a shard, elsewhere
    p2 = plan_save(state, CHUNK, cache=cache)
    assert p2.layout is p1.layout
    assert array_entries(p2) == _build_entries(p2) != e1


def test_entries_after_every_structural_change_match_a_fresh_plan():
    from test_plan_cache import _changes, model, state_of

    for change in _changes():
        m = model()
        s = state_of(m, torch.optim.AdamW(m.parameters()))
        cache = LayoutCache()
        array_entries(plan_save(s, CHUNK, cache=cache))
        changed = change(s)
        cached = plan_save(changed, CHUNK, cache=cache)
        assert array_entries(cached) == _build_entries(plan_save(changed, CHUNK)), change.__name__


# ----------------------------------------------------------------------------- the collector

def test_planning_leaves_no_object_per_array_for_the_collector():
    """Columns, not an object per array: nothing per tensor outlives a young collection."""
    state = {"model": {f"p{k}": torch.ones(k % 7 + 1) for k in range(3000)}}
    cache = LayoutCache()
    plan_save(state, CHUNK, cache=cache)
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        before = len(gc.get_objects())
        plan = plan_save(state, CHUNK, cache=cache)
        gc.collect(0)           # untracks tuples and dicts of atomic values, as every collection does
        grown = len(gc.get_objects()) - before
    finally:
        if was:
            gc.enable()
    assert len(plan.arrays) == 3000 and grown < 300
