"""Bit-for-bit comparison of tensors and nested state, shared by the resume tests."""

from __future__ import annotations

import numpy as np
import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equal bits means equal values, NaNs and signed zeros included."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same(a, b) -> bool:
    """Equal dtypes, shapes and bits for tensors and ndarrays; recursively equal dicts (in key order),
    lists and tuples; ``==`` for anything else."""
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
