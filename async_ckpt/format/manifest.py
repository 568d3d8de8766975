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

import dataclasses
import hashlib
import json
import math
import re
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..errors import FormatError
from .dtypes import parse_array_dtype
from .names import COMMIT_NAME, MANIFEST_NAME, MAX_STEP, is_safe_file_name
from .tree import walk_array_refs

FORMAT_NAME = "async_ckpt"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 256 << 20
MAX_COMMIT_BYTES = 4096
# JSON arrays + objects a manifest may hold (a 20k-tensor model with AdamW state: ~360k).
MAX_JSON_CONTAINERS = 1 << 24
MAX_FILES = 1 << 20
MAX_CHUNKS = 1 << 22
MAX_PARTS = 1 << 23
MAX_WORLD_SIZE = 1 << 20
MAX_INT = (1 << 63) - 1                 # every integer field fits a signed 64-bit integer
MAX_FILE_BYTES = MAX_INT
MAX_CREATED_UNIX = 253402300799         # 9999-12-31T23:59:59Z, the last second datetime can show
_FLOAT_MAX = sys.float_info.max
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
_SEAL_TAIL = re.compile(rb',"self_sha256":"([0-9a-f]{64})"\}\Z')
_SEAL_LEN = 82      # len(',"self_sha256":"' + 64 hex + '"}')


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
    # Section 6: a piece [global_offset, global_offset + shape) of a logical array of
    # global_shape (a DTensor shard); and, for a replica written once, the (rank, array
    # index) whose bytes these are (parts is then empty).
    global_shape: Optional[tuple[int, ...]] = None
    global_offset: Optional[tuple[int, ...]] = None
    stored_by: Optional[tuple[int, int]] = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"dtype": self.dtype, "shape": self.shape, "nbytes": self.nbytes, "parts": self.parts}
        if self.global_shape is not None:
            doc["global_shape"], doc["global_offset"] = self.global_shape, self.global_offset
        if self.stored_by is not None:
            doc["stored_by"] = self.stored_by
        return doc


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
        return self._doc(with_arrays=True)

    def _doc(self, with_arrays: bool) -> dict[str, Any]:
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
                       **({"arrays": _array_docs(r.arrays)} if with_arrays else {})}
                      for r in self.ranks],
            "extra": self.extra,
        }

    def to_bytes(self) -> bytes:
        """The manifest file: compact JSON, sealed with its own digest (``self_sha256``)."""
        return self.to_sealed()[0]

    def to_sealed(self) -> tuple[bytes, str]:
        """:meth:`to_bytes`, and the SHA-256 of those bytes (what the commit marker binds).

        The same text as ``json.dumps(self.to_json())``, written in pieces so that each
        rank's tree and arrays list come from :data:`_JSON_TEXTS`: a run saving the same
        structure every time hands the same objects to every save (pipeline/saving), and
        they are serialised once."""
        doc = self._doc(with_arrays=False)
        ranks, extra = doc.pop("ranks"), doc.pop("extra")
        pieces = [(_dumps(doc)[:-1] + ',"ranks":[').encode()]
        for k, (section, rank_doc) in enumerate(zip(self.ranks, ranks)):
            pieces += [f'{"," if k else ""}{{"rank":{section.rank},"items":{_dumps(rank_doc["items"])},"tree":'.encode(),
                       _JSON_TEXTS.text(section.tree, _dumps_bytes), b',"arrays":',
                       _JSON_TEXTS.text(section.arrays, _arrays_json), b"}"]
        pieces.append(('],"extra":' + _dumps(extra) + "}").encode())
        return _seal_pieces(pieces)

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


def _dumps(doc: Any) -> str:
    return json.dumps(doc, allow_nan=False, separators=(",", ":"))


def _array_docs(arrays: Sequence[ArrayEntry]) -> list[Any]:
    # json writes tuples as arrays: no per-array list copies (20k arrays: 3x faster)
    return [{"dtype": a.dtype, "shape": a.shape, "nbytes": a.nbytes, "parts": a.parts}
            if a.global_shape is None and a.stored_by is None else a.to_json()
            for a in arrays]


def _dumps_bytes(doc: Any) -> bytes:
    return _dumps(doc).encode()


