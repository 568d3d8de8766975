"""Type stub of the compiled extension ``async_ckpt._native`` (built from csrc/).

Every function that touches files or large buffers releases the GIL. Errors are
raised as classes from ``async_ckpt.errors``:
  FormatError   bad lengths/offsets/arguments, frames whose size disagrees
  ChecksumError crc mismatch (attributes path, offset, chunk set)
  CodecError    zstd missing or a frame that fails to decode
  StorageError  OS errors; an OSError subclass with errno and filename set
"""

from typing import Protocol, Sequence

class _Buffer(Protocol):  # anything exposing the buffer protocol: bytes, bytearray, memoryview, numpy array
    ...

CODEC_RAW: int   # 0
CODEC_ZSTD: int  # 1
CODEC_AUTO: int  # 2 -- writer only: zstd when a probe of the chunk compresses to < 50 %, else raw
                 #      (4 x 64 KiB samples spread over the chunk; raw when zstd is not loaded)
MAX_RAW_LENGTH: int  # 2**31: the largest chunk (raw bytes) the writer accepts and the reader decodes

def crc32c(data: _Buffer, value: int = 0) -> int:
    """CRC-32C of data, continuing from ``value`` (a previous result)."""

def crc32c_hardware() -> bool:
    """True when the SSE4.2 instruction path is in use."""

def shuffle(src: _Buffer, dst: _Buffer, elem_size: int) -> None:
    """Byte-shuffle src into dst (same length); elem_size in {1,2,4,8}; tail bytes copied as is."""

def unshuffle(src: _Buffer, dst: _Buffer, elem_size: int) -> None: ...

def zstd_load(path: str | None = None) -> str:
    """Load libzstd (``libzstd.so.1`` by default, or an explicit shared object exporting the
    ZSTD_* API, e.g. the ``zstandard`` package's ``_cffi`` module). Returns the path loaded.
    Raises CodecError when nothing can be loaded. Idempotent."""

def zstd_backend() -> str | None:
    """The path of the loaded zstd library, or None."""

def zstd_compress(src: _Buffer, level: int = 1) -> bytes:
    """One standard zstd frame with the content size recorded."""

def zstd_decompress(src: _Buffer, dst: _Buffer) -> int:
    """Decompress one frame into dst; the frame's declared content size must equal len(dst)."""

class WriteJob:
    """One chunk to write. ``src`` must stay unchanged until ``Writer.write`` returns; ``shuffle``
    is 0/1 (none), 2, 4 or 8 and applies only when the chunk ends up compressed."""
    src: _Buffer
    file: int
    codec: int
    level: int
    shuffle: int
    def __init__(self, src: _Buffer, file: int, codec: int = 0, level: int = 1, shuffle: int = 0) -> None: ...

class ChunkRecord:
    file: int
    offset: int
    length: int
    raw_length: int
    codec: int       # CODEC_RAW or CODEC_ZSTD (never AUTO)
    shuffle: int     # 0 when not applied (codec raw never shuffles)
    crc32c: int      # of stored bytes
    raw_crc32c: int  # of the raw bytes

class Gate:
    """Readiness of staged chunks: the snapshot copy calls ``advance(n)`` once chunks [0, n)
    are in the staging buffer; a writer job for chunk i waits until then. ``cancel`` fails
    every waiting job (the copy failed)."""
    def __init__(self) -> None: ...
    def advance(self, n: int) -> None: ...
    def cancel(self) -> None: ...
    @property
    def ready(self) -> int: ...

def huge_page_size() -> int:
    """Bytes in one transparent huge page here; 0 where the kernel has none."""

def collapse_huge_pages(buffer: _Buffer) -> str:
    """Move the whole huge pages inside the writable ``buffer`` onto transparent huge pages
    now (madvise MADV_COLLAPSE), keeping its bytes; GIL released. Returns "done", "retry"
    (not all of it this time: pages pinned by IO in flight, no free huge page) or
    "unsupported" (never here: kernel older than 6.1, THP off, not Linux)."""

