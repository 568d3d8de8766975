"""Manifest.to_bytes writes in pieces and reuses the arrays text of an unchanged structure:
its output must stay byte-identical to one json.dumps of the whole document."""

from __future__ import annotations

import json

from async_ckpt.format import manifest as M
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


def test_the_arrays_text_is_reused_only_for_the_same_entries():
    first = (ArrayEntry("torch.float32", (4, 4), 64, ((0, 0, 64),)),)
    m1 = M.merge_ranks(1, [_result(0, first)], writer="w", created_unix=0.0, metrics={})
    assert m1.to_bytes() == _plain(m1)
    assert M._arrays_memo[0] is first
    # Equal-looking but another tuple (a changed structure builds new entries): serialised afresh.
    second = (ArrayEntry("torch.float32", (16,), 64, ((0, 0, 64),)),)
    m2 = M.merge_ranks(2, [_result(0, second)], writer="w", created_unix=0.0, metrics={})
    assert m2.to_bytes() == _plain(m2)
    assert b'"shape":[16]' in m2.to_bytes()
    assert m1.to_bytes() == _plain(m1)