def _arrays_json(arrays: tuple[ArrayEntry, ...]) -> bytes:
    return _dumps_bytes(_array_docs(arrays))


class _TextMemo:
    """The JSON text of the last few objects serialised, by identity; holding each object
    keeps its id from being reused. Only for objects nobody mutates: a save's manifest tree
    and arrays tuple, which saves of an unchanged structure share (saving.array_entries,
    saving.manifest_tree). A few slots, so that managers saving different states in turn
    (or one state under several layouts) keep theirs. Any thread."""

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self._recent: list[tuple[Any, bytes]] = []
        self._lock = threading.Lock()

    def text(self, obj: Any, render: Any) -> bytes:
        with self._lock:
            for held, text in self._recent:
                if held is obj:
                    return text
        text = render(obj)
        with self._lock:
            self._recent = [(obj, text)] + [e for e in self._recent if e[0] is not obj][:self._slots - 1]
        return text

    def holds(self, obj: Any) -> bool:
        with self._lock:
            return any(held is obj for held, _ in self._recent)


_JSON_TEXTS = _TextMemo(8)


# ----------------------------------------------------------------------------- validation

def _int(value: Any, where: str, lo: int = 0, hi: int = MAX_INT) -> int:
    # bool is an int subclass; a manifest saying `true` for a size is lying.
    if type(value) is not int:
        raise FormatError(f"{where}: expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        shown = value if -10**30 < value < 10**30 else f"a {len(str(abs(value)))}-digit integer"
        raise FormatError(f"{where}: {shown} out of range [{lo}, {hi}]")
    return value


def _finite(value: Any, where: str, lo: float = -_FLOAT_MAX, hi: float = _FLOAT_MAX) -> float:
    """A JSON number (int or float, never a bool) as a finite float within [lo, hi]."""
    t = type(value)
    if t is int:
        # Compare before converting: float() of a 400-digit integer raises OverflowError.
        if not lo <= value <= hi:
            shown = value if -10**30 < value < 10**30 else f"a {len(str(abs(value)))}-digit integer"
            raise FormatError(f"{where}: {shown} out of range [{lo:g}, {hi:g}]")
        return float(value)
    if t is not float:
        raise FormatError(f"{where}: expected a number, got {t.__name__}")
    if not math.isfinite(value):   # 1e999 parses as inf
        raise FormatError(f"{where}: {value!r} is not a finite number")
    if not lo <= value <= hi:
        raise FormatError(f"{where}: {value!r} out of range [{lo:g}, {hi:g}]")
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


def load_json(data: bytes, what: str, cap: int, max_containers: int = MAX_JSON_CONTAINERS) -> Any:
    """Parse untrusted JSON: size-capped, at most ``max_containers`` arrays and objects
    (counted before parsing, so a document of millions of tiny arrays is refused before
    it is expanded in memory), no NaN/Infinity, no duplicate keys (which would let two
    readers see different documents), every failure a FormatError."""
    if len(data) > cap:
        raise FormatError(f"{what}: {len(data)} bytes exceeds the cap of {cap}")
    # An upper bound (brackets inside strings count too): C speed, before any allocation.
    containers = data.count(b"[") + data.count(b"{")
    if containers > max_containers:
        raise FormatError(f"{what}: holds up to {containers} JSON arrays and objects, more than the "
                          f"{max_containers} a reader accepts")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_reject_constant,
                          object_pairs_hook=_unique_keys)
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError and ints over Python's 4300-digit limit.
        raise FormatError(f"{what}: not valid JSON ({e})") from None


def _array_itemsize(dtype: str, where: str) -> tuple[str, int]:
    try:
        kind, _, itemsize = parse_array_dtype(dtype)
    except FormatError as e:
        raise FormatError(f"{where}: {e}") from None
    return kind, itemsize


