"""Manifest validation and the commit rules of docs/FORMAT.md, without the native core."""

import json

import pytest

import ckpt_layout as layout
from async_ckpt.errors import FormatError


def valid_doc():
    return {
        "format": "async_ckpt", "format_version": 1, "writer": "test", "step": 7,
        "created_unix": 1.5, "world_size": 1, "metrics": {"loss": 0.5},
        "files": [{"path": "data-r0-0.bin", "size": 100, "rank": 0}],
        "chunks": [
            {"file": 0, "offset": 0, "length": 40, "raw_length": 40, "codec": "raw", "shuffle": 0,
             "crc32c": 1, "raw_crc32c": 1},
            {"file": 0, "offset": 40, "length": 10, "raw_length": 64, "codec": "zstd", "shuffle": 4,
             "crc32c": 2, "raw_crc32c": 3},
        ],
        "ranks": [{"rank": 0,
                   "items": {"model": {"kind": "model", "type": "x.M", "reconstructed": False}},
                   "tree": {"$": "dict", "keys": ["model"],
                            "values": [{"$": "dict", "keys": ["w", "b"],
                                        "values": [{"$": "tensor", "array": 0, "device": "cpu",
                                                    "requires_grad": False},
                                                   {"$": "ndarray", "array": 1}]}]},
                   "arrays": [{"dtype": "torch.float32", "shape": [10], "nbytes": 40, "parts": [[0, 0, 40]]},
                              {"dtype": "<f8", "shape": [2, 4], "nbytes": 64, "parts": [[1, 0, 64]]}]}],
        "extra": {},
    }


def test_valid_manifest_parses_and_round_trips():
    m = layout.parse_manifest(valid_doc())
    assert m.step == 7 and m.chunks[1].codec == "zstd" and m.ranks[0].arrays[1].shape == (2, 4)
    again = layout.parse_manifest(json.loads(m.to_bytes()))
    assert again == m


def mutate(path, value):
    doc = valid_doc()
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


BAD = [
    (("format",), "pickle"),
    (("format_version",), 2),
    (("format_version",), True),
    (("step",), -1),
    (("step",), "7"),
    (("world_size",), 0),
    (("files", 0, "path"), "../escape.bin"),
    (("files", 0, "path"), "/etc/passwd"),
    (("files", 0, "path"), "a/b.bin"),
    (("files", 0, "path"), ".."),
    (("files", 0, "path"), "manifest.json"),
    (("files", 0, "size"), -5),
    (("chunks", 0, "file"), 3),
    (("chunks", 0, "offset"), 90),              # runs past the end of the file
    (("chunks", 0, "codec"), "lz4"),
    (("chunks", 1, "shuffle"), 3),
    (("chunks", 0, "length"), 39),              # raw chunk with length != raw_length
    (("chunks", 1, "offset"), 30),              # overlaps chunk 0
    (("chunks", 0, "crc32c"), 1 << 32),
    (("chunks", 1, "raw_length"), (1 << 31) + 1),
    (("chunks", 1, "raw_length"), 10 * 32768 + 1),    # more than zstd can expand 10 bytes to
    (("ranks", 0, "items", "model", "kind"), "weights"),
    (("ranks", 0, "arrays", 0, "dtype"), "object"),
    (("ranks", 0, "arrays", 0, "dtype"), "torch.evil"),
    (("ranks", 0, "arrays", 0, "shape"), [11]),          # nbytes no longer matches
    (("ranks", 0, "arrays", 0, "shape"), [-10]),
    (("ranks", 0, "arrays", 0, "shape"), [1] * 65),
    (("ranks", 0, "arrays", 0, "shape"), [1 << 40, 1 << 40]),
    (("ranks", 0, "arrays", 0, "parts"), [[0, 8, 40]]),  # outside its chunk
    (("ranks", 0, "arrays", 0, "parts"), [[5, 0, 40]]),
    (("ranks", 0, "arrays", 0, "parts"), [[0, 0, 20]]),  # does not sum to nbytes
    (("ranks", 0, "tree"), {"$": "list", "v": []}),
    (("ranks", 0, "tree", "values", 0, "values", 0, "array"), 9),
    (("ranks",), []),
    (("ranks", 0, "arrays", 1, "parts"), [[0, 0, 40], [1, 0, 24]]),   # overlaps array 0
    (("metrics",), {"loss": "low"}),
    (("files",), KeyError),
]


@pytest.mark.parametrize("path,value", BAD, ids=[".".join(map(str, p)) + "=" + repr(v)[:20] for p, v in BAD])
def test_each_violation_is_a_named_format_error(path, value):
    with pytest.raises(FormatError) as info:
        layout.parse_manifest(mutate(path, value))
    assert "manifest" in str(info.value) or "dtype" in str(info.value)


def test_json_with_nan_and_oversize_rejected():
    with pytest.raises(FormatError):
        layout.load_json(b'{"a": NaN}', "m", 100)
    with pytest.raises(FormatError):
        layout.load_json(b"[" * 10 + b"]" * 10, "m", 5)
    with pytest.raises(FormatError):
        layout.load_json(b"\xff\xfe", "m", 100)


def make_step(root, step=7, doc=None):
    d = root / layout.step_dir_name(step)
    d.mkdir()
    data = json.dumps(doc or valid_doc()).encode()
    (d / "manifest.json").write_bytes(data)
    (d / "data-r0-0.bin").write_bytes(b"\0" * 100)
    (d / "COMMIT").write_bytes(layout.commit_marker_bytes(step, data))
    return d


def test_commit_status_rules(tmp_path):
    d = make_step(tmp_path)
    assert layout.commit_status(d).committed
    assert layout.committed_steps(tmp_path) == [7]

    (d / "COMMIT").write_bytes(layout.commit_marker_bytes(7, b"other"))
    assert "digest" in layout.commit_status(d).reason

    (d / "COMMIT").unlink()
    assert "no commit marker" in layout.commit_status(d).reason
    assert layout.committed_steps(tmp_path) == []


def test_marker_step_must_match_directory(tmp_path):
    d = make_step(tmp_path, 7)
    d.rename(tmp_path / "checkpoint-8")
    assert not layout.commit_status(tmp_path / "checkpoint-8").committed


def test_names():
    assert layout.parse_step_dir("checkpoint-12") == 12
    assert layout.parse_step_dir("checkpoint-0") == 0
    for bad in ("checkpoint-012", "checkpoint--1", "checkpoint-1a", "ckpt-1", "checkpoint-"):
        assert layout.parse_step_dir(bad) is None
    tmp = layout.tmp_dir_name(5)
    assert tmp.startswith(".") and layout.parse_tmp_dir(tmp) == 5 and layout.parse_step_dir(tmp) is None


def test_leftovers_found_and_symlinked_step_ignored(tmp_path):
    (tmp_path / layout.tmp_dir_name(3)).mkdir()
    real = make_step(tmp_path, 7)
    (tmp_path / "checkpoint-9").symlink_to(real)
    assert len(layout.find_leftovers(tmp_path)) == 1
    assert layout.committed_steps(tmp_path) == [7]


def test_commit_refuses_to_replace_existing(tmp_path):
    make_step(tmp_path, 7)
    tmp = tmp_path / layout.tmp_dir_name(7)
    tmp.mkdir()
    manifest = layout.parse_manifest(valid_doc())
    with pytest.raises(FileExistsError):
        layout.policy(tmp_path).publish(str(tmp), 7, manifest)
    assert layout.commit_status(tmp_path / "checkpoint-7").committed