def stage(dst: _Buffer, srcs: _Buffer, offsets: _Buffer, lengths: _Buffer,
          chunk_ends: Sequence[int] = (), gate: Gate | None = None, floor: int = 2**64 - 1,
          threads: int = 1) -> None:
    """Copy len(srcs) regions into dst: srcs are raw host addresses (uint64) the caller keeps
    alive, offsets/lengths uint64 destination ranges sorted by offset and inside dst (checked
    first: FormatError). With a gate, after each region opens the chunks whose end
    (chunk_ends) lies at or below min(next region's offset, floor). ``threads`` > 1 shares
    the bytes (at least 8 MiB each) with helper threads: the calling thread copies the front
    and opens the gate behind it, the chunks past the front open when all are done. GIL
    released."""

def copy_all(srcs: _Buffer, dsts: _Buffer, lengths: _Buffer, threads: int = 1) -> None:
    """Copy len(srcs) byte ranges: srcs and dsts are raw host addresses (uint64) the caller
    keeps alive and has checked, lengths uint64. ``threads`` > 1 shares the bytes (at least
    8 MiB each) with helper threads, unless two destinations overlap: then the copies run
    in order on the calling thread. FormatError on a null address with a length, before any
    byte is copied. GIL released."""

class StageQueue:
    """A thread of its own that copies queued batches of regions (as for :func:`stage`, in
    any order, no gate) while the caller goes on. ``submit`` checks every region against dst
    (FormatError, nothing queued) and returns at once; ``wait`` (GIL released) blocks until
    every queued batch is copied. Sources and dst must stay alive until then."""
    def __init__(self) -> None: ...
    def submit(self, dst: _Buffer, srcs: _Buffer, offsets: _Buffer, lengths: _Buffer) -> None: ...
    def wait(self) -> None: ...

class Writer:
    """A pool of ``threads`` workers (the calling thread is one of them). One ``write`` runs at a
    time per Writer; concurrent calls from several Python threads are serialised.
    Raw chunks of >= 1 MiB go through O_DIRECT where the file system allows it: they start at
    4096-aligned offsets, so files may hold padding between chunks (FORMAT.md section 3)."""
    threads: int
    def __init__(self, threads: int = 4, nice: int = 0) -> None:
        """nice > 0: the pool's threads run that much nicer than the thread creating the
        Writer (Linux thread niceness, at most 19; a refused change is ignored). The thread
        calling write() keeps its own."""
    def write(self, paths: Sequence[str], jobs: Sequence[WriteJob], fsync: bool = True,
              gate: Gate | None = None, known_crcs: _Buffer | None = None,
              known_flags: _Buffer | None = None, check_known: bool = False) -> list[ChunkRecord]:
        """Create each path (O_EXCL: it must not exist), encode the jobs on the pool
        (raw crc, optional shuffle, compress, stored crc), append each chunk to its file
        at an offset reserved after encoding, fsync every file when asked, and return one
        record per job, in job order. On the first error the remaining jobs are abandoned,
        files are closed and the error is raised (the caller removes the directory).
        With a gate, job i starts only once the gate has advanced past i.
        ``known_crcs`` (one uint32 per job) and ``known_flags`` (one byte per job) go
        together: where flag i is non-zero, word i is job i's raw crc32c, computed elsewhere
        (the GPU), and the writer skips its own pass; both are read only after the gate
        released job i. ``check_known`` recomputes each such word on the host and raises
        ChecksumError on a mismatch."""

