"""Directory layout, manifest schema and the commit protocol (docs/FORMAT.md).

This module knows names, JSON documents and the order of durable operations; it
knows nothing of tensors' meaning or of compression. Everything read from disk is
untrusted: :func:`parse_manifest` validates a manifest in one pass and raises
:class:`~async_ckpt.errors.FormatError` naming the first violation.

Threads: the manager's background commit thread calls :func:`write_manifest` and
:func:`commit`; any thread may call the read-only helpers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import CheckpointError, FormatError, StorageError

FORMAT_NAME = "async_ckpt"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
COMMIT_NAME = "COMMIT"
LOCK_NAME = ".async_ckpt.lock"
MAX_MANIFEST_BYTES = 256 << 20
MAX_COMMIT_BYTES = 4096
MAX_CHUNK_RAW = 1 << 31
# The densest zstd block is RLE: 4 bytes for 128 KiB, so a frame never expands further.
MAX_ZSTD_RATIO = 32768
MAX_ARRAY_BYTES = 1 << 48
MAX_NDIM = 64
CODECS = ("raw", "zstd")
SHUFFLES = (0, 2, 4, 8)
ITEM_KINDS = ("model", "optimizer", "scheduler", "progress", "data", "rng", "config",
              "tokenizer", "scaler", "other")

_STEP_DIR = re.compile(r"^checkpoint-(0|[1-9][0-9]{0,18})$")
_TMP_DIR = re.compile(r"^\.checkpoint-(0|[1-9][0-9]{0,18})\.tmp-[A-Za-z0-9_-]{1,64}$")
_QUARANTINE_DIR = re.compile(r"^checkpoint-(0|[1-9][0-9]{0,18})\.corrupt-[A-Za-z0-9_-]{1,64}$")
_SAFE_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------- names

def step_dir_name(step: int) -> str:
    return f"checkpoint-{step}"


def tmp_dir_name(step: int) -> str:
    return f".checkpoint-{step}.tmp-{secrets.token_hex(6)}"


def quarantine_dir_name(step: int) -> str:
    return f"checkpoint-{step}.corrupt-{secrets.token_hex(4)}"


def parse_step_dir(name: str) -> int | None:
    """The step of a final-named step directory, else None."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def parse_tmp_dir(name: str) -> int | None:
    m = _TMP_DIR.match(name)
    return int(m.group(1)) if m else None


def is_safe_file_name(name: str) -> bool:
    return bool(_SAFE_FILE.match(name)) and name not in (MANIFEST_NAME, COMMIT_NAME)


def data_file_name(rank: int, index: int) -> str:
    return f"data-r{rank}-{index}.bin"


# ----------------------------------------------------------------------------- manifest schema

@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    rank: int


@dataclass(frozen=True)
class ChunkEntry:
    file: int
    offset: int
    length: int
    raw_length: int
    codec: str
    shuffle: int
    crc32c: int
    raw_crc32c: int


@dataclass(frozen=True)
class ArrayEntry:
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    parts: tuple[tuple[int, int, int], ...]   # (chunk, offset in raw chunk, length)


@dataclass(frozen=True)
class ItemEntry:
    kind: str
    type: str
    reconstructed: bool = False


@dataclass(frozen=True)
class RankSection:
    rank: int
    items: dict[str, ItemEntry]
    tree: Any
    arrays: tuple[ArrayEntry, ...]


