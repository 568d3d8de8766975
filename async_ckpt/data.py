"""Deterministic, resumable data order.

``ResumableSampler`` yields a seeded permutation per epoch and remembers how far it
got, so a run restored mid-epoch continues with exactly the next sample. It is a
``torch.utils.data.Sampler`` with ``state_dict``/``load_state_dict`` and is used on
the training thread (with a DataLoader, use ``num_workers=0`` or count consumed
batches yourself: worker prefetch draws indices ahead of training).
"""

from __future__ import annotations

from typing import Any, Iterator, Sized, Union

import torch


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Seeded shuffle per epoch; ``state_dict`` holds (seed, epoch, position)."""

    def __init__(self, data_source: Union[Sized, int], seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples = data_source if isinstance(data_source, int) else len(data_source)
        if self.num_samples < 0:
            raise ValueError(f"dataset size must be >= 0, got {self.num_samples}")
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0        # indices of the current epoch already handed out

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[int]:
        """Yield the rest of the current epoch, then advance to the next epoch."""
        order = self._order(self.epoch)
        while self.position < self.num_samples:
            index = int(order[self.position])
            self.position += 1
            yield index
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return self.num_samples - self.position

    def next_batch(self, batch_size: int) -> list[int]:
        """The next ``batch_size`` indices, crossing into the next epoch when one ends."""
        out: list[int] = []
        while len(out) < batch_size:
            if self.num_samples == 0:
                raise ValueError("cannot draw a batch from an empty dataset")
            if self.position >= self.num_samples:
                self.epoch += 1
                self.position = 0
            order = self._order(self.epoch)
            take = min(batch_size - len(out), self.num_samples - self.position)
            out.extend(int(i) for i in order[self.position:self.position + take])
            self.position += take
        return out

    def next_batch_for(self, global_batch: int, rank: int, world_size: int) -> list[int]:
        """This rank's share (``[rank::world_size]``) of the next global batch.

        Every rank draws the same global batch, so the sampler's state is the same on all of
        them and the global sample order does not depend on the world size: a run resumed
        with another number of ranks continues the same order.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        return self.next_batch(global_batch)[rank::world_size]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "num_samples": self.num_samples, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"sampler was saved over {state['num_samples']} samples, "
                             f"this dataset has {self.num_samples}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.shuffle = bool(state.get("shuffle", True))


def train_val_split(n: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
    """A deterministic split of ``range(n)``: the same (n, fraction, seed) always gives the same sets."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=g).tolist()
    n_val = int(round(n * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])
