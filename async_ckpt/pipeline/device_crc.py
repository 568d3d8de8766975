"""Chunk checksums computed on the GPU, while the bytes are still there (optional).

The CUDA module (``async_ckpt/_cuda_crc*.so``, built from ``csrc/cuda/`` where nvcc was found)
computes the crc32c of whole staged chunks from the device tensors they are copied from.
The writer then takes those words instead of running its own checksum pass over the pinned
buffer. Nothing here is needed: without the module, a driver or a GPU, every chunk is
checksummed on the host as before.

Callers: :mod:`async_ckpt.device_copy` on the training thread, inside ``save_async``, right
after it queued a group's device-to-host copies on the side stream. The first use on each
device runs a self-test against the host crc32c (a few KiB, on a private stream, synchronised
only with itself); a module that fails it, or any later launch error, turns the device path
off for the process with one warning, and the save goes on with host checksums.

``ASYNC_CKPT_DEVICE_CRC``: ``0`` turns the device path off; ``check`` keeps it on and makes the
writer recompute every device word on the host and fail the save on a mismatch (what the
GPU check script runs).
"""

from __future__ import annotations

import glob
import os
import threading
import warnings
from typing import Optional

import numpy as np

ENV = "ASYNC_CKPT_DEVICE_CRC"
SEGMENT = 16 << 10   # bytes per GPU thread; a multiple of 8

_lock = threading.Lock()
_load_error: Optional[str] = None
_loaded = False
_device_ok: dict[int, bool] = {}


def mode() -> str:
    """``"off"``, ``"on"`` or ``"check"``, from ``ASYNC_CKPT_DEVICE_CRC``."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "off", "no", "false"):
        return "off"
    return "check" if value == "check" else "on"


def module_path() -> Optional[str]:
    """The built CUDA module (``async_ckpt/_cuda_crc*.so``), or None when the build skipped it."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(package, "_cuda_crc*.so")))
    return found[0] if found else None


def load() -> Optional[str]:
    """Load the module once; None when loaded, else why it is unavailable."""
    global _loaded, _load_error
    with _lock:
        if _loaded or _load_error is not None:
            return _load_error
        from .. import native
        path = module_path()
        if path is None:
            _load_error = "the CUDA checksum module was not built (no nvcc at install time)"
            return _load_error
        try:
            native._native.cuda_crc_load(path)
            _loaded = True
        except Exception as exc:  # CheckpointError: dlopen failed or ABI mismatch
            _load_error = str(exc)
        return _load_error


def pieces_array(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    """(n, 4) uint64 rows [device address, length, offset in chunk, chunk index]."""
    return np.asarray(rows, dtype=np.uint64).reshape(-1, 4)


def launch(pieces: np.ndarray, chunk_lens: list[int], stream, device: int):
    """Queue the checksums of chunks built from ``pieces`` on ``stream`` (never waits for it).

    Returns ``(words, workspace)``: two pinned tensors, ``words`` holding one int32 per chunk
    once the stream gets past this point. Both must stay referenced until then (torch's
    pinned allocator does not know this stream uses them).
    """
    import torch
    from .. import native
    n = len(chunk_lens)
    words = torch.empty(n, dtype=torch.int32, pin_memory=True)
    workspace = torch.empty(native._native.cuda_crc_workspace_bytes(len(pieces), n), dtype=torch.uint8,
                            pin_memory=True)
    native._native.cuda_crc32c_pieces(pieces, chunk_lens, words.numpy(), workspace.numpy(), SEGMENT,
                                      stream.cuda_stream, device)
    return words, workspace


def available(device: int) -> bool:
    """True when chunk checksums may be computed on CUDA device ``device``."""
    if mode() == "off":
        return False
    ok = _device_ok.get(device)
    if ok is not None:
        return ok
    reason = load() or _self_test(device)
    with _lock:
        if device not in _device_ok:
            _device_ok[device] = reason is None
            # A module that was never built is the documented default, not worth a warning;
            # one that was built but fails here is.
            if reason is not None and module_path() is not None:
                warnings.warn(f"async_ckpt: checksums stay on the host for cuda:{device}: {reason}",
                              RuntimeWarning, stacklevel=3)
    return _device_ok[device]


def disable(device: int, reason: str) -> None:
    """Turn the device path off for ``device`` after a failed launch (warns once)."""
    with _lock:
        already = _device_ok.get(device) is False
        _device_ok[device] = False
    if not already:
        warnings.warn(f"async_ckpt: checksums go back to the host for cuda:{device}: {reason}",
                      RuntimeWarning, stacklevel=3)


def _self_test(device: int) -> Optional[str]:
    """Compare the kernel with the host on ragged pieces with a zero gap; None when equal."""
    import torch
    from .. import native
    try:
        gen = torch.Generator().manual_seed(1234)
        host = torch.randint(0, 256, (3 * SEGMENT + 4099,), dtype=torch.uint8, generator=gen)
        cut = SEGMENT + 13                       # piece 2 starts unaligned, after a 3-byte gap
        staged = host.clone()
        staged[cut:cut + 3] = 0
        chunk_lens = [len(host) - 1000, 1000]
        rows = [(0, cut, 0, 0), (cut + 3, chunk_lens[0] - cut - 3, cut + 3, 0), (chunk_lens[0], 1000, 0, 1)]
        expected = [native.crc32c(staged[:chunk_lens[0]].numpy()), native.crc32c(staged[chunk_lens[0]:].numpy())]
        # A private stream, synchronised alone: the training stream's queued work is not waited for.
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device=device)
            with torch.cuda.stream(stream):
                on_device = host.to(f"cuda:{device}")
                base = on_device.data_ptr()
                pieces = pieces_array([(base + a, n, off, c) for a, n, off, c in rows])
                out, _ = launch(pieces, chunk_lens, stream, device)
            stream.synchronize()
        got = [int(w) for w in out.numpy().view(np.uint32)]
        if got != expected:
            return f"self-test mismatch: device {got} vs host {expected}"
        return None
    except Exception as exc:
        return f"self-test failed: {exc}"
