"""The native core against failing disks and lying records: every failure is a named
async_ckpt error (never a crash, a hang or an allocation a header merely asked for)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from native_helpers import run_py
from async_ckpt import native as n
from async_ckpt.errors import (CheckpointError, ChecksumError, FormatError,
                               StorageError)





def terabyte_frame() -> bytes:
    """A valid zstd frame header declaring 2**40 content bytes, then one 4-byte raw block."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0xC0, 0x50]) + (1 << 40).to_bytes(8, "little")
    return header + ((4 << 3) | 1).to_bytes(3, "little") + b"abcd"


def write_one(tmp_path, data, codec=n.CODEC_RAW, shuffle=0, name="d.bin"):
    path = str(tmp_path / name)
    (rec,) = n.Writer(2).write([path], [n.WriteJob(data, 0, codec, 1, shuffle)])
    return path, rec


def job(rec, dst=None, chunk=3, **over):
    f = dict(file=rec.file, offset=rec.offset, length=rec.length, raw_length=rec.raw_length,
             codec=rec.codec, shuffle=rec.shuffle, crc32c=rec.crc32c, raw_crc32c=rec.raw_crc32c)
    f.update(over)
    return n.ReadJob(f["file"], f["offset"], f["length"], f["raw_length"], f["codec"], f["shuffle"],
                     f["crc32c"], f["raw_crc32c"], dst, chunk)


def flip(path, offset):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x40]))


FLOATS = np.linspace(0, 1, 200_000, dtype=np.float32)


# ---------------------------------------------------------------- checksums


