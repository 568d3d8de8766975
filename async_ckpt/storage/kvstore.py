"""TensorStore kvstores as a storage backend: S3, GCS, and TensorStore's memory and file drivers.

Object stores have no rename and no directories, so steps commit marker-last
(:class:`~async_ckpt.storage.commit.MarkerLastCommit`): data objects, then ``manifest.json``,
then ``COMMIT``, all under ``checkpoint-<step>/``. A location is a key prefix; a name under
it is an object. The bytes are exactly those a local data file holds (same chunk records,
crc32c and zstd frames), so verify judges a step in a bucket as it judges one on disk.

Objects per rank: a rank's chunks are cut, in order, into groups of at most
``object_bytes`` raw bytes (a larger chunk is a group of its own); group ``k`` becomes the
object ``data-r<rank>-<k>.bin`` (one file entry each in the manifest). Each group is encoded
(crc32c, byte-shuffle, zstd) straight from the staging buffer and uploaded as one PUT, on
at most ``io_threads`` worker threads: that bounds both the requests in flight and the
Python memory a save holds beyond the staging buffer (about ``io_threads`` groups).

Reads are ranged: requests for neighbouring chunks of one object are merged into one range
read of at most ``read_bytes``, then each chunk is checked and decoded into its destination.

Retries: every request is retried on transient failures (HTTP 5xx, 429/503 throttling,
connection refused or reset, timeouts; TensorStore reports these as ``UNAVAILABLE``,
``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``, ``ABORTED`` or ``INTERNAL``), with exponential
backoff and jitter, up to :class:`RetryPolicy` ``attempts``. TensorStore's own HTTP retries
are turned off so that this is the one policy. A permanent failure (403, missing bucket,
bad request) or the last failed attempt raises :class:`~async_ckpt.errors.StorageError`
naming the object's URL.

Listing may lag behind writes on some S3-compatible stores; docs/OBJECT_STORES.md says how
each operation copes. Conditional writes are never used (TensorStore trusts them only on AWS
endpoints): ``put`` without ``replace`` checks existence first, which is enough for the one
writer a root has.

Threads: ``write_rank`` runs on the manager's background thread and fans out to its own
workers; ``read`` on the caller's thread, likewise; the rest on any thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import contextvars
import errno
import json
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from .. import faults
from ..errors import ChecksumError, CheckpointError, FormatError, RootBusyError, StorageError
from ..format.manifest import ChunkEntry, FileEntry
from ..format.names import COMMIT_NAME, data_file_name
from . import chunk_codec
from .base import Entry, ObjectInfo, RankWrite, ReadRequest, Storage, WrittenFiles

DEFAULT_OBJECT_BYTES = 32 << 20     # raw bytes per data object (a bigger chunk gets its own)
DEFAULT_READ_BYTES = 32 << 20       # most bytes one merged range read asks for
_READ_GAP = 1 << 20                 # neighbouring chunks closer than this share a range read
_SIZE_PROBE = 1 << 62               # a byte offset no object reaches: its error names the size

# TensorStore status codes worth another attempt (HTTP 5xx and 429 map onto these; a
# connection refused or reset comes back as ABORTED "All 0 retry attempts failed").
_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL")
_ERRNO = {"NOT_FOUND": errno.ENOENT, "PERMISSION_DENIED": errno.EACCES, "UNAUTHENTICATED": errno.EACCES,
          "ALREADY_EXISTS": errno.EEXIST, "INVALID_ARGUMENT": errno.EINVAL, "OUT_OF_RANGE": errno.EINVAL,
          "RESOURCE_EXHAUSTED": errno.EAGAIN, "DEADLINE_EXCEEDED": errno.ETIMEDOUT}
_SIZE_IN_ERROR = (re.compile(r"value of size (\d+)"), re.compile(r"ActualObjectSize>(\d+)<"),
                  re.compile(r"and total size (\d+)"))

_endpoint_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "async_ckpt_s3_endpoint", default=None)


def _env_number(name: str, default: float, cast: Callable[[str], float]) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return cast(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries per request (the first included); before try ``n + 1`` wait
    ``min(cap, initial * 2**(n-1))`` seconds, scaled by a random factor in [0.5, 1]."""

    attempts: int = 6
    initial: float = 0.25
    cap: float = 8.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """``ASYNC_CKPT_KV_ATTEMPTS`` and ``ASYNC_CKPT_KV_BACKOFF_S`` override the defaults."""
        attempts = int(_env_number("ASYNC_CKPT_KV_ATTEMPTS", cls.attempts, int))
        initial = float(_env_number("ASYNC_CKPT_KV_BACKOFF_S", cls.initial, float))
        if attempts < 1 or initial < 0:
            raise ValueError("ASYNC_CKPT_KV_ATTEMPTS must be >= 1 and ASYNC_CKPT_KV_BACKOFF_S >= 0")
        return cls(attempts, initial, max(cls.cap, initial))

    def delay(self, attempt: int) -> float:
        return min(self.cap, self.initial * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)


