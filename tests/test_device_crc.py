"""Chunk checksums assembled from pieces: the algebra the CUDA kernel runs, checked here on the
host (the g++ build and, where nvcc built the module, nvcc's host build of the same code), and
the writer's use of checksums computed elsewhere. The kernel itself runs in tests/test_cuda.py.
"""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from async_ckpt import ChecksumError, CheckpointError, FormatError, native
from async_ckpt.pipeline import device_crc
from native_helpers import chunk_pieces_with_gaps

_native = native._native


def split_into_pieces(data: np.ndarray, cuts: list[int], gaps: list[int], chunk_len: int):
    """Chunks of ``chunk_len`` over ``data``, pieces also cut at ``cuts``, bytes at ``gaps`` zeroed
    and left uncovered. Returns (staged bytes, pieces rows, chunk lengths)."""
    staged = data.copy()
    staged[gaps] = 0
    rows, lens = chunk_pieces_with_gaps(staged.ctypes.data, len(data), chunk_len, gaps)
    cut_rows = []
    for addr, n, off, chunk in rows:          # split further at the cuts (pieces may abut)
        a = addr - staged.ctypes.data
        inner = sorted(c for c in set(cuts) if a < c < a + n)
        for x, y in zip([a] + inner, inner + [a + n]):
            cut_rows.append((staged.ctypes.data + x, y - x, off + x - a, chunk))
    return staged, np.array(cut_rows, dtype=np.uint64).reshape(-1, 4), lens


def host_crcs(staged: np.ndarray, chunk_len: int) -> list[int]:
    return [native.crc32c(staged[s:s + chunk_len]) for s in range(0, len(staged), chunk_len)]


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 5000), chunk_len=st.integers(1, 2000), segment=st.sampled_from([8, 16, 24, 512]),
       cut_seeds=st.lists(st.integers(0, 10**6), max_size=6),
       gap_seeds=st.lists(st.integers(0, 10**6), max_size=12), seed=st.integers(0, 2**32 - 1))
def test_pieces_with_zero_gaps_give_the_host_crc32c(size, chunk_len, segment, cut_seeds, gap_seeds, seed):
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    staged, rows, lens = split_into_pieces(data, [c % size for c in cut_seeds], [g % size for g in gap_seeds],
                                           chunk_len)
    assert _native.crc32c_pieces(rows, lens, segment) == host_crcs(staged, chunk_len)


def test_large_chunk_with_unaligned_pieces_and_default_segment():
    data = np.random.default_rng(7).integers(0, 256, (3 << 20) + 333, dtype=np.uint8)
    gaps = [100, 101, 102, (1 << 20) + 5, (2 << 20) + 9]
    staged, rows, lens = split_into_pieces(data, [12345, (1 << 20) + 7], gaps, len(data))
    assert _native.crc32c_pieces(rows, lens) == [native.crc32c(staged)]


def test_a_chunk_without_pieces_is_all_zeros():
    zeros = np.zeros(4096, np.uint8)
    assert _native.crc32c_pieces(np.zeros((0, 4), np.uint64), [4096]) == [native.crc32c(zeros)]


@pytest.mark.parametrize("rows, lens, segment, message", [
    ([(0, 10, 0, 1)], [10], 16, "out of range"),
    ([(0, 11, 0, 0)], [10], 16, "outside its chunk"),
    ([(0, 4, 8, 0)], [10], 16, "outside its chunk"),
    ([(0, 0, 0, 0)], [10], 16, "empty"),
    ([(0, 4, 0, 0)], [10], 12, "multiple of 8"),
    ([(0, 4, 0, 0)], [10], 0, "multiple of 8"),
])
def test_bad_pieces_are_rejected_before_any_read(rows, lens, segment, message):
    with pytest.raises(FormatError, match=message):
        _native.crc32c_pieces(np.array(rows, np.uint64), lens, segment)


def test_pieces_must_be_rows_of_four():
    with pytest.raises(FormatError, match=r"\(n, 4\)"):
        _native.crc32c_pieces(np.zeros((2, 3), np.uint64), [10])


needs_module = pytest.mark.skipif(device_crc.module_path() is None,
                                  reason="the CUDA module was not built (no nvcc at install time)")


@needs_module
def test_nvcc_host_build_of_the_kernel_math_agrees():
    assert device_crc.load() is None
    assert _native.cuda_crc_path() == device_crc.module_path()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        size = int(rng.integers(1, 200_000))
        data = rng.integers(0, 256, size, dtype=np.uint8)
        chunk_len = int(rng.integers(1, size + 1))
        gaps = list(rng.integers(0, size, int(rng.integers(0, 8))))
        staged, rows, lens = split_into_pieces(data, list(rng.integers(0, size, 4)), gaps, chunk_len)
        segment = int(rng.choice([8, 64, 16384]))
        assert _native.cuda_crc32c_pieces_host(rows, lens, segment) == host_crcs(staged, chunk_len)
    with pytest.raises(FormatError, match="outside its chunk"):
        _native.cuda_crc32c_pieces_host(np.array([(0, 11, 0, 0)], np.uint64), [10])