@pytest.mark.parametrize("codec,shuffle", [(n.CODEC_RAW, 0), (n.CODEC_ZSTD, 0), (n.CODEC_ZSTD, 4)])
def test_flipped_byte_is_checksum_error_naming_chunk(tmp_path, codec, shuffle):
    path, rec = write_one(tmp_path, FLOATS, codec, shuffle)
    assert rec.codec == codec
    flip(path, rec.offset + rec.length // 2)
    dst = np.empty_like(FLOATS)
    with pytest.raises(ChecksumError) as info:
        n.Reader(2).read([path], [job(rec, dst, chunk=17)])
    e = info.value
    assert (e.path, e.offset, e.chunk) == (path, rec.offset, 17)
    assert "chunk 17" in str(e) and path in str(e)
    (msg,) = n.Reader(2).read([path], [job(rec, None, chunk=17)], collect_errors=True)
    assert msg.startswith("ChecksumError:") and "chunk 17" in msg


def test_wrong_raw_crc_is_checksum_error_after_decoding(tmp_path):
    path, rec = write_one(tmp_path, FLOATS, n.CODEC_ZSTD, 4)
    with pytest.raises(ChecksumError, match="decoded bytes"):
        n.Reader(1).read([path], [job(rec, np.empty_like(FLOATS), raw_crc32c=rec.raw_crc32c ^ 1)])


def test_collect_errors_reports_each_job(tmp_path):
    path, rec = write_one(tmp_path, FLOATS, n.CODEC_ZSTD)
    jobs = [job(rec, chunk=0), job(rec, chunk=1, crc32c=rec.crc32c ^ 1),
            job(rec, chunk=2, offset=10 ** 12), job(rec, chunk=3, file=5), job(rec, chunk=4)]
    msgs = n.Reader(3).read([path], jobs, collect_errors=True)
    assert msgs[0] is None and msgs[4] is None
    assert msgs[1].startswith("ChecksumError:")
    assert msgs[2].startswith("FormatError:") and "past the end" in msgs[2]
    assert msgs[3].startswith("FormatError:") and "out of range" in msgs[3]


# ---------------------------------------------------------------- reads in file order
# Jobs of one file are read one at a time in file order, whatever order they are given in;
# a job that fails before or while reading passes its turn on, so nothing waits forever.

def _pieces(tmp_path, count=12, size=300_000, files=1):
    """``count`` raw chunks spread over ``files`` files (written in one call each)."""
    rng = np.random.default_rng(3)
    data = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(count)]
    paths, recs = [], []
    per = -(-count // files)
    for f in range(files):
        path = str(tmp_path / f"d{f}.bin")
        own = n.Writer(2).write([path], [n.WriteJob(d, 0, n.CODEC_RAW, 1, 0) for d in data[f * per:(f + 1) * per]])
        paths.append(path)
        recs += [(f, r) for r in own]
    return paths, recs, data


def _read_in_thread(reader, paths, jobs, collect):
    box = {}

    def go():
        try:
            box["out"] = reader.read(paths, jobs, collect_errors=collect)
        except Exception as e:        # noqa: BLE001 - handed to the test
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "read hung"
    return box


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("files", [1, 3])
def test_jobs_in_any_order_read_every_chunk(tmp_path, threads, files):
    paths, recs, data = _pieces(tmp_path, files=files)
    order = np.random.default_rng(threads + files).permutation(len(recs))
    dsts = [np.zeros(len(d), np.uint8) for d in data]
    jobs = [job(recs[i][1], dsts[i], chunk=int(i), file=recs[i][0]) for i in order]
    box = _read_in_thread(n.Reader(threads), paths, jobs, False)
    assert "error" not in box
    for d, dst in zip(data, dsts):
        assert np.array_equal(d, dst)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_failing_jobs_pass_their_turn_on(tmp_path, threads):
    paths, recs, data = _pieces(tmp_path)
    dsts = [np.zeros(len(d), np.uint8) for d in data]
    jobs = [job(r, dsts[i], chunk=i) for i, (_, r) in enumerate(recs)]
    jobs[2] = job(recs[2][1], dsts[2], chunk=2, crc32c=recs[2][1].crc32c ^ 1, raw_crc32c=recs[2][1].crc32c ^ 1)
    jobs[5] = job(recs[5][1], dsts[5], chunk=5, raw_length=recs[5][1].raw_length + 1)   # refused before reading
    jobs[7] = job(recs[7][1], dsts[7], chunk=7, file=9)                                  # no such file
    jobs[9] = job(recs[9][1], dsts[9], chunk=9, offset=10 ** 12)                         # past the end
    box = _read_in_thread(n.Reader(threads), paths, list(reversed(jobs)), True)
    msgs = list(reversed(box["out"]))
    bad = {2: "ChecksumError:", 5: "FormatError:", 7: "FormatError:", 9: "FormatError:"}
    for i, msg in enumerate(msgs):
        if i in bad:
            assert msg is not None and msg.startswith(bad[i]), (i, msg)
        else:
            assert msg is None, (i, msg)
            assert np.array_equal(data[i], dsts[i])
    # Without collecting: the first error is raised, and the read returns.
    box = _read_in_thread(n.Reader(threads), paths, jobs, False)
    assert isinstance(box.get("error"), (ChecksumError, FormatError))


# ---------------------------------------------------------------- pieces and backups
# A job may scatter its chunk over several buffers; a piece with a backup has its old bytes
# copied there first, and put back when the read fails.

def _split(buf, cuts):
    """Consecutive slices of ``buf`` at ``cuts``."""
    edges = [0, *cuts, len(buf)]
    return [buf[a:b] for a, b in zip(edges, edges[1:])]


def pieces_job(rec, pieces, chunk=3, **over):
    base = job(rec, None, chunk, **over)
    return n.ReadJob(base.file, base.offset, base.length, base.raw_length, base.codec, base.shuffle,
                     base.crc32c, base.raw_crc32c, None, chunk, pieces)


@pytest.mark.parametrize("codec,shuffle", [(n.CODEC_RAW, 0), (n.CODEC_ZSTD, 0), (n.CODEC_ZSTD, 4)])
@pytest.mark.parametrize("threads", [1, 3])
def test_pieces_scatter_the_chunk_and_backups_keep_the_old_bytes(tmp_path, codec, shuffle, threads):
    path, rec = write_one(tmp_path, FLOATS, codec, shuffle)
    raw = FLOATS.view(np.uint8)
    cuts = [0, 1, 4097, 400_000, 400_000, 799_999]        # empty, odd and page-crossing pieces
    dsts = [np.full(len(p), 7, np.uint8) for p in _split(raw, cuts)]
    backups = [np.zeros(len(d), np.uint8) if i % 2 else None for i, d in enumerate(dsts)]
    n.Reader(threads).read([path], [pieces_job(rec, list(zip(dsts, backups)))])
    assert np.array_equal(np.concatenate(dsts), raw)
    for d, b in zip(dsts, backups):
        if b is not None:
            assert (b == 7).all()


@pytest.mark.parametrize("collect", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_a_failed_read_puts_every_backed_up_piece_back(tmp_path, threads, collect):
    paths, recs, data = _pieces(tmp_path)
    live = [np.full(len(d), i, np.uint8) for i, d in enumerate(data)]
    backups = [np.empty(len(d), np.uint8) for d in data]
    jobs = [pieces_job(r, [(live[i][:1000], backups[i][:1000]), (live[i][1000:], backups[i][1000:])], chunk=i)
            for i, (_, r) in enumerate(recs)]
    bad = len(jobs) - 2              # read after most of the others have overwritten their pieces
    flip(paths[0], recs[bad][1].offset + 5)
    box = _read_in_thread(n.Reader(threads), paths, jobs, collect)
    if collect:
        msgs = box["out"]
        assert msgs[bad].startswith("ChecksumError:") and all(m is None for i, m in enumerate(msgs) if i != bad)
        for i, d in enumerate(data):     # only the failed job's pieces are put back
            assert np.array_equal(live[i], d if i != bad else np.full(len(d), i, np.uint8)), i
    else:
        assert isinstance(box.get("error"), ChecksumError)
        for i, arr in enumerate(live):
            assert (arr == i).all(), i


def test_pieces_are_checked(tmp_path):
    path, rec = write_one(tmp_path, FLOATS)
    raw_len = FLOATS.nbytes
    short = [(np.empty(raw_len - 1, np.uint8), None)]
    with pytest.raises(FormatError, match="pieces hold"):
        n.Reader(1).read([path], [pieces_job(rec, short)])
    buf = np.empty(raw_len, np.uint8)
    with pytest.raises(FormatError, match="as long as"):
        n.Reader(1).read([path], [pieces_job(rec, [(buf, np.empty(10, np.uint8))])])
    with pytest.raises(FormatError, match="overlaps"):
        n.Reader(1).read([path], [pieces_job(rec, [(buf[:100], buf[50:150]), (buf[100:], None)])])
    with pytest.raises(FormatError, match="not both"):
        n.ReadJob(rec.file, rec.offset, rec.length, rec.raw_length, rec.codec, rec.shuffle, rec.crc32c,
                  rec.raw_crc32c, buf, 0, [(buf, None)])
    with pytest.raises(FormatError, match="tuple"):
        n.Reader(1).read([path], [pieces_job(rec, [buf])])
    readonly = np.empty(raw_len, np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(FormatError):
        n.Reader(1).read([path], [pieces_job(rec, [(readonly, None)])])


def test_a_file_that_cannot_be_opened_fails_only_its_jobs(tmp_path):
    paths, recs, data = _pieces(tmp_path, files=2)
    missing = str(tmp_path / "gone.bin")
    dsts = [np.zeros(len(d), np.uint8) for d in data]
    jobs = [job(r, dsts[i], chunk=i, file=f) for i, (f, r) in enumerate(recs)]
    box = _read_in_thread(n.Reader(2), [missing, paths[1]], jobs, True)
    for i, ((f, _), msg) in enumerate(zip(recs, box["out"])):
        if f == 0:
            assert msg is not None and "gone.bin" in msg
        else:
            assert msg is None and np.array_equal(data[i], dsts[i])


# ---------------------------------------------------------------- lying records


def test_truncated_file_is_format_error(tmp_path):
    path, rec = write_one(tmp_path, FLOATS, n.CODEC_ZSTD)
    os.truncate(path, rec.offset + rec.length - 1)
    with pytest.raises(FormatError, match="past the end"):
        n.Reader(1).read([path], [job(rec, np.empty_like(FLOATS))])


@pytest.mark.parametrize("over,match", [
    (dict(offset=1 << 40), "past the end"),
    (dict(length=1 << 40), "past the end"),
    (dict(raw_length=FLOATS.nbytes + 1), "exceeds the destination"),
    (dict(raw_length=(1 << 31) + 1), "2 GiB"),
    (dict(length=100), "length != raw_length"),
    (dict(codec=7), "unknown codec"),
    (dict(shuffle=3), "shuffle"),
    (dict(shuffle=4), "shuffle"),
    (dict(file=1), "out of range"),
    (dict(raw_crc32c=5), "raw_crc32c"),
])
def test_lying_raw_records(tmp_path, over, match):
    path, rec = write_one(tmp_path, FLOATS)
    with pytest.raises(FormatError, match=match):
        n.Reader(1).read([path], [job(rec, np.empty_like(FLOATS), **over)])


@pytest.mark.parametrize("over,match", [
    (dict(raw_length=FLOATS.nbytes - 4), "declares"),
    (dict(length=1), "not a zstd frame|declares|frame"),
    (dict(length=0), "impossible"),
    (dict(length=(1 << 31)), "impossible|past the end"),
])
def test_lying_zstd_records(tmp_path, over, match):
    path, rec = write_one(tmp_path, FLOATS, n.CODEC_ZSTD)
    over.setdefault("crc32c", rec.crc32c)
    if "length" in over and over["length"] and over["length"] < rec.length:
        with open(path, "rb") as fh:
            fh.seek(rec.offset)
            over["crc32c"] = n.crc32c(fh.read(over["length"]))
    with pytest.raises(FormatError, match=match):
        n.Reader(1).read([path], [job(rec, np.empty_like(FLOATS), **over)])


def test_terabyte_frame_rejected_without_allocation(tmp_path):
    frame = terabyte_frame()
    path = str(tmp_path / "tb.bin")
    n.write_file_durable(path, frame)
    crc = n.crc32c(frame)
    for raw_length, dst in ((4, bytearray(4)), (1 << 31, None)):  # None: verify-only, 2 GiB cap
        j = n.ReadJob(0, 0, len(frame), raw_length, n.CODEC_ZSTD, 0, crc, 0, dst, 9)
        with pytest.raises(FormatError, match="declares 1099511627776"):
            n.Reader(1).read([path], [j])
    j = n.ReadJob(0, 0, len(frame), 1 << 40, n.CODEC_ZSTD, 0, crc, 0, None, 9)
    with pytest.raises(FormatError, match="2 GiB"):
        n.Reader(1).read([path], [j])


@pytest.mark.parametrize("bad", [-1, 1 << 64, 1.5, "3", True])
def test_non_integer_or_negative_fields_are_format_errors(bad):
    with pytest.raises(FormatError):
        n.ReadJob(0, bad, 1, 1, 0, 0, 0, 0)
    with pytest.raises(FormatError):
        n.ReadJob(0, 0, 1, 1, 0, 0, bad if bad is not True else 1 << 32, 0)


def test_readonly_destination_rejected(tmp_path):
    path, rec = write_one(tmp_path, b"abc")
    with pytest.raises(FormatError):
        n.Reader(1).read([path], [job(rec, b"xyz")])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 1 << 20), length=st.integers(0, 1 << 20),
       raw_length=st.integers(0, 1 << 21), codec=st.integers(0, 3), shuffle=st.sampled_from([0, 1, 2, 3, 4, 8, 16]),
       crc=st.integers(0, (1 << 32) - 1), use_dst=st.booleans())
def test_fuzz_records_never_crash(fuzz_file, offset, length, raw_length, codec, shuffle, crc, use_dst):
    path, size = fuzz_file
    dst = bytearray(min(raw_length, 1 << 20)) if use_dst else None
    j = n.ReadJob(0, offset, length, raw_length, codec, shuffle, crc, crc, dst, 1)
    try:
        n.Reader(1).read([path], [j])
    except CheckpointError:
        pass
    (msg,) = n.Reader(1).read([path], [j], collect_errors=True)
    assert msg is None or msg.split(":")[0] in ("FormatError", "ChecksumError", "CodecError")


@pytest.fixture(scope="module")
def fuzz_file():
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "fuzz.bin")
    data = np.linspace(0, 1, 300_000, dtype=np.float32)
    n.Writer(2).write([path], [n.WriteJob(data, 0, n.CODEC_ZSTD, 1, 4), n.WriteJob(data, 0)])
    yield path, os.path.getsize(path)
    shutil.rmtree(folder)


