"""The native core's codec and round trips: crc32c, byte-shuffle, zstd, Writer -> Reader."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zstandard

from native_helpers import run_py
from async_ckpt import native as n
from async_ckpt.errors import CodecError, FormatError

# ---------------------------------------------------------------- crc32c

_POLY = 0x82F63B78
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def ref_crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("data,expected", [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),                 # RFC 3720 B.4 vectors
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_answers(data, expected):
    assert n.crc32c(data) == expected


def test_crc32c_hardware_flag_is_bool():
    assert isinstance(n.crc32c_hardware(), bool)


def test_crc32c_matches_reference_on_every_path():
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 3 * 8192 * 2 + 3 * 256 + 77, dtype=np.uint8).tobytes()
    # unaligned starts and lengths cover the 3-way long, 3-way short, 8-byte and byte loops
    for start in (0, 1, 5, 8):
        for length in (0, 1, 7, 8, 255, 768, 769, 24576, 24576 + 13, len(data) - start):
            chunk = data[start:start + length]
            assert n.crc32c(memoryview(data)[start:start + length]) == ref_crc32c(chunk)


def test_crc32c_continuation():
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    whole = n.crc32c(data)
    for cut in (0, 1, 3, 4096, 99_999, 200_000):
        assert n.crc32c(data[cut:], n.crc32c(data[:cut])) == whole
    # large buffers release the GIL; numpy arrays and bytearrays are accepted
    big = rng.integers(0, 256, 5 << 20, dtype=np.uint8)
    assert n.crc32c(big) == n.crc32c(bytearray(big.tobytes()))


def test_crc32c_rejects_bad_value():
    with pytest.raises(FormatError):
        n.crc32c(b"x", -1)
    with pytest.raises(FormatError):
        n.crc32c(b"x", 1 << 32)


# ---------------------------------------------------------------- shuffle


def ref_shuffle(data: bytes, elem: int) -> bytes:
    count = len(data) // elem
    body = np.frombuffer(data[:count * elem], np.uint8).reshape(count, elem).T.tobytes()
    return body + data[count * elem:]


@pytest.mark.parametrize("elem", [1, 2, 4, 8])
@pytest.mark.parametrize("length", [0, 1, 3, 7, 8, 9, 4095, 4096 * 8 + 5, 100_003])
def test_shuffle_round_trip(elem, length):
    data = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    shuffled = bytearray(length)
    n.shuffle(data, shuffled, elem)
    assert bytes(shuffled) == ref_shuffle(data, elem)
    back = bytearray(length)
    n.unshuffle(shuffled, back, elem)
    assert bytes(back) == data


def test_shuffle_rejects_bad_arguments():
    with pytest.raises(FormatError):
        n.shuffle(b"abcd", bytearray(4), 3)
    with pytest.raises(FormatError):
        n.shuffle(b"abcd", bytearray(5), 2)
    with pytest.raises(FormatError):
        n.shuffle(b"abcd", b"read-only", 2)
    buf = bytearray(8)
    with pytest.raises(FormatError):
        n.unshuffle(buf, buf, 2)  # overlapping


# ---------------------------------------------------------------- zstd


def test_zstd_loaded_from_system_or_fallback():
    assert n.zstd_backend() is not None
    assert n.zstd_load() == n.zstd_backend()  # idempotent


def test_zstd_frames_are_standard():
    data = (b"async_ckpt " * 10_000) + os.urandom(1000)
    frame = n.zstd_compress(data, 3)
    assert len(frame) < len(data)
    params = zstandard.get_frame_parameters(frame)
    assert params.content_size == len(data)
    assert zstandard.ZstdDecompressor().decompress(frame) == data
    out = bytearray(len(data))
    assert n.zstd_decompress(frame, out) == len(data)
    assert out == data
    # and frames made by the zstandard package decode here
    theirs = zstandard.ZstdCompressor(level=5).compress(data)
    out2 = bytearray(len(data))
    n.zstd_decompress(theirs, out2)
    assert out2 == data


def test_zstd_decompress_rejects_lies():
    data = b"hello world " * 100
    frame = n.zstd_compress(data)
    with pytest.raises(FormatError, match="declares"):
        n.zstd_decompress(frame, bytearray(len(data) + 1))
    with pytest.raises(FormatError, match="exactly one frame"):
        n.zstd_decompress(frame + frame, bytearray(len(data)))
    with pytest.raises(FormatError):
        n.zstd_decompress(b"not a frame at all", bytearray(10))
    no_size = zstandard.ZstdCompressor(write_content_size=False).compressobj().compress(data)
    no_size += zstandard.ZstdCompressor(write_content_size=False).compressobj().flush()
    with pytest.raises(FormatError):
        n.zstd_decompress(no_size, bytearray(len(data)))
    # a frame that claims a terabyte: rejected from its header, nothing allocated
    with pytest.raises(FormatError, match="1099511627776"):
        n.zstd_decompress(terabyte_frame(), bytearray(4))
    # corrupt block contents: a clean CodecError, not a crash
    bad = bytearray(n.zstd_compress(bytes(range(256)) * 64))
    bad[-6] ^= 0xFF
    with pytest.raises((CodecError, FormatError)):
        n.zstd_decompress(bytes(bad), bytearray(256 * 64))


def terabyte_frame() -> bytes:
    """A syntactically valid frame header declaring 2**40 content bytes, one 4-byte raw block."""
    magic = b"\x28\xb5\x2f\xfd"
    fhd = bytes([0xC0])            # 8-byte content size field, window descriptor present
    window = bytes([0x50])         # 1 MiB window
    fcs = (1 << 40).to_bytes(8, "little")
    block = ((4 << 3) | 1).to_bytes(3, "little") + b"abcd"  # last block, raw, 4 bytes
    return magic + fhd + window + fcs + block


# ---------------------------------------------------------------- writer / reader round trips


def payload(size: int, elem: int, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(0, 256, size, dtype=np.uint8)
    # float-like data: smooth values, compressible after shuffling
    count = size // 4 + 1
    vals = (np.cumsum(rng.standard_normal(count)) * 1e-3).astype(np.float32)
    return np.frombuffer(vals.tobytes()[:size], np.uint8).copy()


def read_back(paths, records, dsts, threads=4, collect=False):
    jobs = [n.ReadJob(r.file, r.offset, r.length, r.raw_length, r.codec, r.shuffle, r.crc32c,
                      r.raw_crc32c, d, i) for i, (r, d) in enumerate(zip(records, dsts))]
    return n.Reader(threads).read(paths, jobs, collect)


def stored_bytes(paths, r) -> bytes:
    with open(paths[r.file], "rb") as f:
        f.seek(r.offset)
        return f.read(r.length)


def check_records(paths, jobs_data, records):
    ranges = {}
    for data, r in zip(jobs_data, records):
        assert r.raw_length == len(data)
        assert r.codec in (n.CODEC_RAW, n.CODEC_ZSTD)
        stored = stored_bytes(paths, r)
        assert len(stored) == r.length
        assert n.crc32c(stored) == r.crc32c
        assert n.crc32c(data) == r.raw_crc32c
        if r.codec == n.CODEC_RAW:
            assert r.shuffle == 0 and r.length == r.raw_length and stored == bytes(data)
        else:
            assert r.length < r.raw_length
            plain = zstandard.ZstdDecompressor().decompress(stored)
            expect = ref_shuffle(bytes(data), r.shuffle) if r.shuffle else bytes(data)
            assert plain == expect
        ranges.setdefault(r.file, []).append((r.offset, r.offset + r.length))
    for f, rs in ranges.items():  # stored ranges never overlap and lie inside the file
        rs.sort()
        for (a0, a1), (b0, b1) in zip(rs, rs[1:]):
            assert a1 <= b0
        assert rs[-1][1] <= os.path.getsize(paths[f])


SIZES = [0, 1, 7, 4095, 4096, 4097, 65_537, (1 << 20) + 3, (3 << 20) + 4096 * 3, 600_001]
CODECS = [n.CODEC_RAW, n.CODEC_ZSTD, n.CODEC_AUTO]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shuffle", [0, 1, 2, 4, 8])
def test_round_trip_sizes_codecs_shuffles(tmp_path, codec, shuffle):
    threads = 1 + (codec * 5 + shuffle) % 8
    datas = [payload(s, shuffle or 1, "float" if i % 2 else "random", seed=s + shuffle)
             for i, s in enumerate(SIZES)]
    paths = [str(tmp_path / "a.bin"), str(tmp_path / "b.bin")]
    jobs = [n.WriteJob(d, i % 2, codec, 1, shuffle) for i, d in enumerate(datas)]
    records = n.Writer(threads).write(paths, jobs)
    check_records(paths, datas, records)
    for r in records:
        if codec == n.CODEC_RAW:
            assert r.codec == n.CODEC_RAW
    dsts = [np.empty_like(d) for d in datas]
    assert read_back(paths, records, dsts, threads) == [None] * len(datas)
    for d, o in zip(datas, dsts):
        assert np.array_equal(d, o)
    # verify-only mode decodes and checks without a destination
    assert read_back(paths, records, [None] * len(datas), threads, collect=True) == [None] * len(datas)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_many_jobs_many_files(tmp_path, threads):
    rng = np.random.default_rng(threads)
    datas = [payload(int(rng.integers(0, 300_000)), 4, "float", seed=i) for i in range(40)]
    paths = [str(tmp_path / f"data-{k}.bin") for k in range(3)]
    jobs = [n.WriteJob(d, i % 3, CODECS[i % 3], 1, [0, 2, 4, 8][i % 4]) for i, d in enumerate(datas)]
    records = n.Writer(threads).write(paths, jobs, fsync=False)
    check_records(paths, datas, records)
    dsts = [np.empty_like(d) for d in datas]
    read_back(paths, records, dsts, threads)
    assert all(np.array_equal(a, b) for a, b in zip(datas, dsts))


@pytest.mark.parametrize("codec", [n.CODEC_RAW, n.CODEC_ZSTD])
def test_files_are_allocated_whole_then_cut_back_to_their_last_chunk(tmp_path, codec):
    """The writer allocates every file for its chunks stored raw before writing them; what
    compression saved, and the padding of direct writes, is cut off again."""
    datas = [np.zeros((3 << 20) + 17, np.uint8), payload(2 << 20, 4, "float", seed=3), np.ones(100, np.uint8)]
    path = str(tmp_path / "d.bin")
    records = n.Writer(2).write([path], [n.WriteJob(d, 0, codec, 1, 0) for d in datas], fsync=False)
    end = max(r.offset + r.length for r in records)
    assert os.path.getsize(path) == end
    if codec == n.CODEC_ZSTD:
        assert end < sum(len(d) for d in datas) // 2
    assert os.stat(path).st_blocks * 512 < end + (1 << 20)      # no allocation left past the end
    check_records([path], datas, records)


def test_aligned_source_and_larger_destination(tmp_path):
    backing = np.random.default_rng(0).integers(0, 256, (8 << 20) + 8192, dtype=np.uint8)
    start = (-backing.ctypes.data) % 4096
    for size in ((4 << 20), (4 << 20) + 100, (8 << 20)):  # aligned source: no bounce copy
        src = backing[start:start + size]
        path = str(tmp_path / f"{size}.bin")
        (rec,) = n.Writer(2).write([path], [n.WriteJob(src, 0)])
        assert os.path.getsize(path) == rec.offset + rec.length  # padding cut off
        assert rec.crc32c == n.crc32c(src)
        dst = np.full(size + 10, 7, np.uint8)  # larger destination: only raw_length bytes written
        read_back([path], [rec], [dst])
        assert np.array_equal(dst[:size], src) and (dst[size:] == 7).all()


def test_aligned_chunks_with_a_partial_last_page_share_a_file(tmp_path):
    """Whole pages straight from the source, the partial last page through the bounce buffer,
    several such chunks packed into one file by concurrent writers."""
    backing = np.random.default_rng(1).integers(0, 256, 16 << 20, dtype=np.uint8)
    base = (-backing.ctypes.data) % 4096
    sizes = [(3 << 20) + 5, (1 << 20) + 4095, (2 << 20) + 1, (33 << 20) // 8 + 77]
    starts = [base + k * (3 << 20) for k in range(len(sizes))]
    srcs = [backing[s:s + size] for s, size in zip(starts, sizes)]
    assert [len(x) for x in srcs] == sizes
    path = str(tmp_path / "packed.bin")
    recs = n.Writer(2).write([path], [n.WriteJob(src, 0) for src in srcs])
    for src, rec in zip(srcs, recs):
        assert rec.crc32c == n.crc32c(src) and rec.offset % 4096 == 0
    dsts = [np.zeros_like(src) for src in srcs]
    assert read_back([path], recs, dsts) == [None] * len(srcs)
    assert all(np.array_equal(a, b) for a, b in zip(srcs, dsts))


def test_auto_compresses_only_highly_redundant_data(tmp_path):
    rand = payload(2 << 20, 1, "random", 0)
    floats = payload(2 << 20, 4, "float", 0)          # shrinks ~20-40 %: not worth zstd's speed
    labels = np.random.default_rng(1).integers(0, 4, (2 << 20) // 4).astype(np.float32).view(np.uint8)
    zeros = np.zeros(1000, np.uint8)
    paths = [str(tmp_path / "x.bin")]
    recs = n.Writer(2).write(paths, [n.WriteJob(rand, 0, n.CODEC_AUTO, 1, 4),
                                     n.WriteJob(floats, 0, n.CODEC_AUTO, 1, 4),
                                     n.WriteJob(labels, 0, n.CODEC_AUTO, 1, 4),
                                     n.WriteJob(zeros, 0, n.CODEC_AUTO)])
    assert (recs[0].codec, recs[0].shuffle) == (n.CODEC_RAW, 0)
    assert (recs[1].codec, recs[1].shuffle) == (n.CODEC_RAW, 0)
    assert (recs[2].codec, recs[2].shuffle) == (n.CODEC_ZSTD, 4)
    assert recs[2].length * 2 < recs[2].raw_length
    assert recs[3].codec == n.CODEC_ZSTD
    # the same floats under CODEC_ZSTD are compressed (the user asked for space)
    (f,) = n.Writer(1).write([str(tmp_path / "f.bin")], [n.WriteJob(floats, 0, n.CODEC_ZSTD, 1, 4)])
    assert f.codec == n.CODEC_ZSTD and f.length < f.raw_length
    # incompressible data under CODEC_ZSTD is stored raw, unshuffled
    (r,) = n.Writer(1).write([str(tmp_path / "y.bin")], [n.WriteJob(rand, 0, n.CODEC_ZSTD, 1, 2)])
    assert (r.codec, r.shuffle, r.length) == (n.CODEC_RAW, 0, len(rand))


def test_large_chunk_round_trip(tmp_path):
    """One chunk of 256 MiB + 3 bytes through the direct-IO path, plus an AUTO copy of it."""
    size = (256 << 20) + 3
    data = np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8)
    paths = [str(tmp_path / "big.bin")]
    records = n.Writer(4).write(paths, [n.WriteJob(data, 0), n.WriteJob(data, 0, n.CODEC_AUTO, 1, 8)])
    assert [r.codec for r in records] == [n.CODEC_RAW, n.CODEC_RAW]
    assert os.path.getsize(paths[0]) >= 2 * size
    assert records[0].crc32c == n.crc32c(data)
    out = np.empty_like(data)
    read_back(paths, records[:1], [out])
    assert np.array_equal(out, data)
    del out
    assert read_back(paths, records[1:], [None]) == [None]


def test_writer_validates_before_creating_files(tmp_path):
    path = tmp_path / "never.bin"
    for job in (n.WriteJob(b"x", 0, 7), n.WriteJob(b"x", 1), n.WriteJob(b"x", 0, 0, 1, 3)):
        with pytest.raises(FormatError):
            n.Writer(1).write([str(path)], [job])
        assert not path.exists()
    with pytest.raises(FormatError):
        n.WriteJob(b"x", -1)
    with pytest.raises(FormatError):
        n.Writer(0)


def test_empty_job_list_creates_empty_files(tmp_path):
    paths = [str(tmp_path / "e0"), str(tmp_path / "e1")]
    assert n.Writer(2).write(paths, []) == []
    assert [os.path.getsize(p) for p in paths] == [0, 0]




def test_forced_zstd_fallback_uses_zstandard_package(tmp_path):
    code = f"""
        import numpy as np, zstandard
        from async_ckpt import native as n
        backend = n.zstd_backend()
        assert backend is not None and "zstandard" in backend and "_cffi" in backend, backend
        data = np.arange(100_000, dtype=np.float32)
        (r,) = n.Writer(2).write([{str(tmp_path / 'f.bin')!r}], [n.WriteJob(data, 0, n.CODEC_ZSTD, 3, 4)])
        assert r.codec == n.CODEC_ZSTD
        out = np.empty_like(data)
        n.Reader(2).read([{str(tmp_path / 'f.bin')!r}], [n.ReadJob(r.file, r.offset, r.length,
            r.raw_length, r.codec, r.shuffle, r.crc32c, r.raw_crc32c, out, 0)])
        assert np.array_equal(out, data)
        assert zstandard.ZstdDecompressor().decompress(n.zstd_compress(b"abc" * 99)) == b"abc" * 99
        print("OK", backend)
    """
    proc = run_py(code, {"ASYNC_CKPT_FORCE_ZSTD_FALLBACK": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK")


def test_without_zstd_raw_works_and_zstd_raises(tmp_path):
    code = f"""
        from async_ckpt import _native as n
        from async_ckpt.errors import CodecError
        assert n.zstd_backend() is None
        p = {str(tmp_path / 'r.bin')!r}
        (r,) = n.Writer(1).write([p], [n.WriteJob(bytes(100_000), 0, n.CODEC_AUTO)])
        assert r.codec == n.CODEC_RAW
        for call in (lambda: n.zstd_compress(b"x"),
                     lambda: n.Writer(1).write([p + "2"], [n.WriteJob(b"x", 0, n.CODEC_ZSTD)])):
            try:
                call()
            except CodecError:
                pass
            else:
                raise AssertionError("no CodecError")
        try:
            n.zstd_load("/nonexistent/libzstd.so")
        except CodecError as e:
            assert "/nonexistent/libzstd.so" in str(e)
        print("OK")
    """
    proc = run_py(code, {})
    assert proc.returncode == 0, proc.stderr
