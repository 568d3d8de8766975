"""Typed, pickle-free codec between Python state trees and JSON nodes (docs/FORMAT.md §5).

Who calls what, on which thread:

1. The snapshot/planning code calls :func:`encode_table` on the **training thread**,
   before the fence is released. It gets the JSON-able ``tree`` for the manifest and
   an :class:`ArrayTable` (one column per field; :func:`encode_tree` returns the same
   as a list of :class:`ArrayRef`) whose values are the caller's original tensors or
   ndarrays (not copied): the snapshot copies those into staging buffers itself.
   Encoding never touches storage and never copies tensor data (the two exceptions:
   tensors carrying a lazy conj/neg bit and big-endian ndarrays are materialised).
2. Manifest validation (layout code, ``verify``) calls :func:`parse_array_dtype` on
   every ``arrays[i].dtype`` and :func:`walk_arrays` to learn which indices the tree
   references; both raise :class:`~async_ckpt.errors.FormatError` on malformed input.
3. Restore / ``load`` calls :func:`decode_tree` on the **caller's thread** after the
   payloads are materialised, one object per array index. Decoding treats the node as
   untrusted input: it never evaluates, imports or unpickles anything, and every
   failure is a ``FormatError`` naming the path.

Encoding rejects what it cannot represent with ``TypeError`` naming the path, e.g.
``optimizer.param_groups[0].foo`` or ``model["weird key"]``.

Stateful objects (anything with ``state_dict()``/``load_state_dict()``) are encoded
as their state dict and decode to the plain decoded state dict: putting it back
into the object is the restore code's job. Generators decode to new, usable
generators. ``dict``/``list``/``tuple`` subclasses (``OrderedDict``, named tuples)
decode as the base type. torch is optional: without it this module still imports
and validates nodes; tensor nodes then fail to decode.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence, Union

import numpy as np

from ..errors import FormatError
from .dtypes import NP_KINDS, TORCH_ARRAY_NAMES, TORCH_DTYPES, bind_torch, dtype_name, parse_array_dtype

# torch is bound on first use once the process has imported it (see dtypes.bind_torch):
# validating a tree (verify) never imports torch; encoding and decoding tensors happen in
# processes that use torch anyway.
torch: Any = None

__all__ = [
    "ArrayRef",
    "MAX_DEPTH",
    "Node",
    "decode_tree",
    "dtype_name",
    "encode_tree",
    "is_stateful",
    "parse_array_dtype",
    "walk_array_refs",
    "walk_arrays",
]

Node = Union[None, bool, int, float, str, dict, list]
MAX_DEPTH = 256

_STRIDED: Any = None
_TENSOR_TYPES: frozenset = frozenset()


def _bind() -> None:
    """Bind torch (and the tensor types) once the process has imported it."""
    global torch, _STRIDED, _TENSOR_TYPES
    if torch is None:
        t = bind_torch()
        if t is not None:
            _STRIDED, _TENSOR_TYPES = t.strided, frozenset({t.Tensor, t.nn.Parameter})
            torch = t


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True, eq=False)
class ArrayRef:
    """One array payload to write: ``value``'s bytes, C-contiguous, little-endian.

    ``value`` is the caller's original tensor/ndarray (any device, possibly
    non-contiguous): making it contiguous and copying it out is the snapshot's job.
    """

    value: Any
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    # A shard of a distributed tensor (DTensor): the logical array's shape and where this
    # piece starts in it (docs/FORMAT.md section 6). None for an ordinary array.
    global_shape: Any = None
    global_offset: Any = None


def _array_ref(value: Any, dtype: str, shape: tuple[int, ...], nbytes: int,
               _new: Any = object.__new__) -> ArrayRef:
    # ArrayRef(...) costs ~1 us through the frozen __setattr__ guard; encode makes one
    # per tensor, so fill the instance dict directly (same result, ~3x faster).
    ref = _new(ArrayRef)
    d = ref.__dict__
    d["value"] = value
    d["dtype"] = dtype
    d["shape"] = shape
    d["nbytes"] = nbytes
    return ref


def is_dtensor(t: Any) -> bool:
    """A torch.distributed DTensor (checked by type name: no import of torch.distributed)."""
    cls = type(t)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def is_stateful(obj: Any) -> bool:
    """True for objects with callable ``state_dict`` and ``load_state_dict`` methods.

    Tensors, dicts and classes (whose unbound methods would match) are not stateful.
    """
    _bind()
    if isinstance(obj, (dict, type)) or (torch is not None and isinstance(obj, torch.Tensor)):
        return False
    try:
        return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
    except Exception:  # a property raising on access: not something we can snapshot
        return False


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class _PathError(Exception):
    """Internal: carries a message up the recursion, collecting path components."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.parts: list[Any] = []  # innermost first; str = dict key, int = index
        self.key_error = False      # raised for a dict key: the dict itself is the path


