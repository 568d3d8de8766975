"""IO errors while saving: ENOSPC and EIO injected under the native writer and the commit
code, and a real ENOSPC on a small tmpfs. Each time: the save fails with a clear
SaveError (errno and file named), earlier checkpoints stay committed and restore bit
for bit, no tmp directory is left, the error is raised once, and saving works again.

Injection: a tiny LD_PRELOAD library (compiled here with the system C compiler) wraps
``write``/``pwrite``/``pwrite64``/``fsync``/``fdatasync``; a running process arms it
through ctypes (``ackpt_fault_set(errno, ops, budget, path_substring)``): calls on file
descriptors whose path contains the substring fail with ``errno`` after ``budget``
bytes succeeded (the call that crosses the budget is a short write). This file is
also the script the subprocess runs (``python tests/test_faults_io.py scenario``).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>
#include <pthread.h>

#include <sys/stat.h>

enum { OP_WRITE = 1, OP_FSYNC = 2, OP_FSYNC_DIR = 4 };
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int g_err = 0, g_ops = 0;
static long long g_budget = 0;
static char g_sub[256];
static long long g_fired = 0;

int ackpt_fault_set(int err, int ops, long long budget, const char* sub) {
  pthread_mutex_lock(&mu);
  g_err = err; g_ops = ops; g_budget = budget; g_fired = 0;
  snprintf(g_sub, sizeof g_sub, "%s", sub ? sub : "");
  pthread_mutex_unlock(&mu);
  return 0;
}
long long ackpt_fault_fired(void) { return g_fired; }

static int matches(int fd) {
  char link[64], path[4096];
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, path, sizeof path - 1);
  if (n < 0) return 0;
  path[n] = 0;
  return strstr(path, g_sub) != NULL;
}

/* 0: pass through; >0: allow only this many bytes (short write); -1: fail now. */
static long long decide(int fd, int op, size_t n) {
  long long r = 0;
  if (!g_err || !(g_ops & op)) return 0;   /* unlocked fast path: off */
  pthread_mutex_lock(&mu);
  if (g_err && (g_ops & op) && matches(fd)) {
    if (op == OP_WRITE && g_budget >= (long long)n) { g_budget -= n; r = 0; }
    else if (op == OP_WRITE && g_budget > 0) { r = g_budget; g_budget = 0; }
    else { r = -1; g_fired++; }
  }
  pthread_mutex_unlock(&mu);
  return r;
}

#define REAL(name) static __typeof__(name)* real_##name; if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void* b, size_t n) {
  REAL(write);
  long long d = decide(fd, OP_WRITE, n);
  if (d < 0) { errno = g_err; return -1; }
  return real_write(fd, b, d ? (size_t)d : n);
}
ssize_t pwrite(int fd, const void* b, size_t n, off_t off) {
  REAL(pwrite);
  long long d = decide(fd, OP_WRITE, n);
  if (d < 0) { errno = g_err; return -1; }
  return real_pwrite(fd, b, d ? (size_t)d : n, off);
}
ssize_t pwrite64(int fd, const void* b, size_t n, off_t off) {
  REAL(pwrite64);
  long long d = decide(fd, OP_WRITE, n);
  if (d < 0) { errno = g_err; return -1; }
  return real_pwrite64(fd, b, d ? (size_t)d : n, off);
}
static int fsync_op(int fd) {
  struct stat st;
  return fstat(fd, &st) == 0 && S_ISDIR(st.st_mode) ? OP_FSYNC_DIR : OP_FSYNC;
}
int fsync(int fd) {
  REAL(fsync);
  if (decide(fd, fsync_op(fd), 0) < 0) { errno = g_err; return -1; }
  return real_fsync(fd);
}
int fdatasync(int fd) {
  REAL(fdatasync);
  if (decide(fd, fsync_op(fd), 0) < 0) { errno = g_err; return -1; }
  return real_fdatasync(fd);
}
"""

OP_WRITE, OP_FSYNC, OP_FSYNC_DIR = 1, 2, 4   # fsync of a file / of a directory
# (errno, ops, budget, path substring, what it models)
CASES = [
    (errno.ENOSPC, OP_WRITE, 0, "data-r0", "data file: first pwrite fails"),
    (errno.ENOSPC, OP_WRITE, 20_000, "data-r0", "data file fills up mid-save (a short write first)"),
    (errno.EIO, OP_WRITE, 5_000, "data-r0", "data file: EIO after some chunks"),
    (errno.EIO, OP_FSYNC, 0, "data-r0", "data file: fsync reports a lost write"),
    (errno.ENOSPC, OP_WRITE, 10, "manifest.json", "manifest: disk full after 10 bytes"),
    (errno.EIO, OP_FSYNC, 0, "manifest.json", "manifest: fsync EIO"),
    (errno.ENOSPC, OP_WRITE, 0, "COMMIT", "commit marker cannot be written"),
    (errno.EIO, OP_FSYNC, 0, "COMMIT", "commit marker: fsync EIO"),
    (errno.EIO, OP_FSYNC_DIR, 0, ".checkpoint-", "tmp directory fsync EIO (before the rename)"),
    (errno.EIO, OP_WRITE | OP_FSYNC, 0, ".checkpoint-", "every write and fsync in the tmp directory fails"),
]


def build_shim(out_dir: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the fault-injection shim")
    src = out_dir / "ackpt_fault_shim.c"
    lib = out_dir / "ackpt_fault_shim.so"
    src.write_text(SHIM_C)
    proc = subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl", "-lpthread"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot build the fault-injection shim: {proc.stderr[-500:]}")
    return lib


def _committed_ok(mgr, seed, steps, cw) -> None:
    assert mgr.all_steps() == steps, (mgr.all_steps(), steps)
    for s in steps:
        tree = mgr.load(s)
        for item in cw.ITEMS:
            assert cw.difference(tree[item], cw.expected_state(seed, s)[item]) is None, (s, item)