def _array_slow(a: Any, aw: str, raw_lengths: list[int], dtype_cache: dict[str, tuple[str, int]]
                ) -> tuple[dict, str, tuple[str, int], int]:
    """Validate one array record field by field; raise FormatError naming the first problem
    (the fast path in parse_manifest found one), else return it with its dtype's facts."""
    a = _obj(a, aw)
    dtype = _str(a.get("dtype"), aw + ".dtype")
    known = dtype_cache.get(dtype) or _array_itemsize(dtype, aw + ".dtype")
    dtype_cache[dtype] = known
    shape_doc = _list(a.get("shape"), aw + ".shape")
    if len(shape_doc) > MAX_NDIM:
        raise FormatError(f"{aw}.shape: {len(shape_doc)} dims exceeds {MAX_NDIM}")
    expect = known[1]
    for j, d in enumerate(shape_doc):
        expect *= _int(d, f"{aw}.shape[{j}]", 0, MAX_ARRAY_BYTES)
        if expect > MAX_ARRAY_BYTES:
            raise FormatError(f"{aw}.shape: {shape_doc} exceeds {MAX_ARRAY_BYTES} bytes")
    nbytes = _int(a.get("nbytes"), aw + ".nbytes", 0, MAX_ARRAY_BYTES)
    if nbytes != expect:
        raise FormatError(f"{aw}.nbytes: {nbytes} != prod(shape) * itemsize = {expect}")
    n_chunks = len(raw_lengths)
    total = 0
    for p_i, p in enumerate(_list(a.get("parts"), aw + ".parts")):
        pw = f"{aw}.parts[{p_i}]"
        if type(p) is not list or len(p) != 3:
            raise FormatError(f"{pw}: expected [chunk, offset, length]")
        ci = _int(p[0], pw + "[0]", 0, n_chunks - 1)
        off = _int(p[1], pw + "[1]", 0, MAX_CHUNK_RAW)
        ln = _int(p[2], pw + "[2]", 1, MAX_CHUNK_RAW)
        if off + ln > raw_lengths[ci]:
            raise FormatError(f"{pw}: range [{off}, {off + ln}) lies outside chunk {ci} "
                              f"({raw_lengths[ci]} raw bytes)")
        total += ln
    if total != nbytes:
        raise FormatError(f"{aw}.parts: lengths sum to {total}, expected {nbytes}")
    return a, dtype, known, nbytes


def _dims(value: Any, where: str, ndim: int) -> tuple[int, ...]:
    dims = _list(value, where)
    if len(dims) != ndim:
        raise FormatError(f"{where}: {len(dims)} dims, the array has {ndim}")
    return tuple(_int(d, f"{where}[{j}]", 0, MAX_ARRAY_BYTES) for j, d in enumerate(dims))


def _array_distributed(a: dict, aw: str, raw_lengths: list[int], dtype_cache: dict[str, tuple[str, int]],
                       world_size: int) -> tuple[ArrayEntry, str]:
    """An array record with section 6 fields: a shard (global_shape + global_offset) and/or a
    replica stored by another rank (stored_by, no parts)."""
    stored_by = None
    if "stored_by" in a:
        ref = _list(a["stored_by"], aw + ".stored_by")
        if len(ref) != 2:
            raise FormatError(f"{aw}.stored_by: expected [rank, array index]")
        stored_by = (_int(ref[0], aw + ".stored_by[0]", 0, world_size - 1),
                     _int(ref[1], aw + ".stored_by[1]", 0, MAX_PARTS))
        if a.get("parts") != []:
            raise FormatError(f"{aw}.parts: an array stored by another rank has no parts of its own")
        check = dict(a, parts=[])
        nbytes_doc = a.get("nbytes")
        check["nbytes"] = 0 if type(nbytes_doc) is int else nbytes_doc   # parts sum to 0 here
        _, dtype, known, _ = _array_slow(dict(check, shape=[0]), aw, raw_lengths, dtype_cache)
        shape = tuple(_int(d, f"{aw}.shape[{j}]", 0, MAX_ARRAY_BYTES)
                      for j, d in enumerate(_list(a.get("shape"), aw + ".shape")))
        expect = known[1]
        for d in shape:
            expect *= d
            if expect > MAX_ARRAY_BYTES:
                raise FormatError(f"{aw}.shape: {list(shape)} exceeds {MAX_ARRAY_BYTES} bytes")
        nbytes = _int(nbytes_doc, aw + ".nbytes", 0, MAX_ARRAY_BYTES)
        if nbytes != expect:
            raise FormatError(f"{aw}.nbytes: {nbytes} != prod(shape) * itemsize = {expect}")
        parts: tuple = ()
    else:
        a, dtype, known, nbytes = _array_slow(a, aw, raw_lengths, dtype_cache)
        shape = tuple(a["shape"])
        parts = tuple(map(tuple, a["parts"]))
    global_shape = global_offset = None
    if "global_shape" in a or "global_offset" in a:
        global_shape = _dims(a.get("global_shape"), aw + ".global_shape", len(shape))
        global_offset = _dims(a.get("global_offset"), aw + ".global_offset", len(shape))
        for j, (o, n, g) in enumerate(zip(global_offset, shape, global_shape)):
            if o + n > g:
                raise FormatError(f"{aw}: dim {j} of the piece [{o}, {o + n}) lies outside the global shape {g}")
    return ArrayEntry(dtype, shape, nbytes, parts, global_shape, global_offset, stored_by), known[0]