@dataclass(frozen=True)
class Manifest:
    step: int
    writer: str
    created_unix: float
    world_size: int
    metrics: dict[str, float]
    files: tuple[FileEntry, ...]
    chunks: tuple[ChunkEntry, ...]
    ranks: tuple[RankSection, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (tuples stand for JSON arrays)."""
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "writer": self.writer,
            "step": self.step,
            "created_unix": self.created_unix,
            "world_size": self.world_size,
            "metrics": dict(self.metrics),
            "files": [{"path": f.path, "size": f.size, "rank": f.rank} for f in self.files],
            "chunks": [{"file": c.file, "offset": c.offset, "length": c.length,
                        "raw_length": c.raw_length, "codec": c.codec, "shuffle": c.shuffle,
                        "crc32c": c.crc32c, "raw_crc32c": c.raw_crc32c} for c in self.chunks],
            "ranks": [{"rank": r.rank,
                       "items": {k: {"kind": v.kind, "type": v.type, "reconstructed": v.reconstructed}
                                 for k, v in r.items.items()},
                       "tree": r.tree,
                       # json writes tuples as arrays: no per-array list copies (20k arrays: 3x faster)
                       "arrays": [{"dtype": a.dtype, "shape": a.shape, "nbytes": a.nbytes, "parts": a.parts}
                                  for a in r.arrays]}
                      for r in self.ranks],
            "extra": self.extra,
        }

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), allow_nan=False, separators=(",", ":")).encode()


# ----------------------------------------------------------------------------- validation

def _int(value: Any, where: str, lo: int = 0, hi: int | None = None) -> int:
    # bool is an int subclass; a manifest saying `true` for a size is lying.
    if type(value) is not int:
        raise FormatError(f"{where}: expected an integer, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise FormatError(f"{where}: {value} out of range [{lo}, {hi if hi is not None else 'inf'}]")
    return value


def _expect(value: Any, kind: type, label: str, where: str) -> Any:
    if not isinstance(value, kind):
        raise FormatError(f"{where}: expected {label}, got {type(value).__name__}")
    return value


def _obj(value: Any, where: str) -> dict:
    return _expect(value, dict, "an object", where)


def _list(value: Any, where: str) -> list:
    return _expect(value, list, "an array", where)


def _str(value: Any, where: str) -> str:
    return _expect(value, str, "a string", where)


def _reject_constant(name: str) -> Any:
    raise FormatError(f"invalid JSON constant {name}")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise FormatError(f"duplicate JSON key {dup!r}")
    return doc


def load_json(data: bytes, what: str, cap: int) -> Any:
    """Parse untrusted JSON: size-capped, no NaN/Infinity, no duplicate keys (which would let
    two readers see different documents), every failure a FormatError."""
    if len(data) > cap:
        raise FormatError(f"{what}: {len(data)} bytes exceeds the cap of {cap}")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant,
                          object_pairs_hook=_unique_keys)
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError and ints over Python's 4300-digit limit.
        raise FormatError(f"{what}: not valid JSON ({e})") from None


def _array_itemsize(dtype: str, where: str) -> int:
    from .tree import parse_array_dtype  # tree needs torch/numpy; keep layout import-light
    try:
        return parse_array_dtype(dtype)[2]
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None


def parse_manifest(doc: Any) -> Manifest:
    """Validate an untrusted manifest document; raise FormatError naming the first problem."""
    doc = _obj(doc, "manifest")
    if doc.get("format") != FORMAT_NAME:
        raise FormatError(f"manifest: format {doc.get('format')!r} is not {FORMAT_NAME!r}")
    version = _int(doc.get("format_version"), "manifest.format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"manifest: unsupported format_version {version} (this reader knows {FORMAT_VERSION})")
    step = _int(doc.get("step"), "manifest.step")
    writer = _str(doc.get("writer", ""), "manifest.writer")
    created = doc.get("created_unix", 0.0)
    if type(created) not in (int, float):
        raise FormatError("manifest.created_unix: expected a number")
    world_size = _int(doc.get("world_size"), "manifest.world_size", 1, 1 << 20)
    metrics_doc = _obj(doc.get("metrics", {}), "manifest.metrics")
    metrics: dict[str, float] = {}
    for k, v in metrics_doc.items():
        if type(v) not in (int, float):
            raise FormatError(f"manifest.metrics.{k}: expected a number")
        metrics[k] = float(v)

    files: list[FileEntry] = []
    seen_paths: set[str] = set()
    for i, f in enumerate(_list(doc.get("files"), "manifest.files")):
        where = f"manifest.files[{i}]"
        f = _obj(f, where)
        path = _str(f.get("path"), where + ".path")
        if not is_safe_file_name(path):
            raise FormatError(f"{where}.path: {path!r} is not a single safe file name")
        if path in seen_paths:
            raise FormatError(f"{where}.path: duplicate file {path!r}")
        seen_paths.add(path)
        files.append(FileEntry(path, _int(f.get("size"), where + ".size"),
                               _int(f.get("rank"), where + ".rank", 0, world_size - 1)))

    chunks: list[ChunkEntry] = []
    extents: list[tuple[int, int, int, int]] = []
    for i, c in enumerate(_list(doc.get("chunks"), "manifest.chunks")):
        where = f"manifest.chunks[{i}]"
        c = _obj(c, where)
        fi = _int(c.get("file"), where + ".file", 0, len(files) - 1)
        offset = _int(c.get("offset"), where + ".offset")
        length = _int(c.get("length"), where + ".length")
        raw = _int(c.get("raw_length"), where + ".raw_length", 0, MAX_CHUNK_RAW)
        codec = _str(c.get("codec"), where + ".codec")
        if codec not in CODECS:
            raise FormatError(f"{where}.codec: unknown codec {codec!r}")
        shuffle = _int(c.get("shuffle"), where + ".shuffle")
        if shuffle not in SHUFFLES:
            raise FormatError(f"{where}.shuffle: {shuffle} not one of {SHUFFLES}")
        if codec == "raw" and (length != raw or shuffle != 0):
            raise FormatError(f"{where}: raw chunk must have length == raw_length and shuffle 0")
        if codec == "zstd" and raw > length * MAX_ZSTD_RATIO:
            raise FormatError(f"{where}: {length} stored bytes cannot decode to {raw} "
                              f"(zstd expands at most {MAX_ZSTD_RATIO}x)")
        if offset + length > files[fi].size:
            raise FormatError(f"{where}: bytes [{offset}, {offset + length}) run past the end of "
                              f"{files[fi].path} ({files[fi].size} bytes)")
        crc = _int(c.get("crc32c"), where + ".crc32c", 0, 0xFFFFFFFF)
        raw_crc = _int(c.get("raw_crc32c"), where + ".raw_crc32c", 0, 0xFFFFFFFF)
        chunks.append(ChunkEntry(fi, offset, length, raw, codec, shuffle, crc, raw_crc))
        if length:
            extents.append((fi, offset, offset + length, i))
    extents.sort()
    for a, b in zip(extents, extents[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            raise FormatError(f"manifest.chunks[{b[3]}] overlaps manifest.chunks[{a[3]}] "
                              f"in {files[a[0]].path}")

    ranks: list[RankSection] = []
    for r_i, r in enumerate(_list(doc.get("ranks"), "manifest.ranks")):
        where = f"manifest.ranks[{r_i}]"
        r = _obj(r, where)
        rank = _int(r.get("rank"), where + ".rank", 0, world_size - 1)
        if rank != r_i:
            raise FormatError(f"{where}.rank: expected {r_i}, got {rank}")
        items: dict[str, ItemEntry] = {}
        for name, it in _obj(r.get("items"), where + ".items").items():
            it = _obj(it, f"{where}.items.{name}")
            kind = _str(it.get("kind"), f"{where}.items.{name}.kind")
            if kind not in ITEM_KINDS:
                raise FormatError(f"{where}.items.{name}.kind: unknown kind {kind!r}")
            rec = it.get("reconstructed", False)
            if type(rec) is not bool:
                raise FormatError(f"{where}.items.{name}.reconstructed: expected a boolean")
            items[name] = ItemEntry(kind, _str(it.get("type", ""), f"{where}.items.{name}.type"), rec)
        arrays: list[ArrayEntry] = []
        claimed: list[tuple[int, int, int, int]] = []
        for a_i, a in enumerate(_list(r.get("arrays"), where + ".arrays")):
            aw = f"{where}.arrays[{a_i}]"
            a = _obj(a, aw)
            dtype = _str(a.get("dtype"), aw + ".dtype")
            itemsize = _array_itemsize(dtype, aw + ".dtype")
            shape = tuple(_int(d, f"{aw}.shape[{j}]", 0, MAX_ARRAY_BYTES)
                          for j, d in enumerate(_list(a.get("shape"), aw + ".shape")))
            if len(shape) > MAX_NDIM:
                raise FormatError(f"{aw}.shape: {len(shape)} dims exceeds {MAX_NDIM}")
            expect = itemsize
            for d in shape:
                expect *= d
                if expect > MAX_ARRAY_BYTES:
                    raise FormatError(f"{aw}.shape: {list(shape)} exceeds {MAX_ARRAY_BYTES} bytes")
            nbytes = _int(a.get("nbytes"), aw + ".nbytes", 0, MAX_ARRAY_BYTES)
            if nbytes != expect:
                raise FormatError(f"{aw}.nbytes: {nbytes} != prod(shape) * itemsize = {expect}")
            parts = []
            total = 0
            for p_i, p in enumerate(_list(a.get("parts"), aw + ".parts")):
                pw = f"{aw}.parts[{p_i}]"
                p = _list(p, pw)
                if len(p) != 3:
                    raise FormatError(f"{pw}: expected [chunk, offset, length]")
                ci = _int(p[0], pw + "[0]", 0, len(chunks) - 1)
                off = _int(p[1], pw + "[1]")
                ln = _int(p[2], pw + "[2]")
                if off + ln > chunks[ci].raw_length:
                    raise FormatError(f"{pw}: range [{off}, {off + ln}) lies outside chunk {ci} "
                                      f"({chunks[ci].raw_length} raw bytes)")
                total += ln
                parts.append((ci, off, ln))
            if total != nbytes:
                raise FormatError(f"{aw}.parts: lengths sum to {total}, expected {nbytes}")
            arrays.append(ArrayEntry(dtype, shape, nbytes, tuple(parts)))
            claimed.extend((ci, off, off + ln, a_i) for ci, off, ln in parts if ln)
        # Distinct arrays never share bytes (tied tensors share an index instead), so the
        # arrays' total size is bounded by the chunks' raw size: no amplification.
        claimed.sort()
        for a, b in zip(claimed, claimed[1:]):
            if a[0] == b[0] and b[1] < a[2]:
                raise FormatError(f"{where}.arrays[{b[3]}] overlaps {where}.arrays[{a[3]}] in chunk {a[0]}")
        tree = r.get("tree")
        if not isinstance(tree, dict) or tree.get("$") != "dict":
            raise FormatError(f"{where}.tree: top level must be a dict node")
        from .tree import walk_arrays
        for idx in walk_arrays(tree):
            if type(idx) is not int or not 0 <= idx < len(arrays):
                raise FormatError(f"{where}.tree: array index {idx!r} out of range (have {len(arrays)})")
        ranks.append(RankSection(rank, items, tree, tuple(arrays)))
    if len(ranks) != world_size:
        raise FormatError(f"manifest.ranks: {len(ranks)} sections for world_size {world_size}")
    extra = _obj(doc.get("extra", {}), "manifest.extra")
    return Manifest(step, writer, float(created), world_size, metrics, tuple(files),
                    tuple(chunks), tuple(ranks), extra)


# ----------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class CommitStatus:
    committed: bool
    reason: str            # "" when committed
    manifest: Manifest | None = None


def _read_capped(path: Path, cap: int, what: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise FormatError(f"{what}: {size} bytes exceeds the cap of {cap}")
        chunks = []
        total = 0
        while True:
            # Ask for what fstat promised (plus a little, in case the file grew), never for
            # the whole cap: os.read allocates the full request up front.
            b = os.read(fd, min(cap + 1 - total, max(size - total, 0) + 65536))
            if not b:
                break
            chunks.append(b)
            total += len(b)
            if total > cap:
                raise FormatError(f"{what}: exceeds the cap of {cap} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_commit_marker(step_dir: Path) -> dict[str, Any]:
    doc = _obj(load_json(_read_capped(step_dir / COMMIT_NAME, MAX_COMMIT_BYTES, COMMIT_NAME),
                         COMMIT_NAME, MAX_COMMIT_BYTES), COMMIT_NAME)
    if doc.get("format") != FORMAT_NAME or doc.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{COMMIT_NAME}: unknown format {doc.get('format')!r} "
                          f"version {doc.get('format_version')!r}")
    _int(doc.get("step"), f"{COMMIT_NAME}.step")
    digest = _str(doc.get("manifest_sha256"), f"{COMMIT_NAME}.manifest_sha256")
    if not _HEX64.match(digest):
        raise FormatError(f"{COMMIT_NAME}.manifest_sha256: not 64 lowercase hex digits")
    return doc


def read_manifest_bytes(step_dir: Path) -> bytes:
    return _read_capped(step_dir / MANIFEST_NAME, MAX_MANIFEST_BYTES, MANIFEST_NAME)


def read_manifest(step_dir: Path) -> Manifest:
    """Parse and validate a step's manifest (without checking the commit marker)."""
    return parse_manifest(load_json(read_manifest_bytes(step_dir), MANIFEST_NAME, MAX_MANIFEST_BYTES))


def commit_status(step_dir: Path) -> CommitStatus:
    """Whether ``step_dir`` is a committed step (FORMAT.md section 1), and if not, why."""
    step_dir = Path(step_dir)
    step = parse_step_dir(step_dir.name)
    if step is None:
        return CommitStatus(False, f"{step_dir.name!r} is not a checkpoint-<step> name")
    if step_dir.is_symlink() or not step_dir.is_dir():
        return CommitStatus(False, "not a directory")
    try:
        marker = read_commit_marker(step_dir)
    except FileNotFoundError:
        return CommitStatus(False, "no commit marker (save did not finish)")
    except (FormatError, OSError) as e:
        return CommitStatus(False, f"unreadable commit marker: {e}")
    if marker["step"] != step:
        return CommitStatus(False, f"commit marker names step {marker['step']}, directory says {step}")
    try:
        data = read_manifest_bytes(step_dir)
    except FileNotFoundError:
        return CommitStatus(False, "manifest.json missing")
    except (FormatError, OSError) as e:
        return CommitStatus(False, f"unreadable manifest: {e}")
    if hashlib.sha256(data).hexdigest() != marker["manifest_sha256"]:
        return CommitStatus(False, "manifest digest does not match the commit marker")
    try:
        manifest = parse_manifest(load_json(data, MANIFEST_NAME, MAX_MANIFEST_BYTES))
    except FormatError as e:
        return CommitStatus(False, f"invalid manifest: {e}")
    if manifest.step != step:
        return CommitStatus(False, f"manifest names step {manifest.step}, directory says {step}")
    return CommitStatus(True, "", manifest)


def check_data_files(step_dir: Path, manifest: Manifest) -> None:
    """Every data file is a regular file (not a symlink) of exactly its recorded size.

    FORMAT.md section 7; readers call this before allocating anything a manifest declares,
    so a manifest cannot make them allocate for files that are not there."""
    import errno
    import stat

    for f in manifest.files:
        path = Path(step_dir) / f.path
        try:
            st = os.lstat(path)
        except OSError as e:
            raise StorageError(e.errno, f"{e.strerror} (data file)", str(path)) from None
        if stat.S_ISLNK(st.st_mode):
            raise StorageError(errno.ELOOP, "data files must not be symlinks", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{path}: data file is not a regular file")
        if st.st_size != f.size:
            raise FormatError(f"{path}: {st.st_size} bytes on disk, the manifest says {f.size}")


def iter_step_dirs(root: Path) -> Iterator[tuple[int, Path]]:
    """Final-named step directories under root (committed or not), in no particular order."""
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return
    for e in entries:
        step = parse_step_dir(e.name)
        if step is not None and e.is_dir(follow_symlinks=False):
            yield step, Path(e.path)


def committed_steps(root: Path) -> list[int]:
    """Ascending steps whose directories are committed."""
    return sorted(step for step, path in iter_step_dirs(Path(root)) if commit_status(path).committed)


def find_leftovers(root: Path) -> list[Path]:
    """Hidden tmp directories of saves that never committed."""
    try:
        return sorted(Path(e.path) for e in os.scandir(root)
                      if parse_tmp_dir(e.name) is not None and e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- writing

def _storage_error(e: OSError, path: Path, what: str) -> StorageError:
    """The OSError as a StorageError that names the file and the operation (ENOSPC, EIO...)."""
    return StorageError(e.errno, f"{e.strerror} ({what})", str(path))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise _storage_error(e, path, "fsync of the directory") from e


def write_durable(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist), write all of ``data``, fsync, close.

    OS errors are raised as :class:`StorageError` naming ``path``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise
    except OSError as e:
        raise _storage_error(e, path, "create") from e
    try:
        view = memoryview(data)
        what = "write"
        while view:
            n = os.write(fd, view)
            view = view[n:]
        what = "fsync"
        os.fsync(fd)
    except OSError as e:
        raise _storage_error(e, path, what) from e
    finally:
        os.close(fd)


def commit_marker_bytes(step: int, manifest_bytes: bytes) -> bytes:
    return json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": step,
                       "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}).encode()


def write_manifest(tmp_dir: Path, manifest: Manifest) -> bytes:
    data = manifest.to_bytes()
    write_durable(tmp_dir / MANIFEST_NAME, data)
    return data


def commit(tmp_dir: Path, root: Path, step: int, manifest_bytes: bytes, fault=None) -> Path:
    """Write the marker, fsync, rename tmp → final, fsync the root. Returns the final path.

    ``fault`` is an optional callable taking a fault-point name (tests only)."""
    hit = fault or (lambda name: None)
    write_durable(tmp_dir / COMMIT_NAME, commit_marker_bytes(step, manifest_bytes))
    hit("after_marker")
    fsync_dir(tmp_dir)
    final = Path(root) / step_dir_name(step)
    if os.path.lexists(final):
        # Never replace anything: a committed step is sacred, and a final-named folder
        # without our marker is somebody else's (e.g. a Hugging Face checkpoint).
        raise FileExistsError(f"{final} already exists; refusing to overwrite it")
    os.rename(tmp_dir, final)
    hit("after_rename")
    fsync_dir(Path(root))
    return final


class RootBusyError(CheckpointError):
    """Another live process holds the checkpoint root's lock."""


def lock_root(root: Path) -> int:
    """Take the root's advisory lock and return its file descriptor (close it to release).

    ``flock`` is released by the kernel when the holder dies, so a killed run never
    blocks the next one. Raises RootBusyError when a live manager (or fix) holds it.
    """
    fd = os.open(Path(root) / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RootBusyError(f"{root} is in use by another live CheckpointManager or fix "
                            f"(lock {LOCK_NAME})") from None
    return fd