def _key_part(key: Any) -> str:
    if isinstance(key, str):
        return f".{key}" if key.isidentifier() else f"[{_quote(key)}]"
    return f"[{key}]"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _join_path(base: str, parts: list[Any]) -> str:
    out = base
    for p in reversed(parts):
        part = _key_part(p)
        if not out and part.startswith("."):
            part = part[1:]
        out += part
    return out or "<root>"


# --------------------------------------------------------------------------- encode

_NONFINITE = {"nan", "inf", "-inf"}
_TORCH_DTYPE_NAME = re.compile(r"torch\.[a-z][a-z0-9_]{0,31}")
_GENERATOR_NAMES = frozenset({"PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"})
_COMPLEX_NAMES = frozenset({"torch.complex32", "torch.complex64", "torch.complex128"})


class _Encoder:
    """One walk of a state tree (``plan_save`` → :func:`encode_table`, training thread).

    Arrays are collected column by column into an :class:`ArrayTable`, not as one object
    each: a save then leaves no per-array objects behind for the cyclic collector to promote
    (with 20,000 tensors those triggered a full collection of the caller's heap about
    every other save). Ordinary tensors in CPU memory, nearly every leaf of a state, are
    encoded by :meth:`encode_values` with as few torch calls as it can make.
    """

    __slots__ = ("add_dtype", "add_host", "add_nbytes", "add_shape", "add_value", "by_id", "by_key", "by_ptr",
                 "devices", "keep", "kinds", "max_depth", "notify_at", "observer", "table")

    def __init__(self, max_depth: int, observer: Optional[ArrayObserver] = None) -> None:
        self.table = t = ArrayTable()
        self.add_value, self.add_dtype, self.add_shape = t.values.append, t.dtypes.append, t.shapes.append
        self.add_nbytes, self.add_host = t.nbytes.append, t.host.append
        self.by_id: dict[int, tuple[int, str]] = {}   # id(tensor/ndarray) -> (index, device)
        self.kinds = self.table.scalar_kinds
        self.by_key: dict[tuple, int] = {}             # storage view -> index (tied tensors)
        # data_ptr of a CPU tensor -> index of the first array seen there, or -1 once every
        # array at that address is in by_key: stride() and the full key wait for a collision.
        self.by_ptr: dict[int, int] = {}
        self.keep: list[Any] = []                      # keeps encoded objects alive: ids stay unique
        self.devices: dict[Any, str] = {}
        self.max_depth = max_depth
        self.observer = observer
        # The index of the array after which the observer is next told (checked on the common
        # path only, one comparison per tensor).
        self.notify_at = observer.every - 1 if observer is not None else sys.maxsize

    def enc(self, obj: Any, depth: int) -> Node:
        t = type(obj)
        if t is str or obj is None:
            return obj
        if t is int or t is bool:
            self.kinds.append(t)
            return obj
        if t is float:
            return self.float_leaf(obj)
        if t is dict or t is list or t is tuple:
            return self.container(obj, depth)
        if torch is not None and isinstance(obj, torch.Tensor):
            return self.tensor(obj)
        return self.other(obj, depth)

    def container(self, obj: Any, depth: int) -> Node:
        if depth >= self.max_depth:
            raise _PathError(f"tree nests deeper than {self.max_depth} levels (a cycle?)")
        d = depth + 1
        values: list[Node] = []
        if isinstance(obj, dict):
            try:
                keys = [k if type(k) is str or type(k) is int else _normalise_key(k) for k in obj]
            except _PathError as e:
                e.key_error = False      # the path is this dict's, not the bad key's
                raise
            try:
                self.encode_values(obj.values(), d, values)
            except _PathError as e:
                e.parts.append(keys[len(values)])
                raise
            return {"$": "dict", "keys": keys, "values": values}
        try:
            self.encode_values(obj, d, values)
        except _PathError as e:
            e.parts.append(len(values))
            raise
        return {"$": "tuple" if isinstance(obj, tuple) else "list", "v": values}

    def encode_values(self, objs: Iterable[Any], depth: int, out: list[Node]) -> None:
        """Append the node of each of ``objs`` (a container's values, at ``depth``) to ``out``.

        Plain tensors (Tensor, Parameter) in their common case are encoded right here: in
        CPU memory, dense, no lazy conj/neg bit, a dtype the format holds, bytes at an
        address no array had yet. State dicts are mostly such tensors, and with 20,000 of
        them every lookup and call per tensor shows: inlined, with the table's columns in
        locals, a dict of 20,000 small tensors encodes in 38 ms instead of 43 (the attribute
        reads alone take 19). Everything else (errors, materialisation, ties, other devices,
        containers) goes through :meth:`enc` and :meth:`new_tensor`.
        """
        add = out.append
        enc = self.enc
        by_ptr = self.by_ptr
        arrays = self.table.values
        add_value, add_dtype, add_shape = self.add_value, self.add_dtype, self.add_shape
        add_nbytes, add_host = self.add_nbytes, self.add_host
        names, tensor_types, strided, complex_names = TORCH_ARRAY_NAMES, _TENSOR_TYPES, _STRIDED, _COMPLEX_NAMES
        for t in objs:
            if type(t) not in tensor_types:
                add(enc(t, depth))
                continue
            name = names.get(t.dtype)
            # Only complex tensors can carry the conj bit (torch asserts it): is_conj() is
            # asked of those alone.
            if (t.is_cpu and t.layout is strided and name is not None and not t.is_neg()
                    and (name not in complex_names or not t.is_conj())):
                try:
                    nbytes = t.nbytes
                    ptr = t.data_ptr()
                    shape = tuple(t.shape)
                except RuntimeError:  # nested tensors, tensors without storage
                    nbytes = 0
                if nbytes and ptr not in by_ptr:
                    # The table keeps t alive, so no by_id/keep entry: the same tensor met
                    # again collides on its address and is tied through its full key by new_tensor.
                    idx = by_ptr[ptr] = len(arrays)
                    add_value(t)
                    add_dtype(name)
                    add_shape(shape)
                    add_nbytes(nbytes)
                    add_host(ptr if t.is_contiguous() else -1)
                    if idx >= self.notify_at:
                        self.notify_at = idx + self.observer.every
                        self.observer.arrays_added(self.table)
                    add({"$": "tensor", "array": idx, "device": "cpu", "requires_grad": t.requires_grad})
                    continue
            idx, dev = self.new_tensor(t)
            add({"$": "tensor", "array": idx, "device": dev, "requires_grad": t.requires_grad})

    def tensor(self, t: Any) -> Node:
        if type(t) in _TENSOR_TYPES:
            out: list[Node] = []
            self.encode_values((t,), 0, out)
            return out[0]
        idx, dev = self.new_tensor(t) if not is_dtensor(t) else self.shard(t)
        return {"$": "tensor", "array": idx, "device": dev, "requires_grad": t.requires_grad}

    def shard(self, t: Any) -> tuple[int, str]:
        """A DTensor: its local shard is the array, with the global shape and offset."""
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        hit = self.by_id.get(id(t))
        if hit is not None:
            return hit
        local = t.to_local()
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        idx, dev = self.new_tensor(local)
        self.table.globals[idx] = (tuple(int(x) for x in t.shape), tuple(int(x) for x in offset))
        self.keep.append(t)
        self.by_id[id(t)] = (idx, dev)
        return idx, dev

    def tied(self, key: tuple) -> int | None:
        """The array already encoded for the view ``key`` (data_ptr first), if any."""
        first = self.by_ptr.get(key[0])
        if first is not None and first >= 0:
            # The first array at this address enters by_key now (its value is that tensor).
            self.by_ptr[key[0]] = -1
            v = self.table.values[first]
            self.by_key.setdefault((key[0], v.dtype, tuple(v.shape), v.stride(), v.device), first)
        return self.by_key.get(key)

    def new_tensor(self, t: Any) -> tuple[int, str]:
        """Any tensor encode_values does not take: other devices, subclasses, the unusual."""
        hit = self.by_id.get(id(t))
        if hit is not None:
            return hit
        dtype = t.dtype
        name = TORCH_ARRAY_NAMES.get(dtype)
        if name is None:
            raise _PathError(f"tensor dtype {dtype} is not supported")
        dev = t.device
        dev_s = self.devices.get(dev)
        if dev_s is None:
            if dev.type == "meta":
                raise _PathError("meta tensors have no data to save")
            dev_s = self.devices[dev] = str(dev)
        if t.layout is not _STRIDED:
            raise _PathError(f"tensor with layout {t.layout} cannot be saved (dense tensors only)")
        try:
            shape = tuple(t.shape)
            nbytes = t.nbytes
            idx = key = None
            lazy = t.is_conj() or t.is_neg()
            if nbytes:  # empty tensors are tied by identity only (their data_ptr may be 0)
                key = (t.data_ptr(), dtype, shape, t.stride(), dev)
                if lazy:
                    key += (t.is_conj(), t.is_neg())
                idx = self.tied(key)
        except RuntimeError as exc:  # nested tensors, tensors without storage
            raise _PathError(f"tensor cannot be saved: {exc}") from None
        if idx is None:
            idx = self.new_array(t, name, shape, nbytes, key, lazy, dev_s == "cpu")
        self.keep.append(t)
        hit = (idx, dev_s)
        self.by_id[id(t)] = hit
        return hit

    def new_array(self, t: Any, name: str, shape: tuple[int, ...], nbytes: int, key: tuple | None,
                  lazy: bool, on_host: bool) -> int:
        """Add tensor ``t`` (not tied to an earlier array) to the table."""
        # lazy conj/neg bits: the raw memory is not the value, materialise it
        value = t.resolve_conj().resolve_neg() if lazy else t
        idx = self.table.add(value, name, shape, nbytes, -1)
        if key is not None:
            self.by_key[key] = idx
            if on_host and not lazy:
                self.by_ptr.setdefault(key[0], idx)   # a tensor met later at this address looks here
                if t.is_contiguous():
                    self.table.host[idx] = key[0]
        return idx

    def ndarray(self, a: np.ndarray) -> Node:
        hit = self.by_id.get(id(a))
        if hit is not None:
            return {"$": "ndarray", "array": hit[0]}
        if isinstance(a, np.ma.MaskedArray):
            raise _PathError("numpy masked arrays are not supported")
        dt = a.dtype
        if dt.kind not in NP_KINDS or dt.fields is not None:
            raise _PathError(f"ndarray of dtype {dt} is not supported "
                             "(only bool/int/uint/float/complex)")
        value = a
        if dt.byteorder == ">":
            dt = dt.newbyteorder("<")
            value = a.astype(dt)
        name = dt.str
        shape = tuple(int(s) for s in a.shape)
        idx = None
        key = None
        if a.size:
            key = ("n", a.__array_interface__["data"][0], name, shape, a.strides)
            idx = self.by_key.get(key)
        if idx is None:
            host = value.ctypes.data if a.size and value.flags.c_contiguous else -1
            idx = self.table.add(value, name, shape, int(a.size) * dt.itemsize, host)
            if key is not None:
                self.by_key[key] = idx
        self.keep.append(a)
        self.by_id[id(a)] = (idx, "cpu")
        return {"$": "ndarray", "array": idx}

    def other(self, obj: Any, depth: int) -> Node:
        if isinstance(obj, np.generic) and obj.dtype.kind in NP_KINDS:
            return {"$": "npscalar", "dtype": obj.dtype.newbyteorder("<").str,
                    "b64": base64.b64encode(obj.astype(obj.dtype.newbyteorder("<")).tobytes()).decode("ascii")}
        if isinstance(obj, np.ndarray):
            return self.ndarray(obj)
        if isinstance(obj, (bytes, bytearray)):
            return {"$": "bytes", "b64": base64.b64encode(obj).decode("ascii")}
        if torch is not None:
            if isinstance(obj, torch.Size):
                return {"$": "torch.Size", "v": [int(s) for s in obj]}
            if isinstance(obj, torch.dtype):
                name = str(obj)
                if name not in TORCH_DTYPES:
                    raise _PathError(f"unknown torch dtype {obj}")
                return {"$": "torch.dtype", "v": name}
            if isinstance(obj, torch.Generator):
                if obj.device.type != "cpu":
                    raise _PathError(f"torch.Generator on {obj.device} is not supported "
                                     "(save its get_state() tensor instead)")
                return {"$": "torch.generator", "v": self.wrapped(obj.get_state(), depth)}
        if isinstance(obj, (dict, list, tuple)):
            return self.container(obj, depth)
        if isinstance(obj, float):  # float subclasses (np.float64 is handled above)
            return self.float_leaf(float(obj))
        if isinstance(obj, str):
            return str.__str__(obj)
        if isinstance(obj, int):  # bool is handled by the fast path; IntEnum and friends
            self.kinds.append(int)
            return int.__index__(obj)
        if isinstance(obj, np.random.Generator):
            return {"$": "np.generator", "v": self.wrapped(obj.bit_generator.state, depth)}
        if isinstance(obj, np.random.RandomState):
            return {"$": "np.randomstate", "v": self.wrapped(obj.get_state(legacy=True), depth)}
        if is_stateful(obj):
            return {"$": "state", "type": _qualname(obj), "v": self.wrapped(obj.state_dict(), depth)}
        raise _PathError(f"cannot save a value of type {_qualname(obj)} "
                         "(no state_dict()/load_state_dict(); see docs/FORMAT.md section 5)")

    def float_leaf(self, x: float) -> Node:
        if not math.isfinite(x):
            return _float_node(x)
        self.kinds.append(float if x or math.copysign(1.0, x) > 0 else _NEGATIVE_ZERO)
        return x

    def wrapped(self, value: Any, depth: int) -> Node:
        if depth >= self.max_depth:
            raise _PathError(f"tree nests deeper than {self.max_depth} levels (a cycle?)")
        return self.enc(value, depth + 1)