def _status(e: BaseException) -> str:
    """TensorStore's status code from its error text (``"UNAVAILABLE: ..."``), or ""."""
    head = str(e).split(":", 1)[0].strip()
    return head if head.isupper() and head.replace("_", "").isalpha() else ""


def transient(e: BaseException) -> bool:
    """Whether a failed request is worth another attempt."""
    return _status(e) in _TRANSIENT


@contextlib.contextmanager
def endpoint_override(endpoint: Optional[str]) -> Iterator[None]:
    """Within the block, ``s3://`` URLs opened on this thread use ``endpoint`` (the CLIs'
    ``--endpoint``), ahead of ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``."""
    token = _endpoint_override.set(endpoint or None)
    try:
        yield
    finally:
        _endpoint_override.reset(token)


# ----------------------------------------------------------------------------- specs

def _tensorstore():
    try:
        import tensorstore
    except ImportError as e:
        raise ImportError("object stores (s3://, gs://, ts-memory://, kvstore specs) need the tensorstore "
                          "package: pip install 'async-ckpt[tensorstore]'") from e
    return tensorstore


def _s3_environment(spec: dict) -> None:
    """Fill endpoint, region and credentials the way boto3 and the AWS CLI read them."""
    endpoint = (spec.get("endpoint") or _endpoint_override.get() or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint:
        spec["endpoint"] = endpoint
    region = spec.get("aws_region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region and endpoint:
        region = "us-east-1"    # a custom endpoint (MinIO, moto, Ceph) rarely cares; TensorStore needs one
    if region:
        spec["aws_region"] = region
    if "aws_credentials" not in spec and os.environ.get("AWS_ACCESS_KEY_ID"):
        spec["aws_credentials"] = {"type": "environment"}


def _with_context(spec: dict, io_threads: int) -> dict:
    """Our retry policy replaces TensorStore's; its HTTP concurrency matches our workers."""
    driver = spec["driver"]
    context = dict(spec.get("context") or {})
    if driver in ("s3", "gcs"):
        context.setdefault(f"{driver}_request_retries", {"max_retries": 0})
        context.setdefault(f"{driver}_request_concurrency", {"limit": max(2, io_threads)})
    if context:
        spec["context"] = context
    return spec


def split_spec(target: Mapping[str, Any]) -> tuple[dict, str]:
    """``(base spec, root)`` of a kvstore spec: the spec without its ``path`` (the file
    driver's base is ``/``), and that path as a ``/``-joined root location."""
    if not isinstance(target, Mapping) or not isinstance(target.get("driver"), str):
        raise ValueError(f"a kvstore spec is a dict with a 'driver' key, got {target!r}")
    spec = json.loads(json.dumps(dict(target)))     # a deep copy of plain JSON
    path = spec.pop("path", "") or ""
    if not isinstance(path, str):
        raise ValueError(f"kvstore spec: 'path' must be a string, got {path!r}")
    driver = spec["driver"]
    if driver == "file":
        if not path.startswith("/"):
            raise ValueError(f"kvstore spec: the file driver needs an absolute 'path', got {path!r}")
        spec["path"] = "/"
    elif driver == "s3":
        _s3_environment(spec)
    root = "/".join(p for p in path.split("/") if p)
    if ".." in root.split("/"):
        raise ValueError(f"kvstore spec: 'path' must not contain '..', got {path!r}")
    return spec, root


def spec_for_url(scheme: str, rest: str, url: str) -> tuple[dict, str, str]:
    """``(base spec, root, name of the store)`` for ``s3://``, ``gs://`` and ``ts-memory://``."""
    bucket, _, path = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url!r}: a {scheme}:// URL needs a {'store name' if scheme == 'ts-memory' else 'bucket'}"
                         f" ({scheme}://{'name' if scheme == 'ts-memory' else 'bucket'}/prefix)")
    root = "/".join(p for p in path.split("/") if p)
    if ".." in root.split("/"):
        raise ValueError(f"{url!r}: the prefix must not contain '..'")
    if scheme == "s3":
        spec: dict = {"driver": "s3", "bucket": bucket}
        _s3_environment(spec)
    elif scheme == "gs":
        spec = {"driver": "gcs", "bucket": bucket}
    elif scheme == "ts-memory":
        spec = {"driver": "memory"}
    else:
        raise ValueError(f"{url!r}: not a kvstore URL scheme")
    return spec, root, bucket


