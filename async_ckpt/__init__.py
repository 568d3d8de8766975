"""async_ckpt: fast, atomic, bit-exact checkpoints for PyTorch training.

The public names are imported lazily (PEP 562), so ``python -m async_ckpt.verify`` and
``async_ckpt.layout`` work without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointManager": "manager", "SaveHandle": "manager", "SaveResult": "manager",
    "CheckpointManagerOptions": "options",
    "ResumableSampler": "data", "train_val_split": "data",
    "CheckpointError": "errors", "ChecksumError": "errors", "CodecError": "errors",
    "FormatError": "errors", "NotCommittedError": "errors", "RestoreError": "errors",
    "RootBusyError": "errors", "SaveError": "errors", "StorageError": "errors",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .data import ResumableSampler, train_val_split
    from .errors import (CheckpointError, ChecksumError, CodecError, FormatError, NotCommittedError,
                         RestoreError, RootBusyError, SaveError, StorageError)
    from .manager import CheckpointManager, SaveHandle, SaveResult
    from .options import CheckpointManagerOptions


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'async_ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