def _normalise_key(k: Any) -> str | int:
    if isinstance(k, str):
        return str.__str__(k)
    if isinstance(k, int) and not isinstance(k, bool):
        return int.__index__(k)
    e = _PathError(f"dict key {k!r} of type {type(k).__name__} is not supported "
                   "(keys must be str or int)")
    e.key_error = True
    raise e


_NEGATIVE_ZERO = "-0.0"


def _float_node(x: float) -> dict:
    return {"$": "float", "v": "nan" if x != x else ("inf" if x > 0 else "-inf")}


class ArrayTable:
    """The arrays of an encoded tree, one list per field (:func:`encode_table` returns it).

    ``table[i]`` builds the :class:`ArrayRef` of array ``i`` on access; hot loops read the
    columns. ``host[i]`` is the address of ``values[i]``'s bytes when they are exactly its
    contiguous host memory (a plain CPU tensor or a C-contiguous ndarray), else -1. It was
    read while encoding, on the training thread, and holds only until the caller's code
    runs again: the snapshot copies from it before ``save_async`` returns and reads the
    address afresh for anything it copies later (see snapshot.copy_into). Read-only once
    encoding is done; any thread may read it.
    """

    __slots__ = ("dtypes", "globals", "host", "nbytes", "scalar_kinds", "shapes", "values")

    def __init__(self) -> None:
        self.values: list[Any] = []       # the caller's tensor/ndarray (a materialised copy for lazy bits)
        self.dtypes: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.nbytes: list[int] = []
        self.host: list[int] = []
        # DTensor shards: index -> (global shape, global offset)
        self.globals: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        # The type of every number the tree holds, in encoding order (-0.0 marked apart):
        # two trees that compare equal (==) and have equal kinds serialise to the same JSON,
        # where == alone confuses True with 1, 1 with 1.0 and 0.0 with -0.0.
        self.scalar_kinds: list[Any] = []

    def add(self, value: Any, dtype: str, shape: tuple[int, ...], nbytes: int, host: int) -> int:
        idx = len(self.values)
        self.values.append(value)
        self.dtypes.append(dtype)
        self.shapes.append(shape)
        self.nbytes.append(nbytes)
        self.host.append(host)
        return idx

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> ArrayRef:
        i = range(len(self.values))[i]     # IndexError, negative indices
        ref = _array_ref(self.values[i], self.dtypes[i], self.shapes[i], self.nbytes[i])
        shard = self.globals.get(i)
        if shard is not None:
            d = ref.__dict__
            d["global_shape"], d["global_offset"] = shard
        return ref

    def __iter__(self) -> Iterator[ArrayRef]:
        if self.globals:
            return map(self.__getitem__, range(len(self.values)))
        return map(_array_ref, self.values, self.dtypes, self.shapes, self.nbytes)