@needs_module
def test_loading_a_second_module_path_is_refused(tmp_path):
    assert device_crc.load() is None
    with pytest.raises(CheckpointError, match="already loaded"):
        _native.cuda_crc_load(str(tmp_path / "other.so"))


@needs_module
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_without_a_gpu_the_device_path_reports_why_and_stays_off():
    with pytest.raises(CheckpointError, match="no usable CUDA device"):
        _native.cuda_device_count()
    with pytest.raises(CheckpointError):
        out, workspace = np.zeros(1, np.uint32), np.zeros(_native.cuda_crc_workspace_bytes(1, 1), np.uint8)
        _native.cuda_crc32c_pieces(np.array([(1 << 40, 8, 0, 0)], np.uint64), [8], out, workspace, 16384, 0, 0)


def test_mode_follows_the_environment(monkeypatch):
    monkeypatch.delenv(device_crc.ENV, raising=False)
    assert device_crc.mode() == "on"
    monkeypatch.setenv(device_crc.ENV, "0")
    assert device_crc.mode() == "off"
    assert device_crc.available(0) is False
    monkeypatch.setenv(device_crc.ENV, "check")
    assert device_crc.mode() == "check"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_available_is_false_with_one_warning_when_no_gpu(monkeypatch):
    monkeypatch.delenv(device_crc.ENV, raising=False)
    monkeypatch.setattr(device_crc, "_device_ok", {})
    with pytest.warns(RuntimeWarning, match="checksums stay on the host"):
        assert device_crc.available(0) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device_crc.available(0) is False     # decided once, no second warning


# --- the writer's use of checksums computed elsewhere -------------------------------------

def write_with_known(tmp_path, data, words, flags, codec, check=False):
    writer = native.Writer(2)
    jobs = [native.WriteJob(memoryview(d), 0, codec, 1, 4) for d in data]
    return writer.write([str(tmp_path / "f.bin")], jobs, True, None, np.array(words, np.uint32),
                        np.array(flags, np.uint8), check)


@pytest.mark.parametrize("codec", [native.CODEC_RAW, native.CODEC_ZSTD])
def test_writer_takes_flagged_known_crcs_and_computes_the_rest(tmp_path, codec):
    a = np.zeros(3 << 20, np.uint8).tobytes()            # compressible and large (O_DIRECT path)
    b = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    records = write_with_known(tmp_path, [a, b], [native.crc32c(a), 12345], [1, 0], codec)
    assert [r.raw_crc32c for r in records] == [native.crc32c(a), native.crc32c(b)]
    # A flagged word is trusted as given: the writer did not checksum that chunk itself.
    sub = tmp_path / "lie"
    sub.mkdir()
    records = write_with_known(sub, [a], [0xDEADBEEF], [1], codec)
    assert records[0].raw_crc32c == 0xDEADBEEF


def test_check_mode_catches_a_wrong_known_crc(tmp_path):
    a = np.random.default_rng(1).integers(0, 256, 2 << 20, dtype=np.uint8).tobytes()
    with pytest.raises(ChecksumError, match="differs from the host's") as info:
        write_with_known(tmp_path, [a], [native.crc32c(a) ^ 1], [1], native.CODEC_RAW, check=True)
    assert info.value.chunk == 0
    ok = tmp_path / "ok"
    ok.mkdir()
    assert write_with_known(ok, [a], [native.crc32c(a)], [1], native.CODEC_RAW, check=True)[0].crc32c \
        == native.crc32c(a)


def test_known_crc_arguments_are_validated(tmp_path):
    writer = native.Writer(1)
    jobs = [native.WriteJob(b"abc", 0)]
    path = [str(tmp_path / "f.bin")]
    with pytest.raises(FormatError, match="go together"):
        writer.write(path, jobs, True, None, np.zeros(1, np.uint32), None)
    with pytest.raises(FormatError, match="one 4-byte word per job"):
        writer.write(path, jobs, True, None, np.zeros(2, np.uint32), np.zeros(1, np.uint8))
    with pytest.raises(FormatError, match="one byte per job"):
        writer.write(path, jobs, True, None, np.zeros(1, np.uint32), np.zeros(2, np.uint8))
    assert not (tmp_path / "f.bin").exists()


@needs_module
def test_launch_refuses_a_workspace_too_small_before_touching_cuda():
    assert device_crc.load() is None
    need = _native.cuda_crc_workspace_bytes(3, 2)
    assert need == 32 * 3 + 8 * 4 + 8 * 2          # pieces | segment prefix | chunk lengths
    with pytest.raises(FormatError, match="workspace is smaller"):
        _native.cuda_crc32c_pieces(np.array([(1 << 40, 8, 0, 0)], np.uint64), [8], np.zeros(1, np.uint32),
                                   np.zeros(_native.cuda_crc_workspace_bytes(1, 1) - 1, np.uint8), 16384, 0, 0)
