"""Local-path conveniences for tests, on top of the real format and commit modules.

Tests that inspect a root on disk use these instead of constructing a backend and a
commit policy each time; every function forwards to the library's own code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from async_ckpt.format.manifest import (MAX_COMMIT_BYTES, MAX_MANIFEST_BYTES, Manifest,  # noqa: F401
                                        commit_marker_bytes, load_json, parse_manifest,
                                        parse_manifest_bytes, seal, seal_state)
from async_ckpt.format.names import (COMMIT_NAME, LOCK_NAME, MANIFEST_NAME, data_file_name,  # noqa: F401
                                     parse_step_dir, parse_tmp_dir, step_dir_name, tmp_dir_name)
from async_ckpt.storage.commit import CommitStatus, RenameCommit
from async_ckpt.storage.native_files import NativeStorage

PathLike = Union[str, Path]


def policy(root: PathLike) -> RenameCommit:
    return RenameCommit(NativeStorage(io_threads=1), str(root))


def commit_status(step_dir: PathLike) -> CommitStatus:
    step_dir = Path(step_dir)
    return policy(step_dir.parent).status(step_dir.name)


def committed_steps(root: PathLike) -> list[int]:
    return sorted(policy(root).committed())


def find_leftovers(root: PathLike) -> list[Path]:
    return [Path(root) / n for n in policy(root).leftovers()]


def read_manifest(step_dir: PathLike) -> Manifest:
    return parse_manifest_bytes((Path(step_dir) / MANIFEST_NAME).read_bytes())


def flip_data_byte(root: PathLike, offset: int) -> None:
    """Invert one byte of the first data file under ``root`` (a damaged chunk)."""
    data = sorted(Path(root).rglob("data-*.bin"))[0]
    with open(data, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