def _check_replicas(ranks: list[RankSection]) -> None:
    """Every stored_by names an array that has bytes of its own, of the same dtype and shape."""
    for section in ranks:
        for a_i, a in enumerate(section.arrays):
            if a.stored_by is None:
                continue
            r, j = a.stored_by
            where = f"manifest.ranks[{section.rank}].arrays[{a_i}].stored_by"
            if j >= len(ranks[r].arrays):
                raise FormatError(f"{where}: rank {r} has no array {j}")
            src = ranks[r].arrays[j]
            if src.stored_by is not None:
                raise FormatError(f"{where}: rank {r} array {j} is itself stored elsewhere (no chains)")
            if (src.dtype, src.shape) != (a.dtype, a.shape):
                raise FormatError(f"{where}: rank {r} array {j} is {src.dtype}{list(src.shape)}, "
                                  f"this one {a.dtype}{list(a.shape)}")


def _check_tree(tree: Any, where: str, items: dict[str, ItemEntry], arrays: list[ArrayEntry],
                kinds: list[str]) -> None:
    """The tree decodes (without torch), names exactly the items, and each reference fits its
    array's dtype: what restore will ask of it."""
    if not isinstance(tree, dict) or tree.get("$") != "dict":
        raise FormatError(f"{where}.tree: top level must be a dict node")
    refs = walk_array_refs(tree)
    keys = tree["keys"]
    if any(type(k) is not str for k in keys):
        raise FormatError(f"{where}.tree: top-level keys must be strings (item names)")
    if set(keys) != items.keys():
        extra = sorted(set(keys) - items.keys())
        missing = sorted(items.keys() - set(keys))
        raise FormatError(f"{where}.tree: top-level keys do not match items (in the tree only: {extra[:5]}, "
                          f"in items only: {missing[:5]})")
    n = len(arrays)
    for idx, ref in refs:
        if idx >= n:
            raise FormatError(f"{where}.tree: array index {idx} out of range (have {n})")
        kind = kinds[idx]
        if ref == "ndarray" and kind != "numpy":
            raise FormatError(f"{where}.tree: an ndarray node references array {idx} of dtype "
                              f"{arrays[idx].dtype}, not a numpy dtype")
        if ref != "ndarray" and kind != "torch":
            raise FormatError(f"{where}.tree: a tensor node references array {idx} of dtype "
                              f"{arrays[idx].dtype}, not a torch dtype")
        if ref == "generator" and arrays[idx].dtype != "torch.uint8":
            raise FormatError(f"{where}.tree: a torch.generator state must be a torch.uint8 tensor, "
                              f"array {idx} is {arrays[idx].dtype}")


