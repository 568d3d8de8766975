"""The states the IO benchmark saves: each one as the tree a user hands to a saver.

Every ``BenchState`` offers the same bytes in the shapes each contender takes:

- ``ours``: what ``CheckpointManager.save_async`` gets (stateful objects where there are some),
- ``tree``: nested state dicts of tensors and plain values (``torch.save``, DCP),
- ``flat``: ``{dotted.name: tensor}`` (safetensors, tensorstore); plain values dropped.

``nbytes`` (the denominator of every GB/s figure) is the sum of the tensors' bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

MiB = 1 << 20


@dataclass
class BenchState:
    name: str
    title: str
    ours: dict[str, Any]
    tree: dict[str, Any]
    flat: dict[str, torch.Tensor]
    nbytes: int = 0
    notes: str = ""
    keep: list[Any] = field(default_factory=list)    # objects that must outlive the run

    def __post_init__(self) -> None:
        self.nbytes = sum(t.numel() * t.element_size() for t in self.flat.values())

    @property
    def tensors(self) -> int:
        return len(self.flat)


def flatten(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a nested dict/list tree under dotted names (plain values are skipped)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix.rstrip(".")] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
    return out


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def large_fp32(size: int) -> BenchState:
    """``size`` bytes of fp32 in 64 MiB tensors (fewer, smaller ones for tiny sizes)."""
    per = min(64 * MiB, max(MiB, size // 4))
    g = _generator(1)
    tensors = {}
    left = size
    i = 0
    while left > 0:
        n = min(per, left) // 4
        tensors[f"layer{i:03d}.weight"] = torch.randn(n // 1024 or 1, 1024 if n >= 1024 else n, generator=g)
        left -= per
        i += 1
    tree = {"model": tensors}
    return BenchState("fp32_large", f"large fp32 tensors ({len(tensors)} x {per // MiB} MiB)",
                      tree, tree, flatten(tree))


class _TinyGPT(torch.nn.Module):
    """A small pre-LN decoder-only transformer (character level)."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, ctx: int) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, dim)
        self.pos = torch.nn.Embedding(ctx, dim)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, batch_first=True,
                                                 norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)
        self.ctx = ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t)
        h = self.tok(x) + self.pos(torch.arange(t))
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def transformer_adamw(size: int, steps: int = 4) -> BenchState:
    """A real small transformer trained a few AdamW steps; its state is about ``size`` bytes
    (parameters + two moments = 3x the parameter bytes)."""
    torch.manual_seed(0)
    params_wanted = max(20_000, size // 12)      # fp32 params, x3 with both AdamW moments
    layers = 4
    # ~12 d^2 per layer + 2 * vocab * d; solve for d, round to a multiple of 64.
    vocab, ctx = 256, 64
    d = int((-2 * vocab + math.sqrt(4 * vocab * vocab + 48 * layers * params_wanted)) / (24 * layers))
    d = max(32, d // 32 * 32)
    heads = 4 if d % 4 == 0 else 1
    model = _TinyGPT(vocab, d, layers, heads, ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    text = (b"the quick brown fox jumps over the lazy dog; checkpoints must never lose a step. " * 64)
    data = torch.tensor(list(text), dtype=torch.long)
    g = _generator(2)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - ctx - 1, (4,), generator=g)
        x = torch.stack([data[s:s + ctx] for s in starts])
        y = torch.stack([data[s + 1:s + ctx + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    ours = {"model": model, "optimizer": opt}
    tree = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    n_params = sum(p.numel() for p in model.parameters())
    return BenchState("transformer_adamw",
                      f"transformer d={d} L={layers} ({n_params / 1e6:.1f} M params) + AdamW after {steps} steps",
                      ours, tree, flatten(tree), keep=[model, opt])


def small_tensors(count: int = 20_000) -> BenchState:
    """``count`` small tensors (16 B .. 16 KiB, mixed dtypes): per-tensor overhead."""
    g = _generator(3)
    dtypes = (torch.float32, torch.float32, torch.bfloat16, torch.int64)
    tensors = {}
    for i in range(count):
        elems = int(torch.randint(4, 4096, (1,), generator=g))
        dt = dtypes[i % len(dtypes)]
        if dt == torch.int64:
            t = torch.randint(0, 1 << 20, (elems // 2 or 1,), generator=g)
        else:
            t = torch.randn(elems, generator=g).to(dt)
        tensors[f"p{i:05d}"] = t
    tree = {"model": tensors}
    return BenchState("small_20k", f"{count:,} small tensors (16 B - 16 KiB, fp32/bf16/int64)",
                      tree, tree, flatten(tree))


def bf16_weights(size: int) -> BenchState:
    """``size`` bytes of bf16 weight matrices (trained-like: N(0, 0.02))."""
    g = _generator(4)
    tensors = {}
    rows = 4096 if size >= 256 * MiB else max(64, int(math.sqrt(size // 2 // 8)) // 64 * 64)
    per = rows * rows * 2
    i = 0
    left = size
    while left > 0:
        r = rows if left >= per else max(1, left // (2 * rows))
        tensors[f"layers.{i}.weight"] = (torch.randn(r, rows, generator=g) * 0.02).to(torch.bfloat16)
        left -= r * rows * 2
        i += 1
    tree = {"model": tensors}
    return BenchState("bf16_weights", f"bf16 weights ({len(tensors)} x {rows}x{rows})", tree, tree, flatten(tree))


def build_states(size: int, quick: bool, only: list[str] | None = None, untrained: bool = False
                 ) -> list[tuple[str, Callable[[], BenchState]]]:
    """Factories in run order (states are built one at a time to bound memory). ``untrained``:
    the transformer as a resumed run builds it before restoring (no step taken, so its
    optimizer holds no moments yet)."""
    small_count = 100 if quick else 20_000
    steps = 0 if untrained else 1 if quick else 3
    factories = {
        "fp32_large": lambda: large_fp32(size),
        "transformer_adamw": lambda: transformer_adamw(size // 4 if not quick else size, steps=steps),
        "small_20k": lambda: small_tensors(small_count),
        "bf16_weights": lambda: bf16_weights(size // 2 if not quick else size),
    }
    names = only or list(factories)
    return [(n, factories[n]) for n in names]


STATE_NAMES = ("fp32_large", "transformer_adamw", "small_20k", "bf16_weights")
