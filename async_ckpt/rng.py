"""Capture and restore every global random stream a training step consumes.

Called on the training thread: :func:`capture` inside ``save_async`` (the snapshot
moment), :func:`restore` at the very end of ``restore`` so nothing that runs during
loading (module constructors, optimizer casts) can consume randomness afterwards.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .errors import RestoreError


def capture() -> dict[str, Any]:
    """The python, numpy-legacy, torch CPU and (when initialised) per-device CUDA states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    # Only read CUDA states when CUDA is already in use: querying them would otherwise
    # initialise a CUDA context in a CPU-only job.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore(state: Any) -> None:
    """Set every stream saved by :func:`capture`; raises RestoreError on a malformed state."""
    if not isinstance(state, dict):
        raise RestoreError("rng item is not a dict")
    try:
        if "python" in state:
            version, internal, gauss = state["python"]
            random.setstate((int(version), tuple(int(x) for x in internal), gauss))
        if "numpy" in state:
            name, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos),
                                 int(has_gauss), float(cached)))
        if "torch" in state:
            # Private copies: set_rng_state crashes the process on a view with a storage offset
            # (torch 2.13), and restored arrays may be views of a shared chunk buffer.
            torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu().clone())
        cuda_states = state.get("cuda") or []
        if cuda_states and torch.cuda.is_available():
            n = min(len(cuda_states), torch.cuda.device_count())
            for device in range(n):
                torch.cuda.set_rng_state(torch.as_tensor(cuda_states[device], dtype=torch.uint8).cpu().clone(),
                                         device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise RestoreError(f"cannot restore RNG state: {e}") from e


def derived(seed: int, step: int) -> dict[str, Any]:
    """Deterministic RNG states derived from (seed, step), for checkpoints that lack them.

    Used by ``fix`` to fill in a missing RNG item; the result is marked *reconstructed*.
    """
    mixed = (int(seed) * 1_000_003 + int(step)) & 0xFFFFFFFF
    py = random.Random(mixed)
    gen = torch.Generator().manual_seed(mixed)
    return {
        "python": py.getstate(),
        "numpy": np.random.RandomState(mixed).get_state(),
        "torch": gen.get_state(),
        "cuda": [],
    }
