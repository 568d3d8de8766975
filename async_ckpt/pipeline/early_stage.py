"""Stage arrays while the tree is still being encoded, into the last save's layout.

A save of many small tensors spends most of its stall encoding the tree (a few
attribute reads per tensor, in Python); the copy into staging only starts after it.
But a training run saves the same structure every time, so the layout of the last save
(:class:`~async_ckpt.pipeline.plan.LayoutCache`) tells where each array will go before
the plan exists. :class:`EarlyStage` is the encoder's observer: every ``every`` arrays
it queues the ones already encoded on a native copier thread (``StageQueue``, which needs
no GIL to start), at the offsets of the last layout, and the encoder goes on meanwhile.

The guess is only kept when it was right: :meth:`EarlyStage.finish` returns the arrays
it staged only if ``plan_save`` came back with that very layout (the cache compared
every dtype, shape, and which arrays are frozen, replicas or shards). Otherwise every
byte it copied is copied again where the real plan says. Copies never go past the
buffer (lengths are the smaller of the guessed and the real size) and never open the
writer's gate: nothing is written before the plan is confirmed.

Threads: the training thread calls :meth:`arrays_added` (from the encoder) and
:meth:`finish`/:meth:`wait`; the queue's own thread runs the copies.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..format.tree import ArrayTable
from .plan import SavePlan, _Layout

# Arrays per batch handed to the copier: the last batch's worth is copied after encoding.
EVERY = 1024


class EarlyStage:
    """One save's early copy (see the module docstring). Owned by ``save_async``."""

    def __init__(self, guess: _Layout, buffer: torch.Tensor) -> None:
        from .. import native

        self.every = EVERY
        self.guess = guess
        self.host = buffer.numpy()
        self._queue = native.StageQueue()
        n = len(guess.offset_array)
        self._laid = np.zeros(n, bool)
        self._laid[guess.staged] = True
        self._copied = np.zeros(n, bool)
        self._seen = 0                 # table rows looked at so far

    def arrays_added(self, table: ArrayTable) -> None:
        """Encoder callback (training thread): queue the copy of the rows added since the
        last call that are plain host memory laid out by the guessed layout."""
        a, b = self._seen, min(len(table.host), len(self._laid))
        if b <= a:
            return
        self._seen = b
        addresses = np.array(table.host[a:b], np.int64)
        take = np.flatnonzero((addresses >= 0) & self._laid[a:b])
        if not len(take):
            return
        index = take + a
        offsets = self.guess.offset_array[index]
        lengths = np.minimum(np.array(table.nbytes[a:b], np.int64)[take], self.guess.nbytes_array[index])
        self._queue.submit(self.host, addresses[take], offsets, lengths)
        self._copied[index] = True

    def finish(self, plan: Optional[SavePlan]) -> Optional[np.ndarray]:
        """Which arrays are staged (a mask by array index) if ``plan`` uses the guessed
        layout, else None. Copies may still be running: :meth:`wait` before the buffer
        is read or handed on."""
        return self._copied if plan is not None and plan.layout is self.guess else None

    def wait(self) -> None:
        """Block until every queued copy is done (GIL released)."""
        self._queue.wait()
