"""Pause Python's cyclic garbage collector while a burst of long-lived objects is built.

Parsing a manifest and decoding the tree of a state with tens of thousands of tensors
allocates hundreds of thousands of dicts, lists and tuples that all stay alive. Each
allocation burst triggers generation-0/1/2 collections that traverse everything built so
far and free nothing: on 20,000 small tensors that was about 40 % of a restore
(``python -m benchmarks.io --only small_20k``). Reference counting still frees garbage
as usual; only the cycle search waits until the block ends.

Called on the caller's thread by ``CheckpointManager.restore``/``load`` and around the
tree encoding of ``save_async``. Nesting is fine: the collector is re-enabled only by the
outermost block, and only if it was enabled when that block began. The switch is
process-wide; blocks on two threads that overlap may end the pause early, which costs
speed, never correctness.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Disable the cyclic collector for the block (no-op when it is already disabled)."""
    was_enabled = gc.isenabled()
    if was_enabled:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