_handles: dict[str, Any] = {}
_handles_lock = threading.Lock()
_locked_roots: set[tuple[str, str]] = set()


def _open(spec: dict, identity: str) -> Any:
    """One TensorStore handle per store and process (a memory driver's objects live in its
    handle's context, so a second manager on the same spec must get the same handle)."""
    ts = _tensorstore()
    with _handles_lock:
        handle = _handles.get(identity)
        if handle is None:
            try:
                handle = ts.KvStore.open(spec).result()
            except ValueError as e:
                raise ValueError(f"cannot open the kvstore {json.dumps(spec, sort_keys=True)}: {e}") from None
            _handles[identity] = handle
        return handle


# ----------------------------------------------------------------------------- the backend

class KvStoreStorage(Storage):
    """A root on one TensorStore kvstore. Build it with :func:`open_url` / :func:`open_spec`
    (or :func:`async_ckpt.storage.open_root`), which also return the root location."""

    supports_rename = False

    def __init__(self, spec: Mapping[str, Any], *, label: Optional[str] = None, compression: Optional[str] = "auto",
                 level: int = 1, io_threads: int = 4, object_bytes: Optional[int] = None,
                 read_bytes: Optional[int] = None, retry: Optional[RetryPolicy] = None) -> None:
        base = _with_context(json.loads(json.dumps(dict(spec))), io_threads)
        self.spec = base
        self.driver = base["driver"]
        identity = json.dumps({k: v for k, v in base.items() if k != "context"}, sort_keys=True)
        if label is not None and self.driver == "memory":
            identity = f"ts-memory://{label}"
        self._identity = identity
        self._label = label
        self._kv = _open(base, identity)
        self._compression = compression
        self._level = level
        self.io_threads = max(1, int(io_threads))
        mib = 1 << 20
        self.object_bytes = int(object_bytes or _env_number("ASYNC_CKPT_KV_OBJECT_MB", DEFAULT_OBJECT_BYTES / mib,
                                                            float) * mib)
        self.read_bytes = int(read_bytes or _env_number("ASYNC_CKPT_KV_READ_MB", DEFAULT_READ_BYTES / mib, float) * mib)
        if self.object_bytes < 1 or self.read_bytes < 1:
            raise ValueError("object_bytes and read_bytes must be positive")
        self.retry = retry or RetryPolicy.from_env()
        self._stats_lock = threading.Lock()
        self.requests = 0          # requests sent (retries included)
        self.retries = 0           # attempts that failed transiently and were tried again

    # ------------------------------------------------------------------ requests

    def _request(self, what: str, key: str, run: Callable[[], Any]) -> Any:
        """``run()`` with the retry policy; a final failure becomes a StorageError naming ``key``."""
        attempt = 0
        while True:
            attempt += 1
            with self._stats_lock:
                self.requests += 1
            try:
                return run()
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - TensorStore raises ValueError and friends
                if _status(e) == "OUT_OF_RANGE" or not transient(e) or attempt >= self.retry.attempts:
                    if _status(e) == "OUT_OF_RANGE":
                        raise
                    tries = f", {attempt} attempts" if attempt > 1 else ""
                    raise StorageError(_ERRNO.get(_status(e), errno.EIO), f"{what} failed{tries}: {e}",
                                       self.describe(key)) from e
                with self._stats_lock:
                    self.retries += 1
                time.sleep(self.retry.delay(attempt))

    def _put(self, key: str, data: bytes) -> None:
        self._request("write", key, lambda: self._kv.write(key, data).result())

    def _delete(self, key: str) -> None:
        self._request("delete", key, lambda: self._kv.write(key, None).result())

    def _read(self, key: str, start: Optional[int] = None, stop: Optional[int] = None) -> Optional[bytes]:
        """The object's bytes (or ``[start, stop)`` of them); None when it does not exist.
        A range past the end raises the store's OUT_OF_RANGE error (a ValueError)."""
        byte_range = None if start is None else slice(start, stop)

        def run() -> Optional[bytes]:
            result = self._kv.read(key, byte_range=byte_range).result()
            return result.value if result.state == "value" else None
        return self._request("read", key, run)

    def _size(self, key: str) -> Optional[int]:
        """The object's size, or None when it does not exist: one request reading far past
        any end, whose error names the size (S3, memory, file); else a bisection on 1-byte reads."""
        try:
            self._read(key, _SIZE_PROBE, _SIZE_PROBE + 1)
        except ValueError as e:
            if _status(e) != "OUT_OF_RANGE":
                raise
            for pattern in _SIZE_IN_ERROR:
                m = pattern.search(str(e))
                if m:
                    return int(m.group(1))
            return self._bisect_size(key)
        return None     # missing (a value at 2**62 cannot be)

    def _has_byte(self, key: str, n: int) -> Optional[bool]:
        """Whether byte ``n`` exists; None when the object does not."""
        try:
            return True if self._read(key, n, n + 1) is not None else None
        except ValueError as e:
            if _status(e) != "OUT_OF_RANGE":
                raise
            return False

    def _bisect_size(self, key: str) -> Optional[int]:
        lo, hi = 0, 1                       # size >= lo; probe whether byte hi-1 exists
        while True:
            has = self._has_byte(key, hi - 1)
            if has is None:
                return None
            if not has:
                break
            lo, hi = hi, hi * 2
        while hi - lo > 1:                   # size in [lo, hi): byte lo-1 exists, byte hi-1 not
            mid = (lo + hi) // 2
            has = self._has_byte(key, mid - 1)
            if has is None:
                return None
            lo, hi = (mid, hi) if has else (lo, mid)
        return lo

    def _keys_under(self, location: str) -> list[str]:
        """Every key under ``location/`` (the whole store for the empty location)."""
        ts = _tensorstore()
        prefix = self._prefix(location)
        key_range = ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord("/") + 1)) if prefix else ts.KvStore.KeyRange()
        keys = self._request("list", prefix or "/", lambda: self._kv.list(key_range).result())
        return sorted(k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else k for k in keys)

    def _prefix(self, location: str) -> str:
        location = self.join(location)
        return location + "/" if location else ""

    # ------------------------------------------------------------------ data

    def _groups(self, request: RankWrite) -> list[tuple[int, int]]:
        """Consecutive chunk ranges ``[first, end)`` of at most ``object_bytes`` raw bytes each."""
        groups: list[tuple[int, int]] = []
        first, size = 0, 0
        for k, c in enumerate(request.chunks):
            if k > first and size + c.length > self.object_bytes:
                groups.append((first, k))
                first, size = k, 0
            size += c.length
        if first < len(request.chunks) or not groups:
            groups.append((first, len(request.chunks)))
        return groups

    def _encode(self, raw: memoryview, shuffle: int, known: Optional[int], check: bool
                ) -> tuple[Any, str, int, int, int]:
        from .. import native

        if known is not None and check and native.crc32c(raw) != known:
            raise ChecksumError(f"a precomputed crc32c (0x{known:08x}) does not match the staged bytes")
        if self._compression is None:       # no copy: the staged bytes go into the object as they are
            crc = native.crc32c(raw) if known is None else known
            return raw, "raw", 0, crc, crc
        return chunk_codec.encode(raw, self._compression, self._level, shuffle, known)

    def write_rank(self, location: str, request: RankWrite) -> WrittenFiles:
        """One object per chunk group, encoded and uploaded by ``io_threads`` workers."""
        request.wait()          # no gate: encode once the copy is complete
        groups = self._groups(request)
        entries: list[Optional[ChunkEntry]] = [None] * len(request.chunks)
        files: list[Optional[FileEntry]] = [None] * len(groups)
        stop = threading.Event()
        uploaded = [0]
        count_lock = threading.Lock()

        def upload(g: int) -> None:
            if stop.is_set():
                return
            first, end = groups[g]
            name = data_file_name(request.rank, g)
            parts: list[Any] = []
            offset = 0
            for k in range(first, end):
                c = request.chunks[k]
                known = int(request.crcs.values[k]) if request.crcs.known[k] else None
                stored, codec, shuffle, crc, raw_crc = self._encode(
                    request.buffer[c.start:c.start + c.length], c.shuffle, known, request.check_known_crcs)
                entries[k] = ChunkEntry(g, offset, len(stored), c.length, codec, shuffle, crc, raw_crc)
                parts.append(stored)
                offset += len(stored)
                if stop.is_set():
                    return
            blob = b"".join(parts)
            del parts
            self._put(self.join(location, name), blob)
            files[g] = FileEntry(name, offset, request.rank)
            with count_lock:
                uploaded[0] += 1
                first_one = uploaded[0] == 1
            if first_one:
                faults.hit("mid_write")

        def guarded(g: int) -> None:
            try:
                upload(g)
            except BaseException:
                stop.set()          # before this worker takes the next group
                raise

        with cf.ThreadPoolExecutor(min(self.io_threads, len(groups)), thread_name_prefix="async_ckpt-kv") as pool:
            futures = [pool.submit(guarded, g) for g in range(len(groups))]
            done, _ = cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                stop.set()
                for f in futures:
                    f.cancel()
        # every worker has finished here: nothing lands after the caller aborts the location
        for f in futures:
            if not f.cancelled() and f.exception() is not None:
                raise f.exception()     # type: ignore[misc]
        assert all(e is not None for e in entries) and all(f is not None for f in files)
        return WrittenFiles(tuple(files), tuple(entries))     # type: ignore[arg-type]

    def _spans(self, files: Sequence[FileEntry], requests: Sequence[ReadRequest]
               ) -> tuple[list[tuple[int, int, int, list[int]]], dict[int, Exception]]:
        """Range reads ``(file, start, stop, request indices)`` covering the requests."""
        bad: dict[int, Exception] = {}
        by_file: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            if not 0 <= r.chunk.file < len(files):
                bad[i] = FormatError(f"chunk {r.index}: file index {r.chunk.file} out of range")
            else:
                by_file.setdefault(r.chunk.file, []).append(i)
        spans: list[tuple[int, int, int, list[int]]] = []
        for f, idx in by_file.items():
            idx.sort(key=lambda i: requests[i].chunk.offset)
            cur: list[int] = []
            start = stop = 0
            for i in idx:
                c = requests[i].chunk
                end = c.offset + c.length
                near = c.offset - stop <= _READ_GAP and max(stop, end) - start <= self.read_bytes
                if cur and c.offset >= start and near:
                    cur.append(i)
                    stop = max(stop, end)
                    continue
                if cur:
                    spans.append((f, start, stop, cur))
                cur, start, stop = [i], c.offset, end
            if cur:
                spans.append((f, start, stop, cur))
        return spans, bad

    def read(self, location: str, files: Sequence[FileEntry], requests: Sequence[ReadRequest],
             collect_errors: bool = False) -> list[Optional[str]]:
        delivered: list[ReadRequest] = []
        spans, bad = self._spans(files, requests)
        failures: dict[int, BaseException] = dict(bad)
        lock = threading.Lock()

        def check(i: int, stored: memoryview, where: str) -> None:
            r = requests[i]
            try:
                chunk_codec.check_and_deliver(stored, r, where, delivered)
            except Exception as e:  # noqa: BLE001 - per chunk, re-raised or collected below
                with lock:
                    failures[i] = e

        def run(span: tuple[int, int, int, list[int]]) -> None:
            f, start, stop, idx = span
            key = self.join(location, files[f].path)
            where = self.describe(key)
            try:
                data = self._read(key, start, stop) if stop > start else b""
            except ValueError as e:
                if _status(e) != "OUT_OF_RANGE":
                    raise
                if len(idx) > 1:            # the object is shorter: find which chunks it still holds
                    for i in idx:
                        run((f, requests[i].chunk.offset, requests[i].chunk.offset + requests[i].chunk.length, [i]))
                    return
                c = requests[idx[0]].chunk
                size = self._size(key)
                with lock:
                    failures[idx[0]] = FormatError(
                        f"chunk {requests[idx[0]].index} ('{where}', offset {c.offset}, length {c.length}): "
                        f"the object holds {size} bytes, the chunk runs past its end (truncated)")
                return
            if data is None:
                with lock:
                    for i in idx:
                        failures[i] = StorageError(errno.ENOENT, "No such object (data file)", where)
                return
            view = memoryview(data)
            for i in idx:
                c = requests[i].chunk
                check(i, view[c.offset - start:c.offset - start + c.length], where)

        def guarded(span: tuple[int, int, int, list[int]]) -> None:
            try:
                run(span)
            except Exception as e:  # noqa: BLE001 - a request failed for the whole span
                with lock:
                    for i in span[3]:
                        failures.setdefault(i, e)

        if spans:
            with cf.ThreadPoolExecutor(min(self.io_threads, len(spans)), thread_name_prefix="async_ckpt-kv") as pool:
                list(pool.map(guarded, spans))
        if not collect_errors:
            if failures:
                chunk_codec.roll_back(delivered)
                raise failures[min(failures)]
            return [None] * len(requests)
        return [chunk_codec.describe(failures[i]) if i in failures else None for i in range(len(requests))]

    # ------------------------------------------------------------------ objects and locations

    def join(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in parts if p.strip("/"))

    def list(self, location: str) -> list[Entry]:
        prefix = self._prefix(location)
        found: dict[str, bool] = {}
        for key in self._keys_under(location):
            head, sep, _ = key[len(prefix):].partition("/")
            if head:
                found[head] = found.get(head, False) or bool(sep)
        return [Entry(n, d) for n, d in sorted(found.items())]

    def stat(self, location: str, name: str) -> Optional[ObjectInfo]:
        key = self.join(location, name)
        size = self._size(key)
        if size is not None:
            return ObjectInfo(size)
        return ObjectInfo(0, "location") if self._keys_under(key) else None

    def get(self, location: str, name: str, cap: int) -> bytes:
        key = self.join(location, name)
        size = self._size(key)
        if size is None:
            raise FileNotFoundError(f"{self.describe(key)}: no such object")
        if size > cap:
            raise FormatError(f"{name}: {size} bytes exceeds the cap of {cap}")
        data = self._read(key)
        if data is None:
            raise FileNotFoundError(f"{self.describe(key)}: no such object")
        if len(data) > cap:         # replaced between the two requests
            raise FormatError(f"{name}: {len(data)} bytes exceeds the cap of {cap}")
        return data

    def put(self, location: str, name: str, data: bytes, *, replace: bool = False) -> None:
        """Without ``replace``: FileExistsError when the object exists (checked, then written:
        no conditional write, so this guards against mistakes, not against a second writer)."""
        key = self.join(location, name)
        if not replace and self._size(key) is not None:
            raise FileExistsError(self.describe(key))
        self._put(key, bytes(data))

    def create_location(self, location: str) -> None:
        """Nothing to create on an object store; FileExistsError when keys exist under it."""
        if self._keys_under(location):
            raise FileExistsError(self.describe(location))

    def move(self, src: str, dst: str) -> None:
        """Copy every object, then delete the source (its ``COMMIT`` first): not atomic, used
        only to set a step aside (quarantine), never to publish one."""
        if self._keys_under(dst):
            raise FileExistsError(self.describe(dst))
        keys = self._keys_under(src)
        if not keys:
            raise FileNotFoundError(self.describe(src))
        prefix = self._prefix(src)
        marker = self.join(src, COMMIT_NAME)
        for key in sorted(keys, key=lambda k: k == marker):      # the marker arrives last
            data = self._read(key)
            if data is not None:
                self._put(self.join(dst, key[len(prefix):]), data)
        self.remove(src)

    def remove(self, location: str, name: Optional[str] = None) -> None:
        """One object, or every object under ``location``: its ``COMMIT`` first, then what a
        listing shows, then whatever a second listing shows (late entries of a lagging list)."""
        if name is not None:
            self._delete(self.join(location, name))
            return
        if not self.join(location):
            raise ValueError("refusing to remove the whole store")
        self._delete(self.join(location, COMMIT_NAME))
        for _ in range(2):
            keys = self._keys_under(location)
            if not keys:
                break
            if len(keys) == 1:
                self._delete(keys[0])
                continue
            with cf.ThreadPoolExecutor(min(self.io_threads, len(keys)), thread_name_prefix="async_ckpt-kv") as pool:
                list(pool.map(self._delete, keys))
        if self.driver == "file":       # the file driver leaves empty folders behind
            path = "/" + self.join(location)
            for folder in sorted((d for d, _, _ in os.walk(path)), key=len, reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)

    def lock(self, root: str) -> Optional[Callable[[], None]]:
        """Excludes a second manager on the same root in this process. Across processes an
        object store offers no lock we rely on: one writing job per root (docs/OBJECT_STORES.md)."""
        held = (self._identity, self.join(root))
        with _handles_lock:
            if held in _locked_roots:
                raise RootBusyError(f"{self.describe(root)} is in use by another live CheckpointManager")
            _locked_roots.add(held)

        def release() -> None:
            with _handles_lock:
                _locked_roots.discard(held)
        return release

    def describe(self, location: str, name: Optional[str] = None) -> str:
        key = self.join(location, name) if name else self.join(location)
        if self.driver == "s3":
            return f"s3://{self.spec['bucket']}/{key}"
        if self.driver == "gcs":
            return f"gs://{self.spec['bucket']}/{key}"
        if self.driver == "file":
            return f"file:///{key}"
        if self.driver == "memory" and self._label is not None:
            return f"ts-memory://{self._label}/{key}"
        return f"{self.driver}:{key}"


def open_url(scheme: str, rest: str, url: str, **options: Any) -> tuple[KvStoreStorage, str]:
    """``(backend, root)`` for ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``ts-memory://name/prefix``."""
    spec, root, name = spec_for_url(scheme, rest, url)
    return KvStoreStorage(spec, label=name if scheme == "ts-memory" else None, **options), root


def open_spec(target: Mapping[str, Any], **options: Any) -> tuple[KvStoreStorage, str]:
    """``(backend, root)`` for a TensorStore kvstore spec (``{"driver": "s3", "bucket": ..., "path": ...}``)."""
    spec, root = split_spec(target)
    return KvStoreStorage(spec, **options), root