def parse_manifest(doc: Any) -> Manifest:
    """Validate an untrusted manifest document; raise FormatError naming the first problem.

    Linear in the document's size: one pass over files, chunks and each array's parts, one
    sort for the overlap checks. The self digest is checked by :func:`parse_manifest_bytes`
    (it covers bytes, not the parsed document); here only its spelling."""
    doc = _obj(doc, "manifest")
    if doc.get("format") != FORMAT_NAME or type(doc.get("format")) is not str:
        raise FormatError(f"manifest: format {doc.get('format')!r} is not {FORMAT_NAME!r}")
    version = _int(doc.get("format_version"), "manifest.format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"manifest: unsupported format_version {version} (this reader knows {FORMAT_VERSION})")
    step = _int(doc.get("step"), "manifest.step", 0, MAX_STEP)
    writer = _str(doc.get("writer", ""), "manifest.writer")
    created = _finite(doc.get("created_unix", 0.0), "manifest.created_unix", 0, MAX_CREATED_UNIX)
    world_size = _int(doc.get("world_size"), "manifest.world_size", 1, MAX_WORLD_SIZE)
    metrics_doc = _obj(doc.get("metrics", {}), "manifest.metrics")
    metrics = {k: _finite(v, f"manifest.metrics.{k}") for k, v in metrics_doc.items()}
    if "self_sha256" in doc and not (type(doc["self_sha256"]) is str and _HEX64.fullmatch(doc["self_sha256"])):
        raise FormatError("manifest.self_sha256: not 64 lowercase hex digits")

    files: list[FileEntry] = []
    seen_paths: set[str] = set()
    files_doc = _list(doc.get("files"), "manifest.files")
    if len(files_doc) > MAX_FILES:
        raise FormatError(f"manifest.files: {len(files_doc)} files, more than {MAX_FILES}")
    for i, f in enumerate(files_doc):
        where = f"manifest.files[{i}]"
        f = _obj(f, where)
        path = _str(f.get("path"), where + ".path")
        if not is_safe_file_name(path):
            raise FormatError(f"{where}.path: {path!r} is not a single safe file name")
        if path in seen_paths:
            raise FormatError(f"{where}.path: duplicate file {path!r}")
        seen_paths.add(path)
        files.append(FileEntry(path, _int(f.get("size"), where + ".size", 0, MAX_FILE_BYTES),
                               _int(f.get("rank"), where + ".rank", 0, world_size - 1)))

    chunks: list[ChunkEntry] = []
    extents: list[tuple[int, int, int, int]] = []
    chunks_doc = _list(doc.get("chunks"), "manifest.chunks")
    if len(chunks_doc) > MAX_CHUNKS:
        raise FormatError(f"manifest.chunks: {len(chunks_doc)} chunks, more than {MAX_CHUNKS}")
    n_files = len(files)
    for i, c in enumerate(chunks_doc):
        where = f"manifest.chunks[{i}]"
        c = _obj(c, where)
        fi = _int(c.get("file"), where + ".file", 0, n_files - 1)
        offset = _int(c.get("offset"), where + ".offset", 0, MAX_FILE_BYTES)
        length = _int(c.get("length"), where + ".length", 0, MAX_FILE_BYTES)
        raw = _int(c.get("raw_length"), where + ".raw_length", 0, MAX_CHUNK_RAW)
        codec = c.get("codec")
        if codec not in CODECS or type(codec) is not str:
            raise FormatError(f"{where}.codec: unknown codec {codec!r}")
        shuffle = _int(c.get("shuffle"), where + ".shuffle", 0, 8)
        if shuffle not in SHUFFLES:
            raise FormatError(f"{where}.shuffle: {shuffle} not one of {SHUFFLES}")
        if codec == "raw" and (length != raw or shuffle != 0):
            raise FormatError(f"{where}: raw chunk must have length == raw_length and shuffle 0")
        if codec == "zstd" and (length == 0 or raw > length * MAX_ZSTD_RATIO):
            raise FormatError(f"{where}: {length} stored bytes cannot be a zstd frame of {raw} bytes "
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
    raw_lengths = [c.raw_length for c in chunks]

    ranks: list[RankSection] = []
    n_parts = 0
    for r_i, r in enumerate(_list(doc.get("ranks"), "manifest.ranks")):
        where = f"manifest.ranks[{r_i}]"
        r = _obj(r, where)
        rank = _int(r.get("rank"), where + ".rank", 0, world_size - 1)
        if rank != r_i:
            raise FormatError(f"{where}.rank: expected {r_i}, got {rank}")
        items: dict[str, ItemEntry] = {}
        for name, it in _obj(r.get("items"), where + ".items").items():
            it = _obj(it, f"{where}.items.{name}")
            kind = it.get("kind")
            if kind not in ITEM_KINDS or type(kind) is not str:
                raise FormatError(f"{where}.items.{name}.kind: unknown kind {kind!r}")
            rec = it.get("reconstructed", False)
            if type(rec) is not bool:
                raise FormatError(f"{where}.items.{name}.reconstructed: expected a boolean")
            items[name] = ItemEntry(kind, _str(it.get("type", ""), f"{where}.items.{name}.type"), rec)
        arrays: list[ArrayEntry] = []
        kinds: list[str] = []
        claimed: list[tuple[int, int, int, int]] = []
        dtype_cache: dict[str, tuple[str, int]] = {}
        n_chunks = len(raw_lengths)
        for a_i, a in enumerate(_list(r.get("arrays"), where + ".arrays")):
            if type(a) is dict and ("stored_by" in a or "global_shape" in a):
                entry, kind = _array_distributed(a, f"{where}.arrays[{a_i}]", raw_lengths, dtype_cache,
                                                 world_size)
                arrays.append(entry)
                kinds.append(kind)
                n_parts += len(entry.parts)
                claimed.extend((ci, off, off + ln, a_i) for ci, off, ln in entry.parts)
                continue
            # Fast path: one combined test per field, no string formatting; a failure is
            # re-checked by _array_slow, which names the field.
            dtype = a.get("dtype") if type(a) is dict else None
            known = dtype_cache.get(dtype) if type(dtype) is str else None
            shape = a.get("shape") if known is not None else None
            nbytes = a.get("nbytes") if known is not None else None
            parts_doc = a.get("parts") if known is not None else None
            ok = type(shape) is list and len(shape) <= MAX_NDIM and type(parts_doc) is list
            if ok:
                expect = known[1]
                for d in shape:
                    if type(d) is not int or not 0 <= d <= MAX_ARRAY_BYTES:
                        ok = False
                        break
                    expect *= d
                ok = ok and expect <= MAX_ARRAY_BYTES and type(nbytes) is int and nbytes == expect
            if ok:
                total = 0
                for p in parts_doc:
                    if (type(p) is not list or len(p) != 3 or type(p[0]) is not int or type(p[1]) is not int
                            or type(p[2]) is not int or not 0 <= p[0] < n_chunks or p[1] < 0 or p[2] < 1
                            or p[1] + p[2] > raw_lengths[p[0]]):
                        ok = False
                        break
                    total += p[2]
                ok = ok and total == nbytes
            if not ok:
                a, dtype, known, nbytes = _array_slow(a, f"{where}.arrays[{a_i}]", raw_lengths, dtype_cache)
            parts = tuple(map(tuple, a["parts"]))
            n_parts += len(parts)
            if n_parts > MAX_PARTS:
                raise FormatError(f"{where}.arrays[{a_i}].parts: the manifest holds more than {MAX_PARTS} parts")
            arrays.append(ArrayEntry(dtype, tuple(a["shape"]), nbytes, parts))   # type: ignore[arg-type]
            kinds.append(known[0])
            for ci, off, ln in parts:
                claimed.append((ci, off, off + ln, a_i))
        # Distinct arrays never share bytes (tied tensors share an index instead), so the
        # arrays' total size is bounded by the chunks' raw size: no amplification.
        claimed.sort()
        for a, b in zip(claimed, claimed[1:]):
            if a[0] == b[0] and b[1] < a[2]:
                raise FormatError(f"{where}.arrays[{b[3]}] overlaps {where}.arrays[{a[3]}] in chunk {a[0]}")
        tree = r.get("tree")
        _check_tree(tree, where, items, arrays, kinds)
        ranks.append(RankSection(rank, items, tree, tuple(arrays)))
    if len(ranks) != world_size:
        raise FormatError(f"manifest.ranks: {len(ranks)} sections for world_size {world_size}")
    _check_replicas(ranks)
    extra = _obj(doc.get("extra", {}), "manifest.extra")
    return Manifest(step, writer, created, world_size, metrics, tuple(files),
                    tuple(chunks), tuple(ranks), extra)


def manifest_digest(manifest_bytes: bytes) -> str:
    return hashlib.sha256(manifest_bytes).hexdigest()


# ----------------------------------------------------------------------------- the self digest

def seal(content: bytes) -> bytes:
    """The manifest file for ``content`` (one JSON object, compact): ``self_sha256``, the
    SHA-256 of ``content``, appended as the object's last member (FORMAT.md section 2.3)."""
    if not (content.startswith(b"{") and content.endswith(b"}")) or content == b"{}":
        raise ValueError("seal() takes a non-empty compact JSON object")
    return _seal_pieces([content])[0]


def _seal_pieces(pieces: list[bytes]) -> tuple[bytes, str]:
    """seal() of the concatenation of ``pieces``, hashed piece by piece and joined once (a
    manifest of 20,000 arrays is a few MB), and the SHA-256 of the sealed file. Both digests
    share one pass over the content: they differ only after its closing brace."""
    content = hashlib.sha256()
    for piece in pieces[:-1]:
        content.update(piece)
    body = pieces[-1][:-1]
    content.update(body)
    whole = content.copy()
    content.update(b"}")
    tail = b',"self_sha256":"' + content.hexdigest().encode() + b'"}'
    whole.update(tail)
    pieces[-1] = body + tail
    return b"".join(pieces), whole.hexdigest()


def seal_state(data: bytes) -> Optional[bool]:
    """Whether a manifest file proves itself intact: True when it ends with a ``self_sha256``
    member matching the rest of the file, False when it carries one that does not match (the
    manifest is damaged), None when it carries none (written before the self digest existed:
    nothing can be proven either way)."""
    m = _SEAL_TAIL.search(data, max(0, len(data) - _SEAL_LEN))
    if m is None:
        # No well-formed tail. A self_sha256 key elsewhere (or a damaged tail) is not a seal
        # that can be checked: a damaged one.
        return False if b'"self_sha256"' in data else None
    return hashlib.sha256(data[:m.start()] + b"}").hexdigest() == m.group(1).decode()


def parse_manifest_bytes(data: bytes) -> Manifest:
    """Parse and validate a manifest file's bytes, including its self digest when it has one."""
    manifest = parse_manifest(load_json(data, MANIFEST_NAME, MAX_MANIFEST_BYTES))
    if b'"self_sha256"' in data and seal_state(data) is not True:
        raise FormatError(f"{MANIFEST_NAME}: its content does not match its own digest (self_sha256): "
                          "the manifest is damaged")
    return manifest


# ----------------------------------------------------------------------------- commit marker

def commit_marker_bytes(step: int, manifest_bytes: bytes, digest: Optional[str] = None) -> bytes:
    """The COMMIT document binding ``step`` to the manifest's SHA-256 (``digest``, when the
    caller has it already)."""
    return json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": step,
                       "manifest_sha256": digest or manifest_digest(manifest_bytes)}).encode()


