"""Staging buffers moved onto transparent huge pages while idle (pipeline/huge_pages.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions, native
from async_ckpt.pipeline import huge_pages
from async_ckpt.pipeline.huge_pages import HugePageTidier
from async_ckpt.pipeline.snapshot import StagingPool

HUGE = native.huge_page_size()


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def _thp_works() -> bool:
    if HUGE != 2 << 20:       # the sizes below assume x86-64's 2 MiB (arm64 may have 32-512 MiB)
        return False
    probe = torch.ones(4 * HUGE, dtype=torch.uint8)
    return native.collapse_huge_pages(probe.numpy()) != "unsupported"


THP = pytest.mark.skipif(not _thp_works(), reason="needs 2 MiB transparent huge pages that the kernel can "
                                                    "collapse into (Linux 6.1+, THP not 'never')")


def test_collapse_keeps_the_bytes() -> None:
    buf = torch.arange(8 << 20, dtype=torch.int32).view(torch.uint8)
    before = buf.clone()
    assert native.collapse_huge_pages(buf.numpy()) in ("done", "retry", "unsupported")
    assert torch.equal(buf, before)


def test_collapse_refuses_a_read_only_buffer() -> None:
    with pytest.raises(Exception, match="writable|read-only|readonly"):
        native.collapse_huge_pages(bytes(1 << 20))


@THP
def test_collapse_moves_the_range_onto_huge_pages() -> None:
    buf = torch.ones(16 * HUGE, dtype=torch.uint8)
    result = native.collapse_huge_pages(buf.numpy())
    if result == "retry":
        pytest.skip("the kernel found no free huge pages just now (memory fragmented by other jobs)")
    assert result == "done"
    assert _anon_huge_kib(buf.data_ptr()) * 1024 >= 14 * HUGE


@THP
def test_a_released_buffer_is_collapsed_up_to_the_bytes_used_only() -> None:
    tidier = HugePageTidier()
    pool = StagingPool(pin_memory=False, slack=1.0, tidier=tidier)     # as much headroom as used
    used = 24 * HUGE
    buf = pool.acquire(used)
    buf[:used].fill_(3)
    pool.release(buf)
    assert tidier.wait_idle(60)
    # Every whole huge page inside the used bytes was tried, none in the headroom (never
    # touched, it stays unpopulated); what the kernel collapsed is at most that.
    last_used_page = (buf.data_ptr() + used) // HUGE * HUGE - buf.data_ptr()
    assert tidier._done[buf.data_ptr()] == last_used_page
    assert tidier.collapsed_bytes <= used
    assert bool((buf[:used] == 3).all())
    again = pool.acquire(used)
    assert again.data_ptr() == buf.data_ptr() and pool.allocations == 1
    tidier.close()


class _BlockingCollapse:
    """Stands in for native.collapse_huge_pages: each call waits for ``go``."""

    def __init__(self, result: str = "done") -> None:
        self.result = result
        self.calls = 0
        self.started = threading.Event()
        self.go = threading.Event()

    def __call__(self, buffer) -> str:
        self.calls += 1
        self.started.set()
        assert self.go.wait(30)
        return self.result


@pytest.fixture
def fake_thp(monkeypatch):
    fake = _BlockingCollapse()
    monkeypatch.setattr(huge_pages, "QUIET", 0.0)
    monkeypatch.setattr(huge_pages.native, "huge_page_size", lambda: 2 << 20)
    monkeypatch.setattr(huge_pages.native, "collapse_huge_pages", fake)
    return fake


def test_a_save_taking_the_buffer_stops_the_collapse_without_waiting_for_it(fake_thp) -> None:
    tidier = HugePageTidier()
    pool = StagingPool(pin_memory=False, tidier=tidier)
    buf = pool.acquire(4 * huge_pages.PIECE)           # four pieces to collapse
    pool.release(buf)
    assert fake_thp.started.wait(30)
    got = pool.acquire(1 << 20)                        # the first piece is still running
    assert got.data_ptr() == buf.data_ptr() and not fake_thp.go.is_set()
    fake_thp.go.set()
    assert tidier.wait_idle(30)
    assert fake_thp.calls == 1                         # the other three were dropped with the claim
    assert tidier._done[buf.data_ptr()] > 0            # what did run is remembered
    tidier.close()


def test_a_buffer_taken_again_within_the_quiet_period_is_never_touched(fake_thp, monkeypatch) -> None:
    monkeypatch.setattr(huge_pages, "QUIET", 5.0)
    fake_thp.go.set()
    tidier = HugePageTidier()
    pool = StagingPool(pin_memory=False, tidier=tidier)
    buf = pool.acquire(4 * huge_pages.PIECE)
    for _ in range(5):                                 # back-to-back saves, 50 ms apart (< QUIET)
        pool.release(buf)
        time.sleep(0.05)
        buf = pool.acquire(4 * huge_pages.PIECE)
    assert pool.allocations == 1
    assert tidier.wait_idle(30) and fake_thp.calls == 0
    monkeypatch.setattr(huge_pages, "QUIET", 0.0)
    pool.release(buf)                                  # then it stays idle
    assert tidier.wait_idle(30) and fake_thp.calls == 4
    tidier.close()


def test_waiting_for_a_buffer_with_no_whole_huge_page_returns(fake_thp, monkeypatch) -> None:
    monkeypatch.setattr(huge_pages, "QUIET", 0.2)        # the waiter is waiting when the queue empties
    fake_thp.go.set()
    tidier = HugePageTidier()
    block = torch.empty(8 << 20, dtype=torch.uint8)
    start = -block.data_ptr() % (2 << 20) + (1 << 20)  # 1 MiB past a huge-page boundary
    buffer = block[start:start + (2 << 20)]             # holds one boundary, no whole page
    tidier.offer(buffer, buffer.numel())
    waiter = threading.Thread(target=tidier.wait_idle)  # no timeout, as the benchmark waits
    waiter.start()
    waiter.join(10)
    assert not waiter.is_alive() and fake_thp.calls == 0
    tidier.close()


def test_a_kernel_that_cannot_collapse_turns_the_tidier_off(fake_thp) -> None:
    fake_thp.result = "unsupported"
    fake_thp.go.set()
    tidier = HugePageTidier()
    pool = StagingPool(pin_memory=False, tidier=tidier)
    buf = pool.acquire(4 * huge_pages.PIECE)
    pool.release(buf)
    assert tidier.wait_idle(30)
    assert fake_thp.calls == 1 and not tidier.enabled
    pool.release(pool.acquire(1 << 20))
    assert fake_thp.calls == 1
    tidier.close()


def test_freeing_a_buffer_mid_collapse_forgets_it(fake_thp) -> None:
    tidier = HugePageTidier()
    pool = StagingPool(pin_memory=False, tidier=tidier)
    pool.release(pool.acquire(4 * huge_pages.PIECE))
    assert fake_thp.started.wait(30)
    pool.clear()                                       # drops the buffer while its piece runs
    assert not tidier._queue
    fake_thp.go.set()
    assert tidier.wait_idle(30) and fake_thp.calls == 1 and not tidier._done
    tidier.close()


def test_a_collapse_error_never_reaches_a_save(monkeypatch) -> None:
    def boom(buffer) -> str:
        raise OSError("madvise went wrong")
    monkeypatch.setattr(huge_pages.native, "huge_page_size", lambda: 2 << 20)
    monkeypatch.setattr(huge_pages.native, "collapse_huge_pages", boom)
    tidier = HugePageTidier()
    pool = StagingPool(pin_memory=False, tidier=tidier)
    pool.release(pool.acquire(2 * huge_pages.PIECE))
    assert tidier.wait_idle(30) and not tidier.enabled


def test_saves_from_a_collapsed_buffer_restore_exactly(tmp_path) -> None:
    state = {"w": torch.randn(3 << 20), "b": torch.randn(1000)}
    opts = CheckpointManagerOptions(handle_sigterm=False, max_to_keep=None, huge_pages=True)
    with CheckpointManager(tmp_path, options=opts) as mgr:
        mgr.save(1, state)
        assert mgr._tidier.wait_idle(60)
        if _thp_works():
            assert mgr._tidier._done                    # its pieces were tried
        state["w"].add_(1)
        mgr.save_async(2, state).result()
        expected = {k: v.clone() for k, v in state.items()}
        for v in state.values():
            v.zero_()
        assert mgr.restore(state, step=2) == 2
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_a_restore_scratch_buffer_is_not_tidied(tmp_path, fake_thp) -> None:
    fake_thp.go.set()
    state = {"w": torch.randn(1 << 20)}
    opts = CheckpointManagerOptions(handle_sigterm=False, huge_pages=True)
    with CheckpointManager(tmp_path, options=opts) as writer:
        writer.save(1, state)
        assert writer._tidier.wait_idle(30) and fake_thp.calls > 0    # a save's buffer is tidied
    calls = fake_thp.calls
    with CheckpointManager(tmp_path, options=opts) as reader:   # a resumed run: a new manager
        assert reader.restore(state) == 1
        assert reader._pool.allocations == 1                   # the restore's scratch buffer
        assert reader._tidier.wait_idle(30) and fake_thp.calls == calls


def test_huge_pages_are_opt_in_by_option_or_environment(monkeypatch) -> None:
    assert CheckpointManagerOptions().huge_pages is False
    monkeypatch.setenv("ASYNC_CKPT_HUGE_PAGES", "1")
    assert CheckpointManagerOptions().huge_pages is True
    assert CheckpointManagerOptions(huge_pages=False).huge_pages is False   # arguments win


@pytest.mark.parametrize("how", ["default", "option", "environment"])
def test_huge_pages_off_collapse_nothing(tmp_path, fake_thp, monkeypatch, how) -> None:
    fake_thp.go.set()
    if how == "environment":
        monkeypatch.setenv("ASYNC_CKPT_HUGE_PAGES", "0")
        opts = CheckpointManagerOptions(handle_sigterm=False)
    elif how == "option":
        opts = CheckpointManagerOptions(handle_sigterm=False, huge_pages=False)
    else:
        opts = CheckpointManagerOptions(handle_sigterm=False)
    assert opts.huge_pages is False
    with CheckpointManager(tmp_path, options=opts) as mgr:
        mgr.save(1, {"w": torch.randn(1 << 20)})
        assert mgr._tidier.wait_idle(30) and fake_thp.calls == 0


def test_a_bad_huge_pages_environment_value_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("ASYNC_CKPT_HUGE_PAGES", "maybe")
    with pytest.raises(ValueError, match="ASYNC_CKPT_HUGE_PAGES"):
        CheckpointManagerOptions()


def test_a_claim_wakes_a_waiter_and_a_dropped_buffer_is_not_kept_alive(fake_thp, monkeypatch) -> None:
    import gc
    import weakref

    monkeypatch.setattr(huge_pages, "QUIET", 30.0)      # queued, far from its turn
    fake_thp.go.set()
    tidier = HugePageTidier()
    pool = StagingPool(pin_memory=False, tidier=tidier)
    buf = pool.acquire(4 * huge_pages.PIECE)
    pool.release(buf)
    waiter = threading.Thread(target=tidier.wait_idle)   # waits for the queue to empty
    waiter.start()
    time.sleep(0.1)
    assert waiter.is_alive()
    gone = weakref.ref(buf)
    del buf
    pool.clear()                                         # forgets (claims) the buffer
    waiter.join(5)
    assert not waiter.is_alive()
    gc.collect()
    assert gone() is None                                # the tidier's thread holds no reference
    tidier.close()


def test_pieces_hold_whole_huge_pages_of_any_size(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(huge_pages, "QUIET", 0.0)
    monkeypatch.setattr(huge_pages.native, "huge_page_size", lambda: 32 << 20)   # arm64 16 KiB pages
    monkeypatch.setattr(huge_pages.native, "collapse_huge_pages", lambda b: calls.append(b.nbytes) or "done")
    tidier = HugePageTidier()
    block = torch.empty(200 << 20, dtype=torch.uint8)
    start = -block.data_ptr() % (32 << 20)
    buffer = block[start:start + (128 << 20)]           # four whole 32 MiB pages
    tidier.offer(buffer, buffer.numel())
    assert tidier.wait_idle(30)
    assert calls == [32 << 20] * 4 and tidier.collapsed_bytes == 128 << 20
    tidier.close()