class ArrayObserver(Protocol):
    """Told while encoding runs (training thread) that the table has grown: after about
    every ``every`` arrays, ``arrays_added(table)``, whose rows so far are final. Lets a
    snapshot start copying before the whole tree is encoded."""

    every: int

    def arrays_added(self, table: ArrayTable) -> None: ...


def encode_table(obj: Any, *, path: str = "", max_depth: int = MAX_DEPTH,
                 observer: Optional[ArrayObserver] = None) -> tuple[Node, ArrayTable]:
    """:func:`encode_tree` with the arrays as an :class:`ArrayTable` (what planning uses)."""
    _bind()
    enc = _Encoder(max_depth, observer)
    try:
        node = enc.enc(obj, 0)
    except _PathError as e:
        raise TypeError(f"{_join_path(path, e.parts)}: {e.message}") from None
    except RecursionError:
        raise TypeError(f"{path or '<root>'}: tree nests too deeply for the Python stack") from None
    return node, enc.table


def encode_tree(obj: Any, *, path: str = "", max_depth: int = MAX_DEPTH) -> tuple[Node, list[ArrayRef]]:
    """Encode ``obj`` into a JSON-able node and the array payloads it references.

    The node is ready for ``json.dumps(node, allow_nan=False)``. ``arrays[i]``
    describes the payload referenced by ``"array": i``; tensors that are the same
    object, or views of the same memory with equal shape, stride and dtype, share
    one index. ``path`` prefixes error messages. Raises ``TypeError`` naming the
    path for values the format cannot represent and for nesting deeper than
    ``max_depth`` containers.
    """
    node, table = encode_table(obj, path=path, max_depth=max_depth)
    return node, list(table)