def parse_commit_marker(data: bytes) -> dict[str, Any]:
    """Validate an untrusted COMMIT document; FormatError names the problem."""
    doc = _obj(load_json(data, COMMIT_NAME, MAX_COMMIT_BYTES, 64), COMMIT_NAME)
    if type(doc.get("format")) is not str or doc.get("format") != FORMAT_NAME:
        raise FormatError(f"{COMMIT_NAME}: unknown format {doc.get('format')!r}")
    version = _int(doc.get("format_version"), f"{COMMIT_NAME}.format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"{COMMIT_NAME}: unsupported format_version {version} "
                          f"(this reader knows {FORMAT_VERSION})")
    _int(doc.get("step"), f"{COMMIT_NAME}.step", 0, MAX_STEP)
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
            dataclasses.replace(a, parts=tuple((c + chunk_base, o, n) for c, o, n in a.parts))
            for a in r.arrays)
        sections.append(RankSection(r.rank, dict(r.items), r.tree, arrays))
    return Manifest(step=step, writer=writer, created_unix=created_unix, world_size=len(ordered),
                    metrics=dict(metrics), files=tuple(files), chunks=tuple(chunks),
                    ranks=tuple(sections), extra=dict(extra or {}))


def rank_files(manifest: Manifest, rank: int) -> list[int]:
    """Indices into ``manifest.files`` of the files ``rank`` wrote."""
    return [i for i, f in enumerate(manifest.files) if f.rank == rank]
