"""Manifest.to_bytes writes in pieces and reuses the arrays text of an unchanged structure:
its output must stay byte-identical to one json.dumps of the whole document."""

from __future__ import annotations

import hashlib
import json
from enum import IntFlag as _IntFlag

import numpy as np
import pytest

from async_ckpt.format import manifest as M
from async_ckpt.format.tree import encode_table
from async_ckpt.pipeline import saving
from async_ckpt.format.manifest import ArrayEntry, ChunkEntry, FileEntry, ItemEntry, RankResult


def _result(rank: int, arrays: tuple[ArrayEntry, ...]) -> RankResult:
    files = (FileEntry(f"data-r{rank}-0.bin", 4096, rank),)
    chunks = (ChunkEntry(0, 0, 4096, 4096, "raw", 0, 1, 1),)
    tree = {"$": "dict", "keys": ["model", "weird \u00e9 \"key\""],
            "values": [{"$": "dict", "keys": ["w"], "values": [{"$": "tensor", "array": 0, "device": "cpu",
                                                                 "requires_grad": False}]},
                       {"$": "float", "v": "nan"}]}
    return RankResult(rank, files, chunks, {"model": ItemEntry("model", "t"),
                                            "weird \u00e9 \"key\"": ItemEntry("other", "float")},
                      tree, arrays)


def _plain(manifest) -> bytes:
    return M.seal(json.dumps(manifest.to_json(), allow_nan=False, separators=(",", ":")).encode())


def test_to_bytes_is_one_json_document_for_every_kind_of_entry():
    plain = (ArrayEntry("torch.float32", (4, 4), 64, ((0, 0, 64),)),)
    shard = (ArrayEntry("torch.float32", (2, 4), 32, ((0, 64, 32),), (4, 4), (2, 0)),)
    replica = (ArrayEntry("torch.float32", (4, 4), 64, (), stored_by=(0, 0)),)
    manifest = M.merge_ranks(3, [_result(0, plain + shard), _result(1, replica + shard)], writer="w",
                             created_unix=1.5, metrics={"loss": 0.25}, extra={"note": "x"})
    data = manifest.to_bytes()
    assert data == _plain(manifest)
    assert M.parse_manifest_bytes(data) == manifest


def test_the_sealed_file_digest_is_the_sha256_of_the_bytes_written():
    arrays = (ArrayEntry("torch.float32", (4, 4), 64, ((0, 0, 64),)),)
    manifest = M.merge_ranks(2, [_result(0, arrays), _result(1, arrays)], writer="w", created_unix=1.5,
                             metrics={}, extra={})
    data, digest = manifest.to_sealed()
    assert data == manifest.to_bytes() and M.seal_state(data) is True
    assert digest == hashlib.sha256(data).hexdigest() == M.manifest_digest(data)


def test_the_arrays_text_is_reused_only_for_the_same_entries():
    first = (ArrayEntry("torch.float32", (4, 4), 64, ((0, 0, 64),)),)
    m1 = M.merge_ranks(1, [_result(0, first)], writer="w", created_unix=0.0, metrics={})
    assert m1.to_bytes() == _plain(m1)
    assert M._JSON_TEXTS.holds(first)
    # Equal-looking but another tuple (a changed structure builds new entries): serialised afresh.
    second = (ArrayEntry("torch.float32", (16,), 64, ((0, 0, 64),)),)
    m2 = M.merge_ranks(2, [_result(0, second)], writer="w", created_unix=0.0, metrics={})
    assert m2.to_bytes() == _plain(m2)
    assert b'"shape":[16]' in m2.to_bytes()
    assert m1.to_bytes() == _plain(m1)


def test_the_tree_text_is_reused_only_for_the_same_tree_object():
    arrays = (ArrayEntry("torch.float32", (4, 4), 64, ((0, 0, 64),)),)
    r1 = _result(0, arrays)
    m1 = M.merge_ranks(1, [r1], writer="w", created_unix=0.0, metrics={})
    assert m1.to_bytes() == _plain(m1) and M._JSON_TEXTS.holds(r1.tree)
    r2 = _result(0, arrays)                    # an equal tree, another object: serialised afresh
    r2.tree["values"][1] = {"$": "float", "v": "inf"}
    m2 = M.merge_ranks(2, [r2], writer="w", created_unix=0.0, metrics={})
    assert m2.to_bytes() == _plain(m2) and b'"inf"' in m2.to_bytes()
    assert m1.to_bytes() == _plain(m1)


class IntFlag(_IntFlag):
    A = 1


class _Plan:
    """What saving.manifest_tree reads of a plan: the encoded tree, its table, the layout."""

    def __init__(self, value, layout):
        self.tree, self.arrays = encode_table({"x": value})
        self.layout = layout


class _Layout:
    def __init__(self):
        self.tree = []


@pytest.mark.parametrize("before,after", [(1, True), (True, 1), (False, 0), (0.0, -0.0), (-0.0, 0.0),
                                          (1, 1.0), (2.0, 2), ([1, 2], (1, 2)), ("a", "b"), (None, 0),
                                          ({"k": 1}, {"k": 2}), (float("nan"), float("nan")),
                                          (np.float64(1.0), 1.0), (IntFlag.A, 1)])
def test_a_tree_that_serialises_differently_is_never_replaced_by_the_last_one(before, after):
    layout = _Layout()
    first = _Plan(before, layout)
    assert saving.manifest_tree(first) is first.tree
    same = _Plan(before, layout)
    if before == before:                     # NaN never equals itself: always afresh
        assert saving.manifest_tree(same) is first.tree     # the same JSON: the last tree
    changed = _Plan(after, layout)
    got = saving.manifest_tree(changed)
    if json.dumps(changed.tree) != json.dumps(first.tree):
        assert got is changed.tree
    assert json.dumps(got) == json.dumps(changed.tree)


def test_saves_of_one_structure_share_the_tree_and_write_their_own_scalars(tmp_path):
    import torch
    from async_ckpt import CheckpointManager, CheckpointManagerOptions
    opts = CheckpointManagerOptions(handle_sigterm=False, max_to_keep=None)
    model = {"w": torch.zeros(4)}
    with CheckpointManager(tmp_path, opts) as mgr:
        for step, flag in ((1, 1), (2, 1), (3, True), (4, -0.0)):
            mgr.save(step, {"model": model, "meta": {"flag": flag}})
    for step, text in ((1, b'"values":[1]'), (2, b'"values":[1]'), (3, b'"values":[true]'), (4, b'"values":[-0.0]')):
        data = (tmp_path / f"checkpoint-{step}" / "manifest.json").read_bytes()
        assert text in data, step
        assert data == M.seal(json.dumps(json.loads(data[:data.rindex(b',"self_sha256"')] + b"}"),
                                         separators=(",", ":")).encode())