# --------------------------------------------------------------------------- decode

_FIELDS = {
    "float": frozenset({"$", "v"}),
    "dict": frozenset({"$", "keys", "values"}),
    "list": frozenset({"$", "v"}),
    "tuple": frozenset({"$", "v"}),
    "bytes": frozenset({"$", "b64"}),
    "tensor": frozenset({"$", "array", "device", "requires_grad"}),
    "ndarray": frozenset({"$", "array"}),
    "npscalar": frozenset({"$", "dtype", "b64"}),
    "torch.dtype": frozenset({"$", "v"}),
    "torch.Size": frozenset({"$", "v"}),
    "state": frozenset({"$", "type", "v"}),
    "np.generator": frozenset({"$", "v"}),
    "torch.generator": frozenset({"$", "v"}),
    "np.randomstate": frozenset({"$", "v"}),
}
# what numpy/torch raise for a malformed generator state (never anything that ran code)
_STATE_ERRORS = (ValueError, TypeError, KeyError, OverflowError, IndexError, RuntimeError, AttributeError)
_CONTAINER_TAGS = frozenset({"dict", "list", "tuple", "state", "np.generator",
                             "torch.generator", "np.randomstate"})


def _b64(s: Any, what: str) -> bytes:
    if type(s) is not str:
        raise _PathError(f"{what}.b64 must be a string")
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _PathError(f"{what}.b64 is not valid base64: {exc}") from None


