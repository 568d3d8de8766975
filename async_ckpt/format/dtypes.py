"""Array dtypes of the format (docs/FORMAT.md section 4): names, item sizes, torch/numpy objects.

Shared by the manifest validator, the typed tree, planning, snapshots and restore. The item
sizes are static so that readers without torch can size payloads.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import numpy as np

from ..errors import FormatError

# torch as far as this process uses it: bound on first use once the process has imported
# torch (restore, saving and the tree codec do), never imported here, so verify's CRC pass,
# verdicts and --json run without torch (a value can only be a tensor once torch is loaded).
torch: Any = None

__all__ = ["TORCH_DTYPES", "dtype_name", "parse_array_dtype"]

# Every torch dtype an array payload may have, with its itemsize. Static so that
# readers without torch can size payloads; quantized, bits* and sub-byte dtypes
# are deliberately absent (no stable byte layout).
_TORCH_ARRAY_ITEMSIZE = {
    "torch.bool": 1,
    "torch.uint8": 1, "torch.int8": 1,
    "torch.uint16": 2, "torch.int16": 2,
    "torch.uint32": 4, "torch.int32": 4,
    "torch.uint64": 8, "torch.int64": 8,
    "torch.float16": 2, "torch.bfloat16": 2, "torch.float32": 4, "torch.float64": 8,
    "torch.complex32": 4, "torch.complex64": 8, "torch.complex128": 16,
    "torch.float8_e4m3fn": 1, "torch.float8_e4m3fnuz": 1,
    "torch.float8_e5m2": 1, "torch.float8_e5m2fnuz": 1,
    "torch.float8_e8m0fnu": 1, "torch.float4_e2m1fn_x2": 1,
}

TORCH_DTYPES: dict[str, Any] = {}       # canonical name -> torch.dtype (all of them, for torch.dtype nodes)
TORCH_ARRAY_NAMES: dict[Any, str] = {}  # torch.dtype -> name, array-capable dtypes only


def bind_torch() -> Any:
    """torch if this process has imported it (filling the dtype tables, in place, once),
    else None. Never imports torch."""
    global torch
    if torch is None:
        t = sys.modules.get("torch")
        if t is None or not hasattr(t, "dtype") or not hasattr(t, "nn"):
            return None          # not imported (or still importing)
        for attr in dir(t):
            obj = getattr(t, attr)
            if isinstance(obj, t.dtype) and str(obj) == "torch." + attr:
                TORCH_DTYPES[str(obj)] = obj
        for name in _TORCH_ARRAY_ITEMSIZE:
            if name in TORCH_DTYPES:
                TORCH_ARRAY_NAMES[TORCH_DTYPES[name]] = name
        torch = t
    return torch

_NP_DTYPE_RE = re.compile(r"[<|][biufc][0-9]{1,2}\Z")
NP_KINDS = frozenset("biufc")


def parse_array_dtype(dtype: str) -> tuple[str, Any, int]:
    """Parse an ``arrays[i].dtype`` string into ``(kind, dtype_obj, itemsize)``.

    ``kind`` is ``"torch"`` (``dtype_obj`` a ``torch.dtype``, or ``None`` when torch
    is not installed) or ``"numpy"`` (``dtype_obj`` a ``numpy.dtype``). Only the
    canonical spelling is accepted (``torch.float32``, not ``torch.float``; ``<f4``,
    not ``float32``); numpy dtypes must be bool/int/uint/float/complex and
    little-endian. Anything else raises ``FormatError``.
    """
    if type(dtype) is not str:
        raise FormatError(f"array dtype must be a string, got {type(dtype).__name__}")
    if dtype.startswith("torch."):
        itemsize = _TORCH_ARRAY_ITEMSIZE.get(dtype)
        if itemsize is None:
            raise FormatError(f"unsupported array dtype {dtype!r}")
        if bind_torch() is None:
            return "torch", None, itemsize
        obj = TORCH_DTYPES.get(dtype)
        if obj is None:
            raise FormatError(f"array dtype {dtype!r} is not available in torch {torch.__version__}")
        return "torch", obj, itemsize
    if not _NP_DTYPE_RE.match(dtype):
        raise FormatError(f"unsupported array dtype {dtype!r}")
    try:
        obj = np.dtype(dtype)
    except (TypeError, ValueError):
        raise FormatError(f"unsupported array dtype {dtype!r}") from None
    if obj.str != dtype or obj.kind not in NP_KINDS or obj.itemsize == 0:
        raise FormatError(f"unsupported array dtype {dtype!r}")
    return "numpy", obj, obj.itemsize


def _np_dtype_name(dt: np.dtype) -> str | None:
    if dt.kind not in NP_KINDS or dt.byteorder == ">" or dt.fields is not None:
        return None
    return dt.str


def dtype_name(t: Any) -> str:
    """The ``arrays[i].dtype`` string for a tensor, ndarray, ``torch.dtype`` or ``numpy.dtype``.

    Inverse of :func:`parse_array_dtype`. Raises ``TypeError`` for dtypes that cannot
    be an array payload (quantized, object, big-endian, ...).
    """
    if bind_torch() is not None:
        if isinstance(t, torch.Tensor):
            t = t.dtype
        if isinstance(t, torch.dtype):
            name = TORCH_ARRAY_NAMES.get(t)
            if name is None:
                raise TypeError(f"{t} cannot be stored as an array")
            return name
    if isinstance(t, np.ndarray):
        t = t.dtype
    if isinstance(t, np.dtype):
        name = _np_dtype_name(t)
        if name is None:
            raise TypeError(f"numpy dtype {t.str!r} cannot be stored as an array "
                            "(only little-endian bool/int/uint/float/complex)")
        return name
    raise TypeError(f"dtype_name() takes a tensor, ndarray or dtype, not {type(t).__name__}")
