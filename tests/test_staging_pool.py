"""The staging pool: buffers reused across saves, grown rarely, pinned up to a cap, freed."""

import pytest
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions
from async_ckpt.pipeline.snapshot import PAGE, StagingPool


class RecordingPool(StagingPool):
    """Pretends to pin (this machine may have no CUDA): records what would have been pinned."""

    def __init__(self, **kw):
        super().__init__(pin_memory=True, **kw)
        self.pinned_requests = []

    def _allocate(self, nbytes, pin):
        self.pinned_requests.append(pin)
        return torch.empty(nbytes, dtype=torch.uint8)


def test_buffers_are_page_aligned_and_reused():
    pool = StagingPool(pin_memory=False)
    a = pool.acquire(10_000)
    assert a.data_ptr() % PAGE == 0 and a.numel() >= 10_000
    pool.release(a)
    b = pool.acquire(9_000)                 # fits: the same buffer comes back
    assert b.data_ptr() == a.data_ptr() and pool.allocations == 1
    pool.release(b)
    c = pool.acquire(50_000)                # too small now: replaced, not kept beside it
    assert pool.allocations == 2 and pool.allocated_bytes == c.numel()
    pool.release(c)
    pool.clear()
    assert pool.allocated_bytes == 0


def test_pinned_memory_stops_at_the_cap_with_one_warning():
    pool = RecordingPool(pinned_limit=30_000, slack=0.0)
    first = pool.acquire(20_000)
    assert pool.pinned_requests == [True] and pool.pinned_bytes == 20_000
    with pytest.warns(RuntimeWarning, match="pageable memory: max_pinned_bytes=30000"):
        second = pool.acquire(20_000)       # 40 000 > 30 000: pageable
    assert pool.pinned_requests == [True, False] and pool.pinned_bytes == 20_000
    pool.release(first)
    pool.release(second)
    pool.clear()
    assert pool.pinned_bytes == 0 and pool.allocated_bytes == 0
    pool.acquire(25_000)                    # room again after clear
    assert pool.pinned_requests[-1] is True


def test_option_is_validated_and_reaches_the_pool(tmp_path):
    with pytest.raises(ValueError, match="max_pinned_bytes"):
        CheckpointManagerOptions(max_pinned_bytes=-1)
    with CheckpointManager(tmp_path, CheckpointManagerOptions(max_pinned_bytes=1 << 20)) as mgr:
        assert mgr._pool.pinned_limit == 1 << 20
        mgr.save(1, {"x": torch.arange(1000)})
        assert mgr._pool.allocated_bytes > 0
    assert mgr._pool.allocated_bytes == 0          # close() frees the pool


def test_a_free_buffer_behind_another_is_taken_and_dropped_by_identity():
    # Two saves in flight give back two buffers; the one a save takes (or the one dropped
    # because it is too small) need not be the first in the free list. Tensors compare
    # element by element, so finding it by equality raised ("The size of tensor a must
    # match the size of tensor b").
    pool = StagingPool(pin_memory=False, slack=0.0)
    first, second = pool.acquire(50_000), pool.acquire(40_000)
    pool.release(first)
    pool.release(second)
    taken = pool.acquire(40_000)            # the smallest that fits: the second one
    assert taken.data_ptr() == second.data_ptr()
    pool.release(taken)                     # free: [first (50,000), second (40,000)]
    pool.release(pool.acquire(10_000))      # the second again; free: [first, second]
    small = pool.acquire(45_000)            # only first fits
    assert small.data_ptr() == first.data_ptr()
    pool.release(small)                     # free: [second, first]
    bigger = pool.acquire(60_000)           # fits neither: the largest (first, not first in line) is dropped
    assert pool.allocations == 3
    assert pool.allocated_bytes == bigger.numel() + 40_000
    pool.release(bigger)
    pool.clear()
    assert pool.allocated_bytes == 0
