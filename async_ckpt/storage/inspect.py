"""What a step location holds compared with its manifest: data files present, regular, and
of their recorded sizes (docs/FORMAT.md section 7).

Readers check this before allocating anything a manifest declares, so a manifest cannot
make them allocate for files that are not there. Restore raises on the first problem;
verify reports them all. Any thread.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Optional

from ..errors import FormatError, StorageError
from ..format.manifest import Manifest
from .base import Storage


@dataclass(frozen=True)
class FileProblem:
    file: int               # index into manifest.files
    kind: str               # "missing", "not_regular", "truncated", "grown"
    message: str
    size: Optional[int] = None      # the size found, when there is a regular file


def data_file_problems(storage: Storage, location: str, manifest: Manifest) -> tuple[list[FileProblem], dict[int, int]]:
    """``(problems, links)``: every data file that is missing, not a regular file or of the
    wrong size, and the number of names of each file that has more than one (hard links)."""
    problems: list[FileProblem] = []
    links: dict[int, int] = {}
    for i, f in enumerate(manifest.files):
        info = storage.stat(location, f.path)
        if info is None:
            problems.append(FileProblem(i, "missing", f"{f.path}: missing ({f.size} bytes expected)"))
        elif not info.regular:
            problems.append(FileProblem(i, "not_regular", f"{f.path}: not a regular file (symlinks are refused)"))
        else:
            if info.links > 1:
                links[i] = info.links
            if info.size != f.size:
                what = "truncated" if info.size < f.size else "grown"
                problems.append(FileProblem(i, what, f"{f.path}: {what}: {info.size} bytes, the manifest "
                                                     f"says {f.size}", info.size))
    return problems, links


def check_data_files(storage: Storage, location: str, manifest: Manifest) -> None:
    """Raise for the first data file that is missing, not regular or of the wrong size."""
    problems, _ = data_file_problems(storage, location, manifest)
    if not problems:
        return
    p = problems[0]
    where = storage.describe(location, manifest.files[p.file].path)
    if p.kind == "missing":
        raise StorageError(errno.ENOENT, "No such file or directory (data file)", where)
    if p.kind == "not_regular":
        raise StorageError(errno.ELOOP, "data files must be regular files, not symlinks", where)
    raise FormatError(f"{where}: {p.size} bytes on disk, the manifest says {manifest.files[p.file].size}")
