"""The manifest and commit-marker documents (docs/FORMAT.md sections 2, 3 and 6): schema,
serialisation, validation of untrusted input, and the merge of per-rank results.

No IO here: the commit module reads and writes these documents through a storage backend.
Everything parsed is untrusted: :func:`parse_manifest` validates a manifest in one pass and
raises :class:`~async_ckpt.errors.FormatError` naming the first violation. Rank sections are
reached through :meth:`Manifest.section` and :meth:`Manifest.rank_files`: nothing outside
this module indexes ``ranks`` by position.

Threads: any thread; every function is pure.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import FormatError
from .dtypes import parse_array_dtype
from .names import COMMIT_NAME, MANIFEST_NAME, is_safe_file_name
from .tree import walk_arrays

FORMAT_NAME = "async_ckpt"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 256 << 20
MAX_COMMIT_BYTES = 4096
MAX_CHUNK_RAW = 1 << 31
# The densest zstd block is RLE: 4 bytes for 128 KiB, so a frame never expands further.
MAX_ZSTD_RATIO = 32768
MAX_ARRAY_BYTES = 1 << 48
MAX_NDIM = 64
# A chunk's codec by name; the position is the native extension's codec id.
CODECS = ("raw", "zstd")
SHUFFLES = (0, 2, 4, 8)
ITEM_KINDS = ("model", "optimizer", "scheduler", "progress", "data", "rng", "config",
              "tokenizer", "scaler", "other")
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ----------------------------------------------------------------------------- schema

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

    def section(self, rank: int) -> RankSection:
        """The tree, items and arrays that ``rank`` saved."""
        if not 0 <= rank < len(self.ranks):
            raise FormatError(f"manifest of step {self.step} has no rank {rank} "
                              f"(world_size {self.world_size})")
        return self.ranks[rank]

    def items(self) -> dict[str, ItemEntry]:
        """Every rank's items, first rank first (ranks share item names)."""
        out: dict[str, ItemEntry] = {}
        for r in self.ranks:
            for name, entry in r.items.items():
                out.setdefault(name, entry)
        return out


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
        for idx in walk_arrays(tree):
            if type(idx) is not int or not 0 <= idx < len(arrays):
                raise FormatError(f"{where}.tree: array index {idx!r} out of range (have {len(arrays)})")
        ranks.append(RankSection(rank, items, tree, tuple(arrays)))
    if len(ranks) != world_size:
        raise FormatError(f"manifest.ranks: {len(ranks)} sections for world_size {world_size}")
    extra = _obj(doc.get("extra", {}), "manifest.extra")
    return Manifest(step, writer, float(created), world_size, metrics, tuple(files),
                    tuple(chunks), tuple(ranks), extra)


def manifest_digest(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()


def parse_manifest_bytes(data: bytes) -> Manifest:
    """Parse and validate a manifest file's bytes."""
    return parse_manifest(load_json(data, MANIFEST_NAME, MAX_MANIFEST_BYTES))


# ----------------------------------------------------------------------------- commit marker

def commit_marker_bytes(step: int, manifest_bytes: bytes) -> bytes:
    """The COMMIT document binding ``step`` to the manifest's SHA-256."""
    return json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": step,
                       "manifest_sha256": manifest_digest(manifest_bytes)}).encode()


def parse_commit_marker(data: bytes) -> dict[str, Any]:
    """Validate an untrusted COMMIT document; FormatError names the problem."""
    doc = _obj(load_json(data, COMMIT_NAME, MAX_COMMIT_BYTES), COMMIT_NAME)
    if doc.get("format") != FORMAT_NAME or doc.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{COMMIT_NAME}: unknown format {doc.get('format')!r} "
                          f"version {doc.get('format_version')!r}")
    _int(doc.get("step"), f"{COMMIT_NAME}.step")
    digest = _str(doc.get("manifest_sha256"), f"{COMMIT_NAME}.manifest_sha256")
    if not _HEX64.fullmatch(digest):
        raise FormatError(f"{COMMIT_NAME}.manifest_sha256: not 64 lowercase hex digits")
    return doc


# ----------------------------------------------------------------------------- rank results

@dataclass(frozen=True)
class RankResult:
    """What one rank wrote for one step, in rank-local numbering.

    ``chunks[i].file`` indexes ``files``; ``arrays[j].parts`` index ``chunks``. The
    coordinator merges every rank's result into one manifest with :func:`merge_ranks`.
    """

    rank: int
    files: tuple[FileEntry, ...]
    chunks: tuple[ChunkEntry, ...]
    items: dict[str, ItemEntry]
    tree: Any
    arrays: tuple[ArrayEntry, ...]
    reused_bytes: int = 0          # bytes the backend did not write again (e.g. hard-linked)

    @property
    def raw_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    @property
    def stored_bytes(self) -> int:
        return sum(c.length for c in self.chunks)


def merge_ranks(step: int, results: Sequence[RankResult], *, writer: str, created_unix: float,
                metrics: dict[str, float], extra: dict[str, Any] | None = None) -> Manifest:
    """One manifest from every rank's result: global file indices, chunk indices shifted
    into each array's parts. ``results`` must hold ranks 0..N-1, each once."""
    ordered = sorted(results, key=lambda r: r.rank)
    if [r.rank for r in ordered] != list(range(len(ordered))) or not ordered:
        raise ValueError(f"rank results must cover ranks 0..N-1 once, got {[r.rank for r in results]}")
    files: list[FileEntry] = []
    chunks: list[ChunkEntry] = []
    sections: list[RankSection] = []
    for r in ordered:
        file_base, chunk_base = len(files), len(chunks)
        files.extend(FileEntry(f.path, f.size, r.rank) for f in r.files)
        chunks.extend(ChunkEntry(c.file + file_base, c.offset, c.length, c.raw_length, c.codec, c.shuffle,
                                 c.crc32c, c.raw_crc32c) if file_base else c for c in r.chunks)
        arrays = r.arrays if not chunk_base else tuple(
            ArrayEntry(a.dtype, a.shape, a.nbytes, tuple((c + chunk_base, o, n) for c, o, n in a.parts))
            for a in r.arrays)
        sections.append(RankSection(r.rank, dict(r.items), r.tree, arrays))
    return Manifest(step=step, writer=writer, created_unix=created_unix, world_size=len(ordered),
                    metrics=dict(metrics), files=tuple(files), chunks=tuple(chunks),
                    ranks=tuple(sections), extra=dict(extra or {}))


def rank_files(manifest: Manifest, rank: int) -> list[int]:
    """Indices into ``manifest.files`` of the files ``rank`` wrote."""
    return [i for i, f in enumerate(manifest.files) if f.rank == rank]
