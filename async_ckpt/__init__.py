"""async_ckpt: fast, atomic, bit-exact checkpoints for PyTorch training."""

__version__ = "0.1.0"

from .data import ResumableSampler, train_val_split
from .errors import (CheckpointError, ChecksumError, CodecError, FormatError, NotCommittedError,
                     RestoreError, SaveError, StorageError)
from .manager import CheckpointManager, SaveHandle, SaveResult
from .options import CheckpointManagerOptions

__all__ = [
    "CheckpointManager", "CheckpointManagerOptions", "SaveHandle", "SaveResult",
    "ResumableSampler", "train_val_split",
    "CheckpointError", "ChecksumError", "CodecError", "FormatError", "NotCommittedError",
    "RestoreError", "SaveError", "StorageError",
]