# ---------------------------------------------------------------- files and the OS


def test_existing_file_is_never_overwritten(tmp_path):
    path = tmp_path / "exists.bin"
    path.write_bytes(b"precious")
    with pytest.raises(StorageError) as info:
        n.Writer(1).write([str(path)], [n.WriteJob(b"new", 0)])
    assert info.value.errno == errno.EEXIST and info.value.filename == str(path)
    assert path.read_bytes() == b"precious"
    with pytest.raises(StorageError):
        n.write_file_durable(str(path), b"x")
    assert path.read_bytes() == b"precious"


def test_symlinks_rejected(tmp_path):
    target, rec = write_one(tmp_path, b"payload")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    with pytest.raises(StorageError) as info:
        n.Reader(1).read([str(link)], [job(rec, bytearray(7))])
    assert info.value.errno == errno.ELOOP and info.value.filename == str(link)
    dangling = tmp_path / "dangling.bin"
    dangling.symlink_to(tmp_path / "nowhere.bin")
    with pytest.raises(StorageError):  # the writer never creates through a symlink
        n.Writer(1).write([str(dangling)], [n.WriteJob(b"x", 0)])
    assert not (tmp_path / "nowhere.bin").exists()


def test_fifo_and_directory_rejected_without_hanging(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    j = n.ReadJob(0, 0, 1, 1, 0, 0, 0, 0)
    with pytest.raises(FormatError, match="not a regular file"):
        n.Reader(1).read([str(fifo)], [j])
    with pytest.raises(CheckpointError):
        n.Reader(1).read([str(tmp_path)], [j])
    (msg,) = n.Reader(1).read([str(tmp_path / "missing")], [j], collect_errors=True)
    assert msg.startswith("StorageError:") and "No such file" in msg


def test_fsync_helpers(tmp_path):
    p = tmp_path / "f.bin"
    n.write_file_durable(str(p), memoryview(b"hello"))
    assert p.read_bytes() == b"hello"
    n.fsync_file(str(p))
    n.fsync_dir(str(tmp_path))
    with pytest.raises(StorageError) as info:
        n.fsync_dir(str(tmp_path / "missing"))
    assert info.value.errno == errno.ENOENT


def test_file_size_limit_surfaces_as_storage_error(tmp_path):
    code = f"""
        import errno, resource, signal
        import numpy as np
        from async_ckpt import native as n
        from async_ckpt.errors import StorageError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
        for size in (3 << 20, 300_000):  # direct and buffered paths
            try:
                n.Writer(2).write([{str(tmp_path)!r} + f"/big{{size}}.bin"],
                                  [n.WriteJob(data[:size], 0)] * 5)
            except StorageError as e:
                assert e.errno == errno.EFBIG, e
                assert e.filename.endswith(".bin") and "offset" in e.strerror, e
            else:
                raise AssertionError("no error")
        print("OK")
    """
    proc = run_py(code, {})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"


@pytest.fixture
def small_tmpfs():
    mnt = tempfile.mkdtemp(prefix="ackpt-tmpfs-")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount a 4 MiB tmpfs (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=False)
        os.rmdir(mnt)


@pytest.mark.parametrize("size", [3 << 20, 200_000])
def test_disk_full_is_storage_error_enospc(small_tmpfs, size):
    data = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    path = os.path.join(small_tmpfs, f"full-{uuid.uuid4().hex}.bin")
    with pytest.raises(StorageError) as info:
        n.Writer(4).write([path], [n.WriteJob(data, 0)] * 40)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == path


# ---------------------------------------------------------------- threads and the GIL


def test_gil_released_during_write(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 64 << 20, dtype=np.uint8)
    jobs = [n.WriteJob(data, 0, n.CODEC_ZSTD, 1, 0)] * 4
    ticks = 0
    done = threading.Event()

    def save():
        n.Writer(2).write([str(tmp_path / "g.bin")], jobs, fsync=False)
        done.set()

    t = threading.Thread(target=save)
    t0 = time.perf_counter()
    t.start()
    while not done.is_set():
        ticks += 1
        time.sleep(0.001)
    t.join()
    assert time.perf_counter() - t0 > 0.05
    assert ticks > 10  # the main thread kept running while the writer worked


def test_one_writer_shared_by_threads(tmp_path):
    w = n.Writer(3)
    results, errors = {}, []

    def save(k):
        try:
            data = np.full(500_000 + k, k, np.uint8)
            results[k] = (data, w.write([str(tmp_path / f"t{k}.bin")],
                                        [n.WriteJob(data, 0, n.CODEC_AUTO)] * 3))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=save, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, (data, recs) in results.items():
        for r in recs:
            out = np.empty_like(data)
            n.Reader(1).read([str(tmp_path / f"t{k}.bin")], [job(r, out)])
            assert np.array_equal(out, data)


def test_pools_work_in_a_forked_child(tmp_path):
    code = f"""
        import os
        import numpy as np
        from async_ckpt import native as n
        w, r = n.Writer(4), n.Reader(4)
        data = np.arange(1_000_000, dtype=np.float32)
        w.write([{str(tmp_path / 'parent.bin')!r}], [n.WriteJob(data, 0)] * 4)
        pid = os.fork()
        if pid == 0:
            try:
                recs = w.write([{str(tmp_path / 'child.bin')!r}], [n.WriteJob(data, 0, n.CODEC_ZSTD, 1, 4)] * 4)
                out = [np.empty_like(data) for _ in recs]
                r.read([{str(tmp_path / 'child.bin')!r}], [n.ReadJob(x.file, x.offset, x.length,
                       x.raw_length, x.codec, x.shuffle, x.crc32c, x.raw_crc32c, o, i)
                       for i, (x, o) in enumerate(zip(recs, out))])
                ok = all(np.array_equal(o, data) for o in out)
                del w, r
                os._exit(0 if ok else 3)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        print("OK")
    """
    proc = run_py(code, {})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"
