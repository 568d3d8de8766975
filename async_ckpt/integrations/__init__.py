"""Training-framework integrations built on async_ckpt's public API only.

Each submodule imports its framework lazily, so ``import async_ckpt.integrations`` never
pulls in transformers, Lightning or Accelerate:

- :mod:`async_ckpt.integrations.hf`: ``AsyncCheckpointTrainer`` / ``AsyncCheckpointMixin``
  for the Hugging Face ``Trainer``.
- :mod:`async_ckpt.integrations.lightning`: ``AsyncCheckpointIO``, a Lightning
  ``CheckpointIO`` plugin.
- :mod:`async_ckpt.integrations.accelerate`: ``save_state`` / ``load_state`` helpers for an
  ``accelerate.Accelerator``.
- :mod:`async_ckpt.integrations.export`: ``python -m async_ckpt.integrations.export``,
  a committed step's model as ``model.safetensors`` (+ ``config.json``) or ``pytorch_model.bin``.

See docs/INTEGRATIONS.md for the exact lines per library.
"""

from __future__ import annotations

from .. import CheckpointError  # the public name: internal module paths may move

__all__ = ["IntegrationError"]


class IntegrationError(CheckpointError, ValueError):
    """A framework configuration the integration cannot checkpoint exactly (e.g. several
    processes, DeepSpeed/FSDP), or a checkpoint that does not hold what the framework needs.

    Raised on the caller's thread before anything is written, with the reason and a fix.
    """
