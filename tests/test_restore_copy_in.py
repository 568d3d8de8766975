"""Items restored by copying bytes alone: a dict of live CPU tensors whose every saved
tensor has a live counterpart of its dtype and shape skips the tree decoding and the
per-tensor ``copy_``; its bytes go from the chunks into the tensors in one native call,
after every check has passed. Everything else takes the general path, bitwise the same."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions, native
from async_ckpt.errors import ChecksumError, FormatError, RestoreError
from async_ckpt.format.names import step_dir_name
from async_ckpt.pipeline import restore

from ckpt_layout import flip_data_byte, read_manifest


def opts(**kw) -> CheckpointManagerOptions:
    return CheckpointManagerOptions(handle_sigterm=False, compression=None, chunk_bytes=1 << 16, **kw)


def small_dict(seed: int, n: int = 300) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        dtype = (torch.float32, torch.bfloat16, torch.int64)[i % 3]
        t = torch.randn(1 + i % 37, generator=g).to(dtype) if dtype != torch.int64 else \
            torch.randint(-1 << 40, 1 << 40, (1 + i % 37,), generator=g)
        out[f"p{i:04d}"] = t
    out["matrix"] = torch.randn(3, 5, generator=g)
    out["empty"] = torch.empty(0, 4)
    out["nested"] = {"a": torch.randn(4, generator=g), "b": {"c": torch.randn(2, 2, generator=g)}}
    return out


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def assert_same(got: dict, want: dict) -> None:
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()
    for k in want:
        a, b = got[k], want[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        assert torch.equal(a.reshape(-1).view(torch.uint8) if a.numel() else a,
                           b.reshape(-1).view(torch.uint8) if b.numel() else b), k


def clone(tree: dict) -> dict:
    return {k: clone(v) if isinstance(v, dict) else v.clone() for k, v in tree.items()}


@pytest.fixture(autouse=True, params=["default", "matched"])
def restore_path(request, monkeypatch):
    """Each test runs as the library chooses (a state of small arrays is read first, into
    scratch, and matched during the read) and again with every state matched first."""
    if request.param == "matched":
        monkeypatch.setattr(restore, "_READ_FIRST_MEAN_BELOW", 0)
    return request.param


@pytest.fixture
def decoded(monkeypatch):
    """The item names each restore decoded the general way."""
    names: list[list[str]] = []
    real = restore.decode_items

    def spy(tree, arrays, which=None):
        names.append(sorted(which) if which is not None else ["<all>"])
        return real(tree, arrays, which)

    monkeypatch.setattr(restore, "decode_items", spy)
    return names


@pytest.mark.parametrize("atomic", [True, False])
def test_a_dict_of_small_tensors_is_copied_in_place_without_decoding(tmp_path, decoded, atomic):
    saved = small_dict(1)
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"model": saved})
        live = small_dict(2)
        objects = {k: id(v) for k, v in flat(live).items()}
        decoded.clear()
        mgr.restore({"model": live}, step=1, atomic=atomic)
    assert_same(live, saved)
    assert {k: id(v) for k, v in flat(live).items()} == objects          # the same tensors, in place
    assert decoded and all("model" not in names for names in decoded)


def test_an_ordered_dict_with_int_keys_and_a_tensor_under_two_keys_is_copied(tmp_path, decoded):
    def state(seed):
        g = torch.Generator().manual_seed(seed)
        shared = torch.randn(6, generator=g)
        return OrderedDict([(0, shared), (1, torch.randn(3, generator=g)), ("again", shared)])

    saved = state(1)
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"sd": saved})
        live = state(2)
        decoded.clear()
        mgr.restore({"sd": live}, step=1)
    assert all("sd" not in names for names in decoded)
    assert live["again"] is live[0]
    for k in saved:
        assert torch.equal(live[k], saved[k]), k


# Each of these live states differs from the saved one in a way a byte copy must not
# paper over: the item goes the general way, which converts, refuses or replaces.
def _other_dtype(live):
    live["p0000"] = live["p0000"].double()


def _transposed(live):
    live["matrix"] = torch.randn(5, 3).t()          # same shape, not contiguous


def _missing_key(live):
    del live["p0001"]


def _plain_value(live):
    live["p0002"] = 7


def _ndarray(live):
    live["p0003"] = live["p0003"].numpy().copy()


def _nested_not_a_dict(live):
    live["nested"]["b"] = [live["nested"]["b"]["c"]]


def _negative_view(live):
    live["p0004"] = torch._neg_view(live["p0004"].clone())


@pytest.mark.parametrize("change", [_other_dtype, _transposed, _missing_key, _plain_value, _ndarray,
                                    _nested_not_a_dict, _negative_view])
def test_every_kind_of_difference_takes_the_general_path(tmp_path, decoded, change):
    saved = small_dict(3)
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"model": saved})
        live = small_dict(4)
        change(live)
        decoded.clear()
        mgr.restore({"model": live}, step=1)
        want = mgr.load(1)["model"]
    assert any("model" in names for names in decoded)
    got = flat(live)
    for k, v in flat(want).items():
        g = got[k]
        if isinstance(g, np.ndarray):
            g = torch.from_numpy(g)
        assert torch.equal(g.to(v.dtype), v) and g.shape == v.shape, k


def test_cover_defers_the_small_tensors_checks_and_fits_refuses_a_shape(tmp_path):
    saved = small_dict(5, n=4)
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"model": saved})
    manifest = read_manifest(tmp_path / step_dir_name(1))
    section = manifest.section(0)
    node = section.tree["values"][section.tree["keys"].index("model")]
    now: list = []
    later: list = []
    live = clone(saved)
    assert restore.cover(live, node, section.arrays, manifest, now, later, {})
    # All small, in shared chunks, but the empty one (no chunk: checked at once).
    assert [section.arrays[i].nbytes for i, _ in now] == [0] and len(later) == len(flat(saved)) - 1
    assert all(restore.fits(t, section.arrays[i], {}) for i, t, _ in later)
    live["matrix"] = torch.zeros(5, 3)
    later = []
    assert restore.cover(live, node, section.arrays, manifest, [], later, {})
    refused = [i for i, t, _ in later if not restore.fits(t, section.arrays[i], {})]
    assert [section.arrays[i].shape for i in refused] == [(3, 5)]
    live["matrix"] = [1.0]
    assert not restore.cover(live, node, section.arrays, manifest, [], [], {})


def test_a_bad_chunk_changes_no_tensor_of_a_copied_item(tmp_path):
    saved = small_dict(6)
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"model": saved})
    flip_data_byte(tmp_path, 100)
    live = small_dict(7)
    before = clone(live)
    with CheckpointManager(tmp_path, opts()) as mgr, pytest.raises(ChecksumError):
        mgr.restore({"model": live}, step=1)
    assert_same(live, before)


class Refuses(torch.nn.Linear):
    def load_state_dict(self, *args, **kwargs):
        raise RuntimeError("this module refuses its state")


def test_an_item_failing_after_a_copied_item_leaves_the_later_copied_item_alone(tmp_path):
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"a": small_dict(1, n=20), "b": Refuses(3, 3), "c": small_dict(2, n=20)})
        live_a, live_c = small_dict(3, n=20), small_dict(4, n=20)
        before_c = clone(live_c)
        with pytest.raises(RestoreError, match=r"refuses its state.*\['a'\] were already restored"):
            mgr.restore({"a": live_a, "b": Refuses(3, 3), "c": live_c}, step=1)
    assert_same(live_a, small_dict(1, n=20))
    assert_same(live_c, before_c)


def test_views_of_a_chunk_shared_with_a_copied_item_do_not_live_in_the_staging_buffer(tmp_path):
    # "model" is copied in (its chunks may come from the staging buffer); the live "extra"
    # is an empty list, so it is replaced by the saved one: views of the chunks, decoded the
    # general way. Those must own their memory: the next save reuses the staging buffer.
    def state(seed):
        g = torch.Generator().manual_seed(seed)
        return {"model": {f"w{i}": torch.randn(5, generator=g) for i in range(50)},
                "extra": [torch.randn(5, generator=g) for _ in range(50)]}

    saved = state(1)
    with CheckpointManager(tmp_path, opts(max_to_keep=None)) as mgr:
        mgr.save(1, saved)
        live = state(2)
        live["extra"] = []
        mgr.restore(live, step=1)
        kept = [t.clone() for t in live["extra"]]
        mgr.save(2, state(3))           # fills the staging buffer with other bytes
    assert len(live["extra"]) == len(saved["extra"])
    for got, want, copy in zip(live["extra"], saved["extra"], kept):
        assert torch.equal(got, want) and torch.equal(got, copy)
    assert_same(live["model"], saved["model"])


def test_a_tensor_in_a_copied_item_and_in_another_item_is_restored_in_both(tmp_path, decoded):
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(8, generator=g)
    saved = {"a": {"w": shared, "v": torch.randn(3, generator=g)}, "b": [shared]}
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, saved)
        live_shared = torch.zeros(8)
        live = {"a": {"w": live_shared, "v": torch.zeros(3)}, "b": [live_shared]}
        decoded.clear()
        mgr.restore(live, step=1)
    assert any("a" in names for names in decoded)     # it shares an array: decoded
    assert torch.equal(live["a"]["w"], shared) and torch.equal(live["b"][0], shared)
    assert torch.equal(live["a"]["v"], saved["a"]["v"])


def test_a_large_tensor_in_a_copied_item_is_read_in_place(tmp_path, decoded):
    g = torch.Generator().manual_seed(0)
    saved = {"big": torch.randn(1 << 16, generator=g), "small": torch.randn(3, generator=g)}
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"sd": saved})
        live = {"big": torch.zeros(1 << 16), "small": torch.zeros(3)}
        decoded.clear()
        mgr.restore({"sd": live}, step=1)
    assert all("sd" not in names for names in decoded)
    assert torch.equal(live["big"], saved["big"]) and torch.equal(live["small"], saved["small"])


# ----------------------------------------------------------------------------- native copy_all

def _addr(a: np.ndarray) -> int:
    return a.ctypes.data


def test_copy_all_copies_every_range_with_threads():
    src = np.random.default_rng(0).integers(0, 255, 24 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    n = 1000
    size = len(src) // n
    order = np.random.default_rng(1).permutation(n)
    srcs = np.array([_addr(src) + i * size for i in range(n)], dtype=np.uint64)
    dsts = np.array([_addr(dst) + int(order[i]) * size for i in range(n)], dtype=np.uint64)
    native.copy_all(srcs, dsts, np.full(n, size, dtype=np.uint64), threads=3)
    want = np.empty_like(src)
    for i in range(n):
        want[order[i] * size:(order[i] + 1) * size] = src[i * size:(i + 1) * size]
    assert np.array_equal(dst[:n * size], want[:n * size])


def test_copy_all_with_overlapping_destinations_lets_the_last_copy_win():
    a = np.full(16 << 20, 1, dtype=np.uint8)
    b = np.full(16 << 20, 2, dtype=np.uint8)
    dst = np.zeros(16 << 20, dtype=np.uint8)
    native.copy_all(np.array([_addr(a), _addr(b)], dtype=np.uint64),
                    np.array([_addr(dst), _addr(dst) + 8], dtype=np.uint64),
                    np.array([len(a), len(b) - 8], dtype=np.uint64), threads=4)
    assert dst[:8].tolist() == [1] * 8 and (dst[8:] == 2).all()


def test_copy_all_refuses_bad_arguments_before_copying():
    dst = np.zeros(8, dtype=np.uint8)
    src = np.ones(8, dtype=np.uint8)
    with pytest.raises(FormatError, match="null"):
        native.copy_all(np.array([_addr(src), 0], dtype=np.uint64), np.array([_addr(dst), _addr(dst)], dtype=np.uint64),
                        np.array([4, 4], dtype=np.uint64))
    assert (dst == 0).all()
    with pytest.raises(FormatError, match="same length"):
        native.copy_all(np.array([_addr(src)], dtype=np.uint64), np.array([], dtype=np.uint64),
                        np.array([4], dtype=np.uint64))
    with pytest.raises(FormatError, match="threads"):
        native.copy_all(np.array([], dtype=np.uint64), np.array([], dtype=np.uint64), np.array([], dtype=np.uint64),
                        threads=0)


def test_large_tensors_sharing_a_chunk_in_a_copied_item_are_read_in_place(tmp_path, monkeypatch, decoded):
    # Two 384 KiB tensors in one 1 MiB chunk: read in place (their backups copied while the
    # disk works), not copied out after the read; the small one is copied out.
    read_in_place: list[set] = []
    real = restore._in_place

    def spy(*args, single_owner):
        out = real(*args, single_owner=single_owner)
        read_in_place.append({i for found in out.values() for i in found})
        return out

    monkeypatch.setattr(restore, "_in_place", spy)
    g = torch.Generator().manual_seed(0)
    saved = {"a": torch.randn(98304, generator=g), "b": torch.randn(98304, generator=g),
             "tiny": torch.randn(3, generator=g)}
    with CheckpointManager(tmp_path, CheckpointManagerOptions(handle_sigterm=False, compression=None,
                                                              chunk_bytes=1 << 20)) as mgr:
        mgr.save(1, {"sd": saved})
        section = read_manifest(tmp_path / step_dir_name(1)).section(0)
        assert len({a.parts[0][0] for a in section.arrays}) == 1          # one shared chunk
        live = {k: torch.zeros_like(v) for k, v in saved.items()}
        decoded.clear()
        mgr.restore({"sd": live}, step=1)
    assert all("sd" not in names for names in decoded)
    assert [len(found) for found in read_in_place] == [2]
    for k in saved:
        assert torch.equal(live[k], saved[k]), k


def test_a_small_tensor_of_the_wrong_shape_found_during_the_read_puts_everything_back(tmp_path):
    # "big" is read in place (backed up first); the small tensors' checks run while the
    # chunks are read, and "v" does not fit: the item is decoded the general way, which
    # refuses the shape, and "big" gets its bytes back.
    g = torch.Generator().manual_seed(0)
    saved = {"big": torch.randn(1 << 16, generator=g), "v": torch.randn(5, generator=g),
             "w": torch.randn(3, generator=g)}
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"sd": saved})
        live = {"big": torch.randn(1 << 16, generator=g), "v": torch.zeros(6), "w": torch.zeros(3)}
        before = clone(live)
        with pytest.raises(RestoreError, match=r"sd\['v'\]: shape \(5,\) in checkpoint, \(6,\) in target"):
            mgr.restore({"sd": live}, step=1)
    assert_same(live, before)


def test_a_small_tensor_of_another_dtype_is_converted_like_the_general_path(tmp_path, decoded):
    g = torch.Generator().manual_seed(0)
    saved = {"big": torch.randn(1 << 16, generator=g), "v": torch.randn(5, generator=g)}
    with CheckpointManager(tmp_path, opts()) as mgr:
        mgr.save(1, {"sd": saved})
        live = {"big": torch.zeros(1 << 16), "v": torch.zeros(5, dtype=torch.float64)}
        decoded.clear()
        mgr.restore({"sd": live}, step=1)
    assert any("sd" in names for names in decoded)
    assert torch.equal(live["big"], saved["big"]) and torch.equal(live["v"], saved["v"].double())
    assert live["v"].dtype == torch.float64


def test_materialised_arrays_own_their_memory():
    # A late item's arrays become views of a copy of their chunk, never of the scratch
    # buffer the chunk was read into (it is reused once the restore is done).
    from async_ckpt.format.manifest import ArrayEntry
    scratch = torch.arange(64, dtype=torch.uint8)
    entries = [ArrayEntry("torch.float32", (2,), 8, ((0, 8, 8),)), ArrayEntry("torch.int16", (3,), 6, ((0, 17, 6),))]
    arrays = {0: restore.ChunkBytes(scratch, 8), 1: restore.ChunkBytes(scratch, 17)}
    restore._materialise(arrays, [0, 1], entries)
    assert arrays[0].dtype == torch.float32 and arrays[0].shape == (2,)
    assert arrays[1].dtype == torch.int16 and arrays[1].shape == (3,)           # odd offset: copied
    assert bytes(arrays[0].view(torch.uint8).tolist()) == bytes(range(8, 16))
    assert bytes(arrays[1].view(torch.uint8).tolist()) == bytes(range(17, 23))
    scratch.zero_()
    assert bytes(arrays[0].view(torch.uint8).tolist()) == bytes(range(8, 16))
    assert bytes(arrays[1].view(torch.uint8).tolist()) == bytes(range(17, 23))