class ReadJob:
    def __init__(self, file: int, offset: int, length: int, raw_length: int, codec: int, shuffle: int,
                 crc32c: int, raw_crc32c: int, dst: _Buffer | None = None, chunk: int = -1,
                 pieces: Sequence[tuple[_Buffer, _Buffer | None]] | None = None) -> None:
        """dst None (and no pieces) means verify only (read, check both crcs, decode, discard).
        dst must be a writable C-contiguous buffer of at least raw_length bytes; only its first
        raw_length bytes are written. ``pieces`` instead scatters the decoded bytes, in order,
        over writable buffers whose lengths sum to raw_length; a piece's backup (as long as
        it, not overlapping it) receives the piece's current bytes before they are
        overwritten, and they are put back if the read fails (Reader.read). Pieces of different
        jobs must not overlap. ``chunk`` is echoed in error messages and as ChecksumError.chunk
        (-1: messages name the job index, ChecksumError.chunk is None). Negative, non-int or
        oversized fields raise FormatError here."""
    file: int
    offset: int
    length: int
    raw_length: int
    codec: int
    shuffle: int
    crc32c: int
    raw_crc32c: int
    dst: _Buffer | None
    pieces: Sequence[tuple[_Buffer, _Buffer | None]] | None
    chunk: int

class Reader:
    threads: int
    def __init__(self, threads: int = 4) -> None: ...
    def read(self, paths: Sequence[str], jobs: Sequence[ReadJob], collect_errors: bool = False) -> list[str | None]:
        """Open every path (O_NOFOLLOW), check each job's range against the real file size,
        pread, check crc32c, decode into dst (bounds checked), check raw_crc32c.
        collect_errors=False raises the first error; True returns one message per job (None = ok),
        each starting with the error kind: "FormatError: ", "ChecksumError: ", "CodecError: ",
        "StorageError: " (a file that cannot be opened fails every job that references it).
        Backed-up pieces: when read raises, every piece any job began to overwrite holds its
        backup's bytes again; with collect_errors, each failed job puts back its own.
        Backups are taken by the worker while the previous job of its file is still reading."""

def fsync_dir(path: str) -> None: ...
def fsync_file(path: str) -> None: ...
def write_file_durable(path: str, data: _Buffer) -> None:
    """Create path (O_EXCL), write all bytes (short writes, EINTR handled), fsync, close."""


# --- chunk checksums from pieces; the optional CUDA module (csrc/cuda/) -------------------
# ``pieces`` is an (n, 4) uint64 array of rows [address, length, offset in chunk, chunk]:
# chunk c is chunk_lens[c] bytes, each row places ``length`` bytes read at ``address`` at
# ``offset``, and bytes no row covers count as zeros. Rows outside their chunk, empty rows
# and segment sizes that are not a positive multiple of 8 raise FormatError.

def crc32c_pieces(pieces: _Buffer, chunk_lens: Sequence[int], segment: int = 16384) -> list[int]:
    """crc32c of each chunk, assembled segment by segment on the host (the reference of the
    GPU kernel; addresses are host addresses the caller keeps alive)."""

def cuda_crc_load(path: str) -> None:
    """dlopen the CUDA module at ``path`` and check its ABI; CheckpointError otherwise.
    Idempotent for one path; a second, different path is refused."""

def cuda_crc_path() -> str | None:
    """The loaded CUDA module, or None."""

def cuda_device_count() -> int:
    """CUDA devices the module's runtime sees; CheckpointError naming the CUDA reason."""

def cuda_crc_workspace_bytes(n_pieces: int, n_chunks: int) -> int:
    """Bytes of pinned workspace ``cuda_crc32c_pieces`` needs (the module must be loaded)."""

def cuda_crc32c_pieces(pieces: _Buffer, chunk_lens: Sequence[int], out: _Buffer, workspace: _Buffer,
                       segment: int, stream: int, device: int) -> None:
    """Queue the chunk checksums on ``stream`` (a cudaStream_t of ``device``) without waiting
    for it; ``out`` (pinned, one 4-byte word per chunk) holds them once the stream reaches
    this point. ``workspace`` is pinned host memory of at least cuda_crc_workspace_bytes
    into which the arguments are packed for an asynchronous copy. Addresses are device
    addresses; they, ``out`` and ``workspace`` must stay valid and unchanged until then."""

def cuda_crc32c_pieces_host(pieces: _Buffer, chunk_lens: Sequence[int], segment: int = 16384) -> list[int]:
    """The CUDA module's host build of the same computation (checks nvcc's arithmetic)."""