class _Decoder:
    __slots__ = ("arrays", "n_arrays", "max_depth", "seen")

    def __init__(self, arrays: Sequence[Any] | None, max_depth: int) -> None:
        self.arrays = arrays               # None: validate only, collect references in `seen`
        self.n_arrays = len(arrays) if arrays is not None else None
        self.max_depth = max_depth
        self.seen: list[tuple[int, str]] = []   # (array index, "tensor" | "ndarray" | "generator")

    def dec(self, node: Any, depth: int) -> Any:
        t = type(node)
        if t is str or t is int or t is bool or node is None:
            return node
        if t is float:
            if not math.isfinite(node):
                raise _PathError(f"non-finite number {node!r} (use a float node)")
            return node
        if t is not dict:
            raise _PathError(f"a node must be null, bool, number, string or object, not {t.__name__}")
        tag = node.get("$")
        fields = _FIELDS.get(tag) if type(tag) is str else None
        if fields is None:
            raise _PathError(f"unknown node tag {tag!r}" if "$" in node else "object node without a '$' tag")
        if node.keys() != fields:
            extra = sorted(map(str, node.keys() - fields))
            missing = sorted(fields - node.keys())
            raise _PathError(f"{tag} node: missing fields {missing}, unexpected fields {extra}")
        if tag in _CONTAINER_TAGS:
            if depth >= self.max_depth:
                raise _PathError(f"tree nests deeper than {self.max_depth} levels")
            return getattr(self, "tag_" + tag.replace(".", "_"))(node, depth + 1)
        return getattr(self, "tag_" + tag.replace(".", "_"))(node)

    # containers (get the child depth) ---------------------------------------------

    def tag_dict(self, node: dict, d: int) -> dict:
        keys, values = node["keys"], node["values"]
        if type(keys) is not list or type(values) is not list:
            raise _PathError("dict node: keys and values must be arrays")
        if len(keys) != len(values):
            raise _PathError(f"dict node: {len(keys)} keys but {len(values)} values")
        out: dict = {}
        dec = self.dec
        tensor = self.tag_tensor
        tensor_fields = _FIELDS["tensor"]
        for k, v in zip(keys, values):
            tk = type(k)
            if tk is not str and tk is not int:
                raise _PathError(f"dict key {k!r} must be a string or an integer")
            if k in out:
                raise _PathError(f"duplicate dict key {k!r}")
            try:
                # State dicts are mostly tensors: a well-formed tensor node skips the generic
                # dispatch (same checks, one Python call less per leaf).
                if type(v) is dict and v.get("$") == "tensor" and v.keys() == tensor_fields:
                    out[k] = tensor(v)
                else:
                    out[k] = dec(v, d)
            except _PathError as e:
                e.parts.append(k)
                raise
        return out

    def _seq(self, node: dict, d: int) -> list:
        items = node["v"]
        if type(items) is not list:
            raise _PathError(f"{node['$']} node: v must be an array")
        out = []
        dec = self.dec
        i = 0
        try:
            for i, v in enumerate(items):
                out.append(dec(v, d))
        except _PathError as e:
            e.parts.append(i)
            raise
        return out

    def tag_list(self, node: dict, d: int) -> list:
        return self._seq(node, d)

    def tag_tuple(self, node: dict, d: int) -> tuple:
        return tuple(self._seq(node, d))

    def tag_state(self, node: dict, d: int) -> Any:
        if type(node["type"]) is not str:
            raise _PathError("state node: type must be a string")
        return self.dec(node["v"], d)

    def tag_np_generator(self, node: dict, d: int) -> Any:
        state = self.dec(node["v"], d)
        name = state.get("bit_generator") if type(state) is dict else None
        if type(name) is not str or name not in _GENERATOR_NAMES:
            raise _PathError("np.generator node: v must be a bit generator state dict naming one of "
                             f"{sorted(_GENERATOR_NAMES)}")
        if self.arrays is None:
            return None
        bitgen = getattr(np.random, name)()
        try:
            bitgen.state = state
        except _STATE_ERRORS as exc:
            raise _PathError(f"np.generator node: invalid state: {exc}") from None
        return np.random.Generator(bitgen)

    def tag_np_randomstate(self, node: dict, d: int) -> Any:
        state = self.dec(node["v"], d)
        if type(state) is not tuple or not state or type(state[0]) is not str or state[0] != "MT19937":
            raise _PathError("np.randomstate node: v must be a tuple ('MT19937', key, pos, ...)")
        if self.arrays is None:
            return None
        rs = np.random.RandomState()
        try:
            rs.set_state(state)
        except _STATE_ERRORS as exc:
            raise _PathError(f"np.randomstate node: invalid state: {exc}") from None
        return rs

    def tag_torch_generator(self, node: dict, d: int) -> Any:
        state = self.dec(node["v"], d)
        if self.arrays is None:
            if not (isinstance(node["v"], dict) and node["v"].get("$") == "tensor"):
                raise _PathError("torch.generator node: v must be a tensor node")
            self.seen[-1] = (self.seen[-1][0], "generator")    # its array must be torch.uint8
            return None
        if torch is None:
            raise _PathError("torch.generator node: torch is not installed")
        if not isinstance(state, torch.Tensor) or state.dtype is not torch.uint8:
            raise _PathError("torch.generator node: v must be a uint8 tensor")
        gen = torch.Generator()
        try:
            # A private copy: set_state crashes the process on a view with a storage offset
            # (torch 2.13), and restored arrays may be views of a shared chunk buffer.
            gen.set_state(state.clone())
        except (RuntimeError, TypeError, ValueError) as exc:
            raise _PathError(f"torch.generator node: invalid state: {exc}") from None
        return gen

    # leaves --------------------------------------------------------------------

    def tag_float(self, node: dict) -> float:
        v = node["v"]
        if type(v) is not str or v not in _NONFINITE:
            raise _PathError(f"float node: v must be 'nan', 'inf' or '-inf', not {v!r}")
        return float(v)

    def tag_bytes(self, node: dict) -> bytes:
        return _b64(node["b64"], "bytes")

    def _array(self, node: dict) -> Any:
        i = node["array"]
        if type(i) is not int or i < 0:
            raise _PathError(f"{node['$']} node: array must be a non-negative integer, not {i!r}")
        if self.arrays is None:
            self.seen.append((i, node["$"]))
            return None
        if i >= self.n_arrays:
            raise _PathError(f"{node['$']} node: array index {i} out of range ({self.n_arrays} arrays)")
        try:
            return self.arrays[i]
        except (IndexError, KeyError):  # a sparse sequence that did not materialise i
            raise _PathError(f"{node['$']} node: array {i} was not materialised") from None

    def tag_tensor(self, node: dict) -> Any:
        if type(node["device"]) is not str:
            raise _PathError("tensor node: device must be a string")
        rg = node["requires_grad"]
        if type(rg) is not bool:
            raise _PathError("tensor node: requires_grad must be a boolean")
        obj = self._array(node)
        if self.arrays is None:
            return None
        if torch is None or not isinstance(obj, torch.Tensor):
            raise _PathError(f"tensor node: array {node['array']} is a {type(obj).__name__}, "
                             "not a tensor (its dtype is not a torch dtype)")
        if rg and not obj.requires_grad:
            try:
                obj.requires_grad_(True)
            except RuntimeError as exc:
                raise _PathError(f"tensor node: cannot set requires_grad: {exc}") from None
        return obj

    def tag_ndarray(self, node: dict) -> Any:
        obj = self._array(node)
        if self.arrays is not None and not isinstance(obj, np.ndarray):
            raise _PathError(f"ndarray node: array {node['array']} is a {type(obj).__name__}, "
                             "not an ndarray (its dtype is not a numpy dtype)")
        return obj

    def tag_npscalar(self, node: dict) -> Any:
        try:
            kind, dt, itemsize = parse_array_dtype(node["dtype"])
        except FormatError as exc:
            raise _PathError(f"npscalar node: {exc}") from None
        if kind != "numpy":
            raise _PathError(f"npscalar node: dtype {node['dtype']!r} is not a numpy dtype")
        raw = _b64(node["b64"], "npscalar")
        if len(raw) != itemsize:
            raise _PathError(f"npscalar node: {len(raw)} bytes for dtype {node['dtype']} "
                             f"(itemsize {itemsize})")
        if dt.kind == "b" and raw not in (b"\x00", b"\x01"):
            raise _PathError(f"npscalar node: invalid bool byte {raw!r}")
        return np.frombuffer(raw, dtype=dt)[0]

    def tag_torch_dtype(self, node: dict) -> Any:
        v = node["v"]
        if type(v) is not str:
            raise _PathError("torch.dtype node: v must be a string")
        if self.arrays is None and torch is None:   # validating without torch: the spelling only
            if not _TORCH_DTYPE_NAME.fullmatch(v):
                raise _PathError(f"torch.dtype node: unknown dtype {v!r}")
            return None
        if torch is None:
            raise _PathError("torch.dtype node: torch is not installed")
        obj = TORCH_DTYPES.get(v)
        if obj is None:
            raise _PathError(f"torch.dtype node: unknown dtype {v!r}")
        return obj

    def tag_torch_Size(self, node: dict) -> Any:
        v = node["v"]
        if type(v) is not list or any(type(s) is not int or not -(2**63) <= s < 2**63 for s in v):
            raise _PathError("torch.Size node: v must be an array of 64-bit integers")
        if self.arrays is None:
            return None
        if torch is None:
            raise _PathError("torch.Size node: torch is not installed")
        try:
            return torch.Size(v)
        except (RuntimeError, OverflowError, TypeError, ValueError) as exc:
            raise _PathError(f"torch.Size node: {exc}") from None


