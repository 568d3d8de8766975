"""Export a committed step's model for the tools people load models with.

    python -m async_ckpt.integrations.export ROOT [--step N] --format safetensors|torch --out DIR
                                             [--item model] [--force]

``--format safetensors`` writes ``DIR/model.safetensors`` the way ``save_pretrained`` does:
tied weights (several names for one saved array) are stored once and the alias is dropped
(the names a transformers model class lists in ``_tied_weights_keys`` go first, otherwise
every name after the first), with ``{"format": "pt"}`` metadata, so ``from_pretrained``
re-ties them and loads the weights bit for bit. ``--format torch`` writes
``DIR/pytorch_model.bin``: ``torch.save`` of a dict of tensors, every name kept (tied names
share storage, as in ``model.state_dict()``), for ``model.load_state_dict(torch.load(...,
weights_only=True))``. When the step has a ``config`` item (the HF integration and
``python -m async_ckpt.fix`` store ``{"config.json": text, ...}``; a plain config dict with
``model_type`` works too), ``config.json`` and ``generation_config.json`` are written beside.

The model item (``--item``, default ``model``) must be a flat mapping of names to tensors:
a module's state dict. Only that item (and ``config``) is read, never the optimizer.

Exit codes: 0 exported; 2 the root, step, model or config cannot be read (missing,
uncommitted, corrupt, not a flat state dict, root busy); 1 the output could not be written;
64 usage (bad arguments, an output folder that is not empty without ``--force``).
Errors are one line on stderr, never a traceback.

Runs on the caller's thread; opens the root with a :class:`~async_ckpt.CheckpointManager`
that deletes nothing (no leftover cleanup, no rotation). The manager takes the root's lock:
export from a run that is still training fails with exit 2 (the lock says so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

EXIT_OK, EXIT_WRITE, EXIT_INPUT, EXIT_USAGE = 0, 1, 2, 64
CONFIG_FILES = ("config.json", "generation_config.json")   # the only names written from a config item
FORMATS = {"safetensors": "model.safetensors", "torch": "pytorch_model.bin"}


class ExportError(Exception):
    """A reason to stop, with the exit code to stop with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:   # argparse exits 2; usage errors are 64 here
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m async_ckpt.integrations.export",
                description="Write a committed step's model as model.safetensors (+ config.json) "
                            "or pytorch_model.bin.")
    p.add_argument("root", help="checkpoint root (the CheckpointManager directory)")
    p.add_argument("--step", type=int, default=None, help="step to export (default: the latest committed)")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="output format")
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --force)")
    p.add_argument("--item", default="model", help="item holding the state dict (default: model)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    return p


def _open(root: Path) -> Any:
    from async_ckpt import CheckpointError, CheckpointManager, CheckpointManagerOptions

    if not root.is_dir():
        raise ExportError(f"{root}: no such checkpoint root", EXIT_INPUT)
    opts = CheckpointManagerOptions(max_to_keep=None, cleanup_leftovers=False, handle_sigterm=False)
    try:
        return CheckpointManager(root, opts)
    except CheckpointError as e:
        raise ExportError(f"{root}: {e}", EXIT_INPUT) from None


def _read_item(mgr: Any, step: int, name: str) -> Any:
    """The decoded item ``name`` of ``step``: only its arrays are read."""
    box: dict[str, Any] = {name: {}}
    mgr.restore(box, step=step, restore_rng=False)
    return box[name]


def _state_dict(item: Any, name: str) -> dict[str, Any]:
    import torch

    if not isinstance(item, dict) or not item:
        raise ExportError(f"item {name!r} is not a state dict (a mapping of names to tensors)", EXIT_INPUT)
    for key, value in item.items():
        if not isinstance(key, str):
            raise ExportError(f"item {name!r}: key {key!r} is not a string", EXIT_INPUT)
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"item {name!r}: {key!r} holds a {type(value).__name__}, not a tensor "
                              "(only flat state dicts can be exported)", EXIT_INPUT)
    return item


def _config(mgr: Any, step: int) -> dict[str, str]:
    """``{file name: json text}`` from the step's ``config`` item ({} when it has none)."""
    from async_ckpt import NotCommittedError, RestoreError

    try:
        item = _read_item(mgr, step, "config")
    except NotCommittedError:
        raise
    except RestoreError:
        # The step is committed and the target is an empty dict: what restore can refuse
        # here is a missing item (damaged bytes raise ChecksumError/FormatError instead).
        return {}
    if isinstance(item, dict) and "model_type" in item:      # a plain config dict
        return {"config.json": json.dumps(item, indent=2, sort_keys=True) + "\n"}
    files: dict[str, str] = {}
    if isinstance(item, dict):
        for fname in CONFIG_FILES:      # an allowlist: names from a checkpoint never become paths
            text = item.get(fname)
            if isinstance(text, bytes):
                text = text.decode("utf-8", errors="strict")
            if isinstance(text, str):
                try:
                    json.loads(text)
                except ValueError as e:
                    raise ExportError(f"config item: {fname} is not valid JSON ({e})", EXIT_INPUT) from None
                files[fname] = text
    return files