def scenario(root: str) -> None:
    """Runs in a subprocess with the shim preloaded; prints one line per case."""
    import ctypes

    import crash_worker as cw
    from async_ckpt import CheckpointManager, CheckpointManagerOptions
    import ckpt_layout as layout
    from async_ckpt.tools import verify
    from async_ckpt.errors import SaveError, StorageError

    shim = ctypes.CDLL(None)
    shim.ackpt_fault_set.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_char_p]
    shim.ackpt_fault_fired.restype = ctypes.c_longlong
    seed = 11
    opts = CheckpointManagerOptions(max_to_keep=None, compression=None, chunk_bytes=64 << 10, io_threads=2,
                                    handle_sigterm=False)
    state = cw.expected_state(seed, 0)
    with CheckpointManager(root, opts) as mgr:
        step = 0
        committed = []
        for _ in range(2):
            cw.assign(state, cw.expected_state(seed, step))
            mgr.save(step, state)
            committed.append(step)
            step += 1
        for err, ops, budget, sub, what in CASES:
            shim.ackpt_fault_set(err, ops, budget, sub.encode())
            cw.assign(state, cw.expected_state(seed, step))
            handle = mgr.save_async(step, state)
            try:
                handle.result()
            except SaveError as e:
                cause = e.__cause__
                assert e.step == step, e
                assert isinstance(cause, OSError) and cause.errno == err, (what, repr(cause))
                assert os.strerror(err) in str(e) and f"step {step}" in str(e), (what, str(e))
                assert isinstance(cause, StorageError) and cause.filename, (what, repr(cause))
                assert sub in cause.filename or sub in str(e), (what, str(e))
                message = str(e)
            else:
                raise AssertionError(f"{what}: the save succeeded")
            finally:
                fired = shim.ackpt_fault_fired()
                shim.ackpt_fault_set(0, 0, 0, b"")
            assert fired >= 1, what
            mgr.wait_until_finished()          # the error was raised once, not again
            assert not layout.find_leftovers(Path(root)), f"{what}: tmp dir left behind"
            assert not (Path(root) / layout.step_dir_name(step)).exists(), what
            _committed_ok(mgr, seed, committed, cw)
            step += 1
            # Space is back: the next save works.
            cw.assign(state, cw.expected_state(seed, step))
            mgr.save(step, state)
            committed.append(step)
            _committed_ok(mgr, seed, committed, cw)
            print(f"ok {os.strerror(err)} {what}: {message[:160]}")
            step += 1
    with CheckpointManager(root, opts) as mgr:
        _committed_ok(mgr, seed, committed, cw)
    for s in committed:
        assert verify.check_step(Path(root) / layout.step_dir_name(s)).verdict == verify.COMPLETE
    print("DONE", len(CASES))


def test_injected_enospc_and_eio(tmp_path):
    lib = build_shim(tmp_path)
    env = dict(os.environ, LD_PRELOAD=str(lib), PYTHONPATH=str(HERE.parent))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "scenario", str(tmp_path / "root")],
                          capture_output=True, text=True, timeout=300, env=env)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"DONE {len(CASES)}" in proc.stdout


@pytest.fixture
def small_tmpfs():
    mnt = tempfile.mkdtemp(prefix="ackpt-full-")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", mnt], capture_output=True, text=True)
    if proc.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount a small tmpfs (needs root / CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False)
        os.rmdir(mnt)


def test_real_enospc_on_a_full_tmpfs(small_tmpfs):
    import crash_worker as cw
    from async_ckpt import CheckpointManager, CheckpointManagerOptions
    import ckpt_layout as layout
    from async_ckpt.tools import verify
    from async_ckpt.errors import SaveError

    root = Path(small_tmpfs) / "run"
    seed = 5
    opts = CheckpointManagerOptions(max_to_keep=None, compression=None, chunk_bytes=64 << 10, io_threads=2,
                                    handle_sigterm=False)
    state = cw.expected_state(seed, 0, "big")
    committed = []
    with CheckpointManager(root, opts) as mgr:
        failure = None
        for step in range(20):
            cw.assign(state, cw.expected_state(seed, step, "big"))
            try:
                mgr.save(step, state)
            except SaveError as e:
                failure = e
                break
            committed.append(step)
        assert failure is not None, "the 6 MiB tmpfs never filled up"
        assert committed, "not even one step fit"
        cause = failure.__cause__
        assert isinstance(cause, OSError) and cause.errno == errno.ENOSPC, repr(cause)
        assert "No space left on device" in str(failure) and f"step {step}" in str(failure)
        assert not layout.find_leftovers(root)
        assert mgr.all_steps() == committed
        for s in committed:
            tree = mgr.load(s)
            exp = cw.expected_state(seed, s, "big")
            for item in cw.ITEMS:
                assert cw.difference(tree[item], exp[item]) is None
        # Space comes back (the operator grows the volume): training saves again.
        subprocess.run(["mount", "-o", "remount,size=64m", small_tmpfs], check=True)
        step += 1
        cw.assign(state, cw.expected_state(seed, step, "big"))
        mgr.save(step, state)
        committed.append(step)
        assert mgr.all_steps() == committed
    probe = cw.expected_state(seed, 0, "big")
    with CheckpointManager(root, opts) as mgr:
        assert mgr.restore(probe) == step
    assert cw.difference(probe, cw.expected_state(seed, step, "big")) is None
    for s in committed:
        assert verify.check_step(root / layout.step_dir_name(s)).verdict == verify.COMPLETE


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "scenario":
        scenario(sys.argv[2])
    else:
        sys.exit("usage: test_faults_io.py scenario ROOT")