def _check_depth(max_depth: Any) -> None:
    _bind()
    if type(max_depth) is not int or max_depth < 0:
        raise ValueError(f"max_depth must be a non-negative int, not {max_depth!r}")


def _run(decoder: _Decoder, node: Any) -> Any:
    try:
        return decoder.dec(node, 0)
    except _PathError as e:
        raise FormatError(f"tree {_join_path('', e.parts)}: {e.message}") from None
    except RecursionError:
        raise FormatError("tree nests too deeply for the Python stack") from None


def decode_tree(node: Any, arrays: Sequence[Any], *, max_depth: int = MAX_DEPTH) -> Any:
    """Decode a typed-tree node (untrusted) back into Python values.

    ``arrays[i]`` is the materialised payload of index ``i`` (a tensor for torch
    dtypes, an ndarray for numpy dtypes); it is returned as is, never copied, so
    tied leaves decode to the same object. A tensor node with
    ``requires_grad: true`` turns it on for that object in place. Raises
    ``FormatError`` naming the path for anything section 5 does not allow.
    """
    _check_depth(max_depth)
    return _run(_Decoder(arrays, max_depth), node)


def walk_arrays(node: Any, *, max_depth: int = MAX_DEPTH) -> Iterator[int]:
    """Validate ``node`` structurally and return the array indices it references.

    Indices come in tree order, once per reference (tied leaves repeat). The whole
    tree is checked before anything is returned (unknown tags, field types,
    depth, base64, dtypes), raising ``FormatError``; range checks against the
    manifest's ``arrays`` are the caller's.
    """
    return iter([i for i, _ in walk_array_refs(node, max_depth=max_depth)])


def walk_array_refs(node: Any, *, max_depth: int = MAX_DEPTH) -> list[tuple[int, str]]:
    """Like :func:`walk_arrays`, with what each reference needs of its array: ``"tensor"``
    (a torch dtype), ``"ndarray"`` (a numpy dtype) or ``"generator"`` (a ``torch.uint8``
    tensor holding a ``torch.Generator`` state). Validation needs no torch."""
    _check_depth(max_depth)
    decoder = _Decoder(None, max_depth)
    _run(decoder, node)
    return decoder.seen