def _tied_targets(config_text: Optional[str]) -> list[str]:
    """Patterns of the names ``save_pretrained`` drops for tied weights (the class's
    ``_tied_weights_keys``), when transformers and the config's architecture are available."""
    if not config_text:
        return []
    try:
        archs = json.loads(config_text).get("architectures") or []
        import transformers

        cls = getattr(transformers, archs[0], None) if archs else None
    except Exception:   # no transformers, an unknown architecture: fall back to name order
        return []
    keys = getattr(cls, "_tied_weights_keys", None) or []
    return list(keys.keys()) if isinstance(keys, dict) else list(keys)


def untie(state: dict[str, Any], targets: Sequence[str] = ()) -> tuple[dict[str, Any], list[str]]:
    """One name per tensor object: returns (state without aliases, dropped names).

    For each group of names bound to one tensor, the kept name is the first (in state
    order) that matches none of ``targets`` (regexes, as ``save_pretrained`` matches
    ``_tied_weights_keys``), else the first name.
    """
    groups: dict[int, list[str]] = {}
    for key, value in state.items():
        groups.setdefault(id(value), []).append(key)
    dropped: list[str] = []
    for names in groups.values():
        if len(names) < 2:
            continue
        keep = next((n for n in names if not any(re.search(t, n) for t in targets)), names[0])
        dropped.extend(n for n in names if n != keep)
    return {k: v for k, v in state.items() if k not in set(dropped)}, dropped


def _write(path: Path, write: Any) -> None:
    """Write through a temporary name, then rename: a failed export leaves no half file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export(root: Path, step: Optional[int], fmt: str, out: Path, item: str = "model", force: bool = False) -> str:
    """Export and return a one-line summary. Raises :class:`ExportError`."""
    from async_ckpt import CheckpointError

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise ExportError(f"{out} exists and is not an empty folder (use --force to write into it)", EXIT_USAGE)
    mgr = _open(root)
    try:
        steps = mgr.all_steps()
        if step is None:
            if not steps:
                raise ExportError(f"{root}: no committed step", EXIT_INPUT)
            step = steps[-1]
        elif step not in steps:
            raise ExportError(f"{root}: step {step} is not a committed step "
                              f"(committed: {', '.join(map(str, steps)) or 'none'})", EXIT_INPUT)
        try:
            state = _state_dict(_read_item(mgr, step, item), item)
            config = _config(mgr, step)
        except CheckpointError as e:
            raise ExportError(f"{root}: step {step}: {e}", EXIT_INPUT) from None
    finally:
        mgr.close()

    import torch

    try:
        out.mkdir(parents=True, exist_ok=True)
        written = [FORMATS[fmt]]
        if fmt == "safetensors":
            from safetensors.torch import save_file

            kept, dropped = untie(state, _tied_targets(config.get("config.json")))
            tensors = {k: v.detach().contiguous() for k, v in kept.items()}
            _write(out / FORMATS[fmt], lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        else:
            # Detach once per tensor object, so tied names keep sharing one storage.
            detached: dict[int, Any] = {}
            tensors = {k: detached.setdefault(id(v), v.detach()) for k, v in state.items()}
            dropped = []
            _write(out / FORMATS[fmt], lambda p: torch.save(tensors, str(p)))
        for fname, text in config.items():
            _write(out / fname, lambda p, t=text: p.write_text(t, encoding="utf-8"))
            written.append(fname)
    except OSError as e:
        raise ExportError(f"{out}: cannot write: {e}", EXIT_WRITE) from None
    nbytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors.values()}.values())
    tied = f", {len(dropped)} tied alias(es) dropped" if dropped else ""
    return (f"exported step {step} of {root}: {len(tensors)} tensors, {nbytes} bytes{tied} -> "
            f"{', '.join(str(out / w) for w in written)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit code (see the module doc)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:          # --help exits 0, usage errors 64
        return int(e.code or 0)
    try:
        print(export(Path(args.root), args.step, args.format, Path(args.out), args.item, args.force))
    except ExportError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return e.code
    except ImportError as e:
        print(f"export: error: {e} (pip install safetensors)", file=sys.stderr)
        return EXIT_WRITE
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
