"""Tests of the typed tree codec (docs/FORMAT.md section 5)."""

from __future__ import annotations

import base64
import copy
import json
import math
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from async_ckpt.errors import FormatError
from async_ckpt.format.tree import (MAX_DEPTH, ArrayRef, decode_tree, dtype_name, encode_table, encode_tree,
                                    is_stateful, parse_array_dtype, walk_arrays)

# --------------------------------------------------------------------------- helpers


def _payload_bytes(ref: ArrayRef) -> bytes:
    """What a writer puts on disk for ``ref``: C-contiguous little-endian bytes."""
    kind, dt, itemsize = parse_array_dtype(ref.dtype)
    assert ref.nbytes == math.prod(ref.shape) * itemsize
    v = ref.value
    if kind == "torch":
        assert isinstance(v, torch.Tensor) and v.dtype is dt and tuple(v.shape) == ref.shape
        flat = v.detach().cpu().resolve_conj().resolve_neg().reshape(-1).contiguous()
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    else:
        assert isinstance(v, np.ndarray) and v.shape == ref.shape
        data = np.ascontiguousarray(v).astype(dt, copy=False).tobytes()
    assert len(data) == ref.nbytes
    return data


def _materialise(ref: ArrayRef, data: bytes):
    """What a reader hands decode_tree: a fresh array of the declared dtype and shape."""
    kind, dt, _ = parse_array_dtype(ref.dtype)
    if kind == "torch":
        raw = torch.tensor(list(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return raw.view(dt).reshape(ref.shape)
    return np.frombuffer(bytearray(data), dtype=np.uint8).view(dt).reshape(ref.shape)


def roundtrip(obj, **kw):
    """encode → JSON text → parse → write/read payload bytes → decode."""
    node, refs = encode_tree(obj, **kw)
    text = json.dumps(node, allow_nan=False)
    parsed = json.loads(text)
    arrays = [_materialise(r, _payload_bytes(r)) for r in refs]
    assert sorted(set(walk_arrays(parsed))) == list(range(len(refs)))
    return decode_tree(parsed, arrays), node, refs, arrays


def _same_float(a: float, b: float) -> bool:
    if math.isnan(a):
        return math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def assert_same(a, b, path="root"):
    """Type-exact, nan-aware, -0.0-aware structural equality."""
    if isinstance(a, torch.Tensor):
        assert type(b) is torch.Tensor, path  # Parameters come back as plain tensors
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert a.requires_grad == b.requires_grad, path
        ra = a.detach().resolve_conj().resolve_neg().reshape(-1).contiguous()
        rb = b.detach().reshape(-1).contiguous()
        assert ra.view(torch.uint8).tolist() == rb.view(torch.uint8).tolist(), path
        return
    if isinstance(a, np.ndarray):
        assert type(b) is np.ndarray and b.shape == a.shape, path
        assert b.dtype == a.dtype.newbyteorder("<") or b.dtype == a.dtype, path
        assert np.ascontiguousarray(a).astype(b.dtype).tobytes() == b.tobytes(), path
        return
    if isinstance(a, np.generic):
        assert type(b) is type(a) and a.tobytes() == b.tobytes(), path
        return
    if isinstance(a, bytearray):
        assert type(b) is bytes and bytes(a) == b, path
        return
    if isinstance(a, dict):
        assert type(b) is dict, path
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            assert type(k) is type([kb for kb in b if kb == k and type(kb) is type(k)][0]), path
            assert_same(a[k], b[k], f"{path}[{k!r}]")
        return
    if isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
        assert type(b) is (tuple if isinstance(a, tuple) else list), path
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
        return
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, float):
        assert _same_float(a, b), (path, a, b)
    else:
        assert a == b, (path, a, b)


# --------------------------------------------------------------------------- scalars


SCALARS = [None, True, False, 0, 1, -1, 2**63, -(2**200), 10**300, 0.0, -0.0, 1.0, 1e16, 1e-300,
           5e-324, 1.7976931348623157e308, 0.1, float("nan"), float("inf"), float("-inf"),
           "", "plain", "ünï\u2603\n\"\\", "$", b"", b"\x00\xffbytes", bytearray(b"ba")]


@pytest.mark.parametrize("value", SCALARS, ids=repr)
def test_scalar_roundtrip(value):
    out, node, refs, _ = roundtrip(value)
    assert refs == []
    assert_same(value, out)
    # and inside containers
    out, _, _, _ = roundtrip({"k": [value, (value,)]})
    assert_same({"k": [value, (value,)]}, out)


def test_float_and_int_json_text_distinguishable():
    for x in [1.0, -0.0, 1e16, 1e22, 123456789.0, 2.5e-8, 3.0e300]:
        node, _ = encode_tree(x)
        text = json.dumps(node, allow_nan=False)
        assert any(c in text for c in ".eE"), text
        back = json.loads(text)
        assert type(back) is float and _same_float(back, x)
    for n in [0, 10**16, -(10**40)]:
        text = json.dumps(encode_tree(n)[0])
        assert not any(c in text for c in ".eE") and type(json.loads(text)) is int


def test_nonfinite_float_nodes():
    assert encode_tree(float("nan"))[0] == {"$": "float", "v": "nan"}
    assert encode_tree(float("inf"))[0] == {"$": "float", "v": "inf"}
    assert encode_tree(float("-inf"))[0] == {"$": "float", "v": "-inf"}


def test_bool_is_not_int():
    out, node, _, _ = roundtrip([True, 1, False, 0])
    assert [type(x) for x in out] == [bool, int, bool, int]


def test_subclasses_decode_as_base_types():
    import enum
    from collections import namedtuple

    class Color(enum.IntEnum):
        RED = 3

    P = namedtuple("P", "x y")
    od = OrderedDict([("b", 1), ("a", 2)])
    out, _, _, _ = roundtrip({"od": od, "p": P(1, 2), "c": Color.RED, "s": np.str_("x")})
    assert type(out["od"]) is dict and list(out["od"].items()) == [("b", 1), ("a", 2)]
    assert type(out["p"]) is tuple and out["p"] == (1, 2)
    assert type(out["c"]) is int and out["c"] == 3
    assert type(out["s"]) is str and out["s"] == "x"


# --------------------------------------------------------------------------- containers


def test_dict_keys_order_and_types():
    d = {"z": 1, 3: "three", "3": "str three", -7: None, "a.b": 2, "": 0, 10**30: 1}
    out, node, _, _ = roundtrip(d)
    assert list(out.items()) == list(d.items())
    assert [type(k) for k in out] == [type(k) for k in d]
    assert node["$"] == "dict" and node["keys"] == list(d.keys())


def test_nested_containers():
    obj = {"a": [1, (2, [3, {"b": ()}]), []], "c": {}, "t": (None,)}
    out, _, _, _ = roundtrip(obj)
    assert_same(obj, out)


def test_depth_limit_encode_and_decode():
    def nest(n):
        x = 0
        for _ in range(n):
            x = [x]
        return x

    ok = nest(MAX_DEPTH)
    out, node, _, _ = roundtrip(ok)
    assert out == ok
    with pytest.raises(TypeError, match="deeper than 256"):
        encode_tree(nest(MAX_DEPTH + 1))
    # a hand-built node one level too deep
    deep = 0
    for _ in range(MAX_DEPTH + 1):
        deep = {"$": "list", "v": [deep]}
    with pytest.raises(FormatError, match="deeper than 256"):
        decode_tree(deep, [])
    with pytest.raises(FormatError):
        list(walk_arrays(deep))
    assert decode_tree(deep, [], max_depth=MAX_DEPTH + 1) == nest(MAX_DEPTH + 1)
    with pytest.raises(FormatError, match="deeper than 3"):
        decode_tree(node, [], max_depth=3)


def test_absurd_depth_is_a_format_error_not_a_crash():
    deep = 0
    for _ in range(20000):
        deep = {"$": "list", "v": [deep]}
    with pytest.raises(FormatError):
        decode_tree(deep, [], max_depth=10**6)


def test_cycle_is_type_error():
    a: list = []
    a.append(a)
    with pytest.raises(TypeError, match="deeper"):
        encode_tree({"x": a})


# --------------------------------------------------------------------------- tensors

ARRAY_TORCH_DTYPES = [getattr(torch, n) for n in
                      ["bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                       "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
                       "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                       "float8_e8m0fnu", "float4_e2m1fn_x2"] if hasattr(torch, n)]


def _random_tensor(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g, dtype=torch.uint8).bool()
    raw = torch.randint(0, 256, (n * dtype.itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", ARRAY_TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3)], ids=str)
def test_tensor_dtypes_roundtrip(dtype, shape):
    t = _random_tensor(dtype, shape)
    out, node, refs, arrays = roundtrip({"t": t})
    assert refs[0].value is t and refs[0].dtype == str(dtype) and refs[0].shape == shape
    assert node["values"][0] == {"$": "tensor", "array": 0, "device": "cpu", "requires_grad": False}
    assert out["t"] is arrays[0]
    assert_same(t, out["t"])
    assert parse_array_dtype(refs[0].dtype)[1] is dtype
    assert dtype_name(t) == str(dtype)


def test_float8_variants_present():
    names = {str(d) for d in ARRAY_TORCH_DTYPES}
    assert {"torch.float8_e4m3fn", "torch.float8_e5m2"} <= names


def test_non_contiguous_tensor_views_are_not_copied():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    views = {"t": base.t(), "step": base[:, ::2], "neg": base.flip(0), "exp": torch.ones(3).expand(4, 3),
             "col": base[:, 1]}
    out, _, refs, _ = roundtrip(views)
    for r, v in zip(refs, views.values()):
        assert r.value is v
    for k in views:
        assert torch.equal(out[k], views[k]) and out[k].is_contiguous()


def test_conj_and_neg_views_are_materialised_and_not_tied():
    c = torch.randn(3, dtype=torch.complex64)
    cj = c.conj()
    im = cj.imag  # carries the neg bit over c's memory
    out, _, refs, _ = roundtrip([c, cj, im])
    assert len(refs) == 3
    assert torch.equal(out[0], c) and torch.equal(out[1], cj.resolve_conj())
    assert torch.equal(out[2], im.resolve_neg())
    assert not out[1].is_conj() and not out[2].is_neg()


def test_requires_grad_and_parameters():
    p = torch.nn.Parameter(torch.randn(3, 2))
    frozen = torch.nn.Parameter(torch.randn(2), requires_grad=False)
    g = torch.randn(4, requires_grad=True)
    out, node, refs, arrays = roundtrip({"p": p, "frozen": frozen, "g": g, "i": torch.arange(3)})
    assert [v["requires_grad"] for v in node["values"]] == [True, False, True, False]
    assert type(out["p"]) is torch.Tensor and out["p"].requires_grad and torch.equal(out["p"], p)
    assert not out["frozen"].requires_grad and out["g"].requires_grad
    assert out["p"] is arrays[0]


def test_tied_tensors_share_one_index():
    w = torch.randn(5, 3)
    same_view = w.view(5, 3)
    detached = w.detach()
    out, node, refs, arrays = roundtrip({"a": w, "b": w, "c": same_view, "d": detached,
                                         "row": w[0], "t": w.t(), "e1": torch.empty(0), "e2": torch.empty(0)})
    idx = [v["array"] for v in node["values"]]
    assert idx[0] == idx[1] == idx[2] == idx[3]
    assert len({idx[0], idx[4], idx[5], idx[6], idx[7]}) == 5  # other views, distinct empties
    assert len(refs) == 5
    assert out["a"] is out["b"] is out["c"] is out["d"]
    assert out["e1"] is not out["e2"]


def test_tied_module_weights():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    m = Tied()
    out, node, refs, _ = roundtrip({"model": m})
    sd = out["model"]
    assert len(refs) == 1 and sd["emb.weight"] is sd["head.weight"]
    m2 = Tied()
    m2.load_state_dict(sd)
    assert torch.equal(m2.emb.weight, m.emb.weight) and m2.head.weight is m2.emb.weight


@pytest.mark.filterwarnings("ignore:.*quantize")
def test_unsupported_tensors():
    with pytest.raises(TypeError, match=r"x\.s: .*layout"):
        encode_tree({"x": {"s": torch.zeros(3).to_sparse()}})
    with pytest.raises(TypeError, match="meta"):
        encode_tree({"m": torch.empty(3, device="meta")})
    with pytest.raises(TypeError, match=r"q: .*dtype"):
        encode_tree({"q": torch.quantize_per_tensor(torch.zeros(2), 0.1, 0, torch.quint8)})


# --------------------------------------------------------------------------- numpy

NP_DTYPES = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16", "g"]


@pytest.mark.parametrize("dt", NP_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (4,), (2, 3)], ids=str)
def test_ndarray_roundtrip(dt, shape):
    rng = np.random.default_rng(0)
    dt = np.dtype(dt)
    a = np.frombuffer(rng.integers(0, 256, max(1, math.prod(shape)) * dt.itemsize, dtype=np.uint8).tobytes(),
                      dtype=dt)[:math.prod(shape)].reshape(shape).copy()
    if dt.kind == "b":
        a = rng.integers(0, 2, shape).astype(bool)
    out, node, refs, arrays = roundtrip({"a": a})
    assert refs[0].value is a and refs[0].dtype == dt.str and refs[0].shape == shape
    assert node["values"][0] == {"$": "ndarray", "array": 0}
    assert out["a"] is arrays[0]
    assert_same(a, out["a"])
    assert dtype_name(a) == dt.str and parse_array_dtype(dt.str) == ("numpy", dt, dt.itemsize)


def test_ndarray_views_big_endian_and_ties():
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    big = np.arange(5, dtype=">i4")
    view = base[::2, ::-1]
    out, node, refs, _ = roundtrip({"v": view, "b": big, "x": base, "y": base, "z": base.view()})
    assert refs[0].value is view
    np.testing.assert_array_equal(out["v"], base[::2, ::-1])
    assert refs[1].dtype == "<i4" and out["b"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(out["b"], big)
    assert out["x"] is out["y"] is out["z"] and len(refs) == 3


@pytest.mark.parametrize("bad", [np.array([object()]), np.array(["a"]), np.zeros(2, dtype="i4,f8"),
                                 np.array(["2020-01-01"], dtype="M8[D]"), np.ma.masked_array([1, 2])],
                         ids=["object", "str", "structured", "datetime", "masked"])
def test_unsupported_ndarrays(bad):
    with pytest.raises(TypeError, match=r"^data\[2\]: "):
        encode_tree({"data": [0, 1, bad]})


@pytest.mark.parametrize("value", [np.float32(1.5), np.float64(-0.0), np.float16(np.nan), np.int64(-3),
                                   np.int8(-128), np.uint64(2**64 - 1), np.bool_(True), np.bool_(False),
                                   np.complex64(1 - 2j), np.complex128(3j), np.longdouble(1) / 3],
                         ids=repr)
def test_numpy_scalars(value):
    out, node, refs, _ = roundtrip([value])
    assert refs == [] and node["v"][0]["$"] == "npscalar"
    assert_same(value, out[0])


# --------------------------------------------------------------------------- torch values


def test_torch_dtype_and_size():
    dtypes = [torch.float32, torch.bfloat16, torch.qint8, torch.bool, torch.complex64]
    if hasattr(torch, "float8_e4m3fn"):
        dtypes.append(torch.float8_e4m3fn)
    obj = {"d": dtypes, "s": torch.Size([2, 0, 3]), "e": torch.Size([])}
    out, node, _, _ = roundtrip(obj)
    assert out["d"] == dtypes and all(a is b for a, b in zip(out["d"], dtypes))
    assert type(out["s"]) is torch.Size and out["s"] == obj["s"] and out["e"] == torch.Size([])
    assert node["values"][1] == {"$": "torch.Size", "v": [2, 0, 3]}


# --------------------------------------------------------------------------- stateful objects


class Counter:
    """A user class following the state_dict protocol (like GradScaler)."""

    def __init__(self):
        self.n = 0
        self.scale = 65536.0
        self.hist = torch.zeros(3)

    def state_dict(self):
        return {"n": self.n, "scale": self.scale, "hist": self.hist, "nested": {1: (2, 3)}}

    def load_state_dict(self, sd):
        self.n, self.scale, self.hist = sd["n"], sd["scale"], sd["hist"]


def _assert_state_equal(a, b, path="sd"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            _assert_state_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and (a == b or (a != a and b != b)), (path, a, b)


def _train(model, opt, scheds, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(6, 8, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for s in scheds:
            s.step()


def _make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9 ** e)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    return model, opt, lam, cos


def test_training_state_roundtrip_and_bit_exact_resume():
    model, opt, lam, cos = _make()
    _train(model, opt, [lam, cos], 3, seed=1)
    scaler = torch.amp.GradScaler("cpu")
    state = {"model": model, "optimizer": opt, "sched_lambda": lam, "sched_cos": cos, "scaler": scaler,
             "counter": Counter(), "progress": {"step": 3, "loss": float("nan")}}
    out, node, refs, _ = roundtrip(state)
    json.dumps(node, allow_nan=False)
    assert node["values"][0]["$"] == "state" and node["values"][0]["type"] == "torch.nn.modules.container.Sequential"
    assert node["values"][1]["type"] == "torch.optim.adamw.AdamW"
    for name, obj in state.items():
        if name != "progress":
            _assert_state_equal(obj.state_dict(), out[name], name)
    assert out["counter"]["nested"] == {1: (2, 3)}

    model2, opt2, lam2, cos2 = _make()
    model2.load_state_dict(out["model"])
    opt2.load_state_dict(out["optimizer"])
    lam2.load_state_dict(out["sched_lambda"])
    cos2.load_state_dict(out["sched_cos"])
    scaler2 = torch.amp.GradScaler("cpu")
    scaler2.load_state_dict(out["scaler"])
    assert scaler2.state_dict() == scaler.state_dict()
    _train(model, opt, [lam, cos], 2, seed=2)
    _train(model2, opt2, [lam2, cos2], 2, seed=2)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    _assert_state_equal(opt.state_dict(), opt2.state_dict())
    assert lam.get_last_lr() == lam2.get_last_lr() and cos.get_last_lr() == cos2.get_last_lr()


def test_is_stateful():
    model, opt, lam, _ = _make()
    for obj in (model, opt, lam, Counter(), torch.amp.GradScaler("cpu")):
        assert is_stateful(obj)
    for obj in (torch.nn.Linear, Counter, {}, OrderedDict(), torch.zeros(1), object(), 3, None, [model]):
        assert not is_stateful(obj)


def test_numpy_generators():
    for name in ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"]:
        g = np.random.Generator(getattr(np.random, name)(1234))
        g.random(3)
        out, node, _, _ = roundtrip({"g": g})
        assert node["values"][0]["$"] == "np.generator"
        g2 = out["g"]
        assert isinstance(g2, np.random.Generator) and g2 is not g
        assert g.random(5).tolist() == g2.random(5).tolist(), name
    rs = np.random.RandomState(7)
    rs.randn(3)  # leaves a cached gaussian
    out, node, _, _ = roundtrip([rs])
    assert node["v"][0]["$"] == "np.randomstate"
    assert rs.randn(5).tolist() == out[0].randn(5).tolist()


def test_torch_generator():
    g = torch.Generator().manual_seed(99)
    torch.randn(3, generator=g)
    out, node, refs, _ = roundtrip({"g": g})
    assert node["values"][0]["$"] == "torch.generator" and refs[0].dtype == "torch.uint8"
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=out["g"]))


# --------------------------------------------------------------------------- encode errors


def test_encode_errors_name_the_path():
    model, opt, _, _ = _make()
    opt.param_groups[0]["foo"] = lambda: 0
    with pytest.raises(TypeError, match=r"^optimizer\.param_groups\[0\]\.foo: .*function"):
        encode_tree({"model": model, "optimizer": opt})
    with pytest.raises(TypeError, match=r'^model\["weird key"\]: .*set'):
        encode_tree({"model": {"weird key": {1, 2}}})
    with pytest.raises(TypeError, match=r"^model: dict key \(1, 2\)"):
        encode_tree({"model": {(1, 2): 0}})
    with pytest.raises(TypeError, match=r"^a\[1\]\[0\]\[2\]: dict key True"):
        encode_tree({"a": [0, ([0, 0, {True: 1}],)]})
    with pytest.raises(TypeError, match=r"^state\.x\[0\]: .*object"):
        encode_tree({"x": [object()]}, path="state")
    with pytest.raises(TypeError, match=r"^<root>: "):
        encode_tree(lambda: 1)
    with pytest.raises(TypeError, match=r"^k\[3\]: "):
        encode_tree({"k": {3: Counter}})
    with pytest.raises(TypeError, match=r'^\["1x"\]\.y: '):
        encode_tree({"1x": {"y": memoryview(b"")}})


def test_encode_node_is_json():
    node, _ = encode_tree({"a": [float("nan"), -0.0, 1e300, b"\x00"], 1: np.float32(2)})
    text = json.dumps(node, allow_nan=False)
    assert "NaN" not in text and "Infinity" not in text


def test_encode_is_fast_for_many_small_tensors():
    sd = {f"layer{i}.weight": torch.zeros(4) for i in range(20000)}
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        node, refs = encode_tree({"model": sd})
        best = min(best, time.perf_counter() - t0)
    assert len(refs) == 20000
    assert best < 1.0, best  # ~40-70 ms on a slow 2-core VM; this only catches blow-ups


# --------------------------------------------------------------------------- dtypes


def test_parse_array_dtype_rejects():
    for bad in ["torch.float", "torch.half", "torch.qint8", "torch.uint4", "torch.bits8", "torch.nope",
                "|O", "<U4", "|S3", "|V4", "<M8[D]", "float32", ">f4", "=f4", "<b1", "|f4", "<i3",
                "<f0", "", "torch.", "<f4 ", "\u0663", 5, None, b"<f4", True]:
        with pytest.raises(FormatError):
            parse_array_dtype(bad)


def test_parse_array_dtype_accepts():
    assert parse_array_dtype("torch.bfloat16") == ("torch", torch.bfloat16, 2)
    assert parse_array_dtype("torch.bool") == ("torch", torch.bool, 1)
    assert parse_array_dtype("|b1") == ("numpy", np.dtype(bool), 1)
    assert parse_array_dtype("<c16") == ("numpy", np.dtype(np.complex128), 16)
    assert parse_array_dtype("|u1")[2] == 1


def test_dtype_name_errors():
    for bad in [torch.zeros(1).to(torch.float32).dtype]:
        assert dtype_name(bad) == "torch.float32"
    for bad in [torch.qint8, np.dtype(object), np.dtype(">f4"), "torch.float32", 3]:
        with pytest.raises(TypeError):
            dtype_name(bad)


# --------------------------------------------------------------------------- decode errors

T0 = {"$": "tensor", "array": 0, "device": "cpu", "requires_grad": False}
N1 = {"$": "ndarray", "array": 1}


def _arrays():
    return [torch.zeros(2), np.zeros(2), torch.zeros(3, dtype=torch.int64), torch.zeros(5, dtype=torch.float32)]


BAD_NODES = {
    "raw list": [1, 2],
    "raw tuple": (1,),
    "set": {1},
    "untagged object": {"a": 1},
    "unknown tag": {"$": "pickle", "v": "gASV"},
    "tag not str": {"$": 1, "v": []},
    "extra field": {"$": "list", "v": [], "x": 1},
    "missing field": {"$": "dict", "keys": []},
    "list v not list": {"$": "list", "v": {"a": 1}},
    "inf number": float("inf"),
    "nan number": float("nan"),
    "float bad v": {"$": "float", "v": "1.5"},
    "float v number": {"$": "float", "v": 1.5},
    "dict length mismatch": {"$": "dict", "keys": ["a"], "values": []},
    "dict duplicate": {"$": "dict", "keys": ["a", "a"], "values": [1, 2]},
    "dict duplicate int": {"$": "dict", "keys": [1, 2, 1], "values": [1, 2, 3]},
    "dict bool key": {"$": "dict", "keys": [True], "values": [1]},
    "dict float key": {"$": "dict", "keys": [1.0], "values": [1]},
    "dict null key": {"$": "dict", "keys": [None], "values": [1]},
    "dict keys not list": {"$": "dict", "keys": "ab", "values": [1, 2]},
    "bytes bad b64": {"$": "bytes", "b64": "!!!"},
    "bytes bad padding": {"$": "bytes", "b64": "YQ"},
    "bytes non-ascii": {"$": "bytes", "b64": "Y\u00e9=="},
    "bytes b64 not str": {"$": "bytes", "b64": 3},
    "tensor bool index": {"$": "tensor", "array": True, "device": "cpu", "requires_grad": False},
    "tensor float index": {"$": "tensor", "array": 0.0, "device": "cpu", "requires_grad": False},
    "tensor negative index": {"$": "tensor", "array": -1, "device": "cpu", "requires_grad": False},
    "tensor index out of range": {"$": "tensor", "array": 4, "device": "cpu", "requires_grad": False},
    "tensor huge index": {"$": "tensor", "array": 10**40, "device": "cpu", "requires_grad": False},
    "tensor rg int": {"$": "tensor", "array": 0, "device": "cpu", "requires_grad": 1},
    "tensor device not str": {"$": "tensor", "array": 0, "device": None, "requires_grad": False},
    "tensor is ndarray": {"$": "tensor", "array": 1, "device": "cpu", "requires_grad": False},
    "ndarray is tensor": {"$": "ndarray", "array": 0},
    "rg on int tensor": {"$": "tensor", "array": 2, "device": "cpu", "requires_grad": True},
    "npscalar short": {"$": "npscalar", "dtype": "<f4", "b64": base64.b64encode(b"abc").decode()},
    "npscalar long": {"$": "npscalar", "dtype": "<f4", "b64": base64.b64encode(b"abcde").decode()},
    "npscalar object": {"$": "npscalar", "dtype": "|O", "b64": base64.b64encode(b"abcdefgh").decode()},
    "npscalar torch dtype": {"$": "npscalar", "dtype": "torch.float32", "b64": "AAAAAA=="},
    "npscalar bad bool": {"$": "npscalar", "dtype": "|b1", "b64": base64.b64encode(b"\x02").decode()},
    "npscalar dtype int": {"$": "npscalar", "dtype": 4, "b64": "AAAAAA=="},
    "torch.dtype unknown": {"$": "torch.dtype", "v": "torch.float128"},
    "torch.dtype alias": {"$": "torch.dtype", "v": "torch.float"},
    "torch.dtype attr": {"$": "torch.dtype", "v": "torch.nn"},
    "torch.dtype not str": {"$": "torch.dtype", "v": ["torch.float32"]},
    "torch.Size bool": {"$": "torch.Size", "v": [True]},
    "torch.Size float": {"$": "torch.Size", "v": [1.0]},
    "torch.Size huge": {"$": "torch.Size", "v": [2**70]},
    "torch.Size not list": {"$": "torch.Size", "v": 3},
    "state type not str": {"$": "state", "type": None, "v": 1},
    "np.generator bad name": {"$": "np.generator", "v": {"$": "dict", "keys": ["bit_generator"], "values": ["os.system"]}},
    "np.generator not dict": {"$": "np.generator", "v": 5},
    "np.generator bad state": {"$": "np.generator", "v": {"$": "dict", "keys": ["bit_generator", "state"],
                                                          "values": ["PCG64", "x"]}},
    "np.randomstate bad": {"$": "np.randomstate", "v": {"$": "tuple", "v": ["MT19937", 1, 2]}},
    "np.randomstate list": {"$": "np.randomstate", "v": {"$": "list", "v": ["MT19937"]}},
    "torch.generator not tensor": {"$": "torch.generator", "v": 3},
    "torch.generator wrong dtype": {"$": "torch.generator", "v": T0},
    "torch.generator wrong size": {"$": "torch.generator",
                                   "v": {"$": "tensor", "array": 3, "device": "cpu", "requires_grad": False}},
}


@pytest.mark.parametrize("node", list(BAD_NODES.values()), ids=list(BAD_NODES))
def test_decode_rejects(node):
    with pytest.raises(FormatError):
        decode_tree(node, _arrays())
    with pytest.raises(FormatError):
        decode_tree({"$": "dict", "keys": ["outer"], "values": [{"$": "list", "v": [0, node]}]}, _arrays())


def _d(**kv):
    return {"$": "dict", "keys": list(kv), "values": list(kv.values())}


_ND = {"$": "ndarray", "array": 1}
BAD_GENERATORS = [
    {"$": "np.generator", "v": _d(bit_generator={"$": "list", "v": []})},
    {"$": "np.generator", "v": _d(bit_generator="MT19937", state=_d(key=T0, pos=1))},
    {"$": "np.generator", "v": _d(bit_generator="MT19937", state=_d(key=_ND, pos=10**30))},
    {"$": "np.generator", "v": _d(bit_generator="PCG64", state=_d(state=T0, inc=1), has_uint32=0, uinteger=0)},
    {"$": "np.generator", "v": _d(bit_generator="PCG64", state=_d(state=-1, inc=1), has_uint32=0, uinteger=0)},
    {"$": "np.generator", "v": _d(bit_generator="SFC64", state=_d(state=T0), has_uint32=T0, uinteger=_ND)},
    {"$": "np.randomstate", "v": {"$": "tuple", "v": [_ND]}},
    {"$": "np.randomstate", "v": {"$": "tuple", "v": ["MT19937", T0, 0, 0, 0.0]}},
    {"$": "np.randomstate", "v": {"$": "tuple", "v": ["MT19937", _ND, 10**30, 0, 0.0]}},
]


@pytest.mark.parametrize("node", BAD_GENERATORS)
def test_decode_rejects_bad_generator_states(node):
    with pytest.raises(FormatError, match="np\\.(generator|randomstate) node"):
        decode_tree(node, _arrays())


def test_walk_arrays_rejects_structural_garbage():
    for name, node in BAD_NODES.items():
        if any(s in name for s in ("out of range", "huge index", "is ndarray", "is tensor", "rg on int",
                                   "bad state", "randomstate bad", "wrong dtype", "wrong size")):
            continue  # need the materialised arrays to tell
        with pytest.raises(FormatError):
            list(walk_arrays(node))


def test_decode_errors_name_the_path():
    node = {"$": "dict", "keys": ["model", 3], "values": [
        {"$": "dict", "keys": ["layers"], "values": [{"$": "list", "v": [1, {"$": "bogus"}]}]}, 0]}
    with pytest.raises(FormatError, match=r"model\.layers\[1\]: unknown node tag 'bogus'"):
        decode_tree(node, [])
    node = {"$": "dict", "keys": ["a b"], "values": [{"$": "tuple", "v": [{"$": "tensor", "array": 7,
                                                                           "device": "cpu", "requires_grad": False}]}]}
    with pytest.raises(FormatError, match=r'\["a b"\]\[0\]: .*out of range'):
        decode_tree(node, [])


def test_decode_does_not_copy_and_ties():
    arrays = _arrays()
    node = {"$": "list", "v": [T0, T0, N1, {"$": "state", "type": "x", "v": {"$": "list", "v": [T0]}}]}
    out = decode_tree(node, arrays)
    assert out[0] is arrays[0] and out[1] is arrays[0] and out[2] is arrays[1] and out[3][0] is arrays[0]
    assert list(walk_arrays(node)) == [0, 0, 1, 0]


def test_decode_sparse_arrays_sequence():
    class Sparse:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if i == 1:
                raise IndexError(i)
            return torch.zeros(1)

    assert isinstance(decode_tree(T0, Sparse()), torch.Tensor)
    with pytest.raises(FormatError, match="not materialised"):
        decode_tree({"$": "tensor", "array": 1, "device": "cpu", "requires_grad": False}, Sparse())


def test_decode_max_depth_argument():
    with pytest.raises(ValueError):
        decode_tree(1, [], max_depth=-1)


# --------------------------------------------------------------------------- properties

_TENSOR_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8,
                  torch.uint8, torch.bool, torch.complex64]
_NP_SCALAR_TYPES = [np.float32, np.float64, np.int32, np.int64, np.uint16, np.bool_, np.complex128]


@st.composite
def small_tensors(draw):
    dtype = draw(st.sampled_from(_TENSOR_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    t = _random_tensor(dtype, shape, seed=draw(st.integers(0, 2**16)))
    if draw(st.booleans()) and t.dim() == 2:
        t = t.t()
    if dtype.is_floating_point and draw(st.booleans()):
        t.requires_grad_(True)
    return t


@st.composite
def small_ndarrays(draw):
    dt = np.dtype(draw(st.sampled_from(["<f4", "<f8", "<i2", "<u8", "|b1", "<c8"])))
    n = draw(st.integers(0, 6))
    raw = draw(st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize))
    a = np.frombuffer(raw, dtype=np.uint8).view(dt).copy() if dt.kind != "b" else \
        np.frombuffer(raw, dtype=np.uint8) % 2 == 1
    return a[::-1] if draw(st.booleans()) else a


np_scalars = st.builds(lambda t, x: t(x), st.sampled_from(_NP_SCALAR_TYPES), st.integers(0, 100)) | \
    st.floats(width=32).map(np.float32)

leaves = (st.none() | st.booleans() | st.integers() | st.integers(-(2**300), 2**300)
          | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | st.binary(max_size=8)
          | small_tensors() | small_ndarrays() | np_scalars | st.sampled_from([torch.float16, torch.int8])
          | st.lists(st.integers(0, 5), max_size=3).map(torch.Size))
keys = st.text(max_size=6) | st.integers()
trees = st.recursive(leaves, lambda children: (
    st.lists(children, max_size=4) | st.lists(children, max_size=4).map(tuple)
    | st.dictionaries(keys, children, max_size=4)), max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_property_roundtrip(tree):
    out, node, refs, arrays = roundtrip(tree)
    assert_same(tree, out)


@settings(max_examples=40, deadline=None)
@given(st.lists(small_tensors(), min_size=1, max_size=5), st.data())
def test_property_ties(tensors, data):
    picks = data.draw(st.lists(st.integers(0, len(tensors) - 1), max_size=8))
    tree = [tensors[i] for i in picks]
    out, node, refs, arrays = roundtrip(tree)
    for i, a in enumerate(tree):
        for j, b in enumerate(tree):
            assert (out[i] is out[j]) == (a is b or (a.numel() > 0 and a.data_ptr() == b.data_ptr()
                                                     and a.shape == b.shape and a.stride() == b.stride()
                                                     and a.dtype == b.dtype))


_TAGS = ["float", "dict", "list", "tuple", "bytes", "tensor", "ndarray", "npscalar", "torch.dtype",
         "torch.Size", "state", "np.generator", "torch.generator", "np.randomstate", "nope"]
_FIELDS = ["v", "keys", "values", "b64", "array", "device", "requires_grad", "dtype", "type", "x"]
json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 5)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6)
                | st.sampled_from(["nan", "inf", "<f4", "|b1", "torch.float32", "PCG64", "MT19937",
                                   "AAAAAA==", "AQ==", "cpu"]))


def _tagged(children):
    return st.builds(lambda tag, fields: {"$": tag, **fields}, st.sampled_from(_TAGS),
                     st.dictionaries(st.sampled_from(_FIELDS), children, max_size=4))


json_values = st.recursive(json_scalars, lambda children: (
    st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    | _tagged(children)), max_leaves=25)


def _fuzz_arrays():
    return [torch.zeros(2), np.zeros(3), torch.zeros(2, dtype=torch.int32),
            torch.get_rng_state(), torch.zeros(0, dtype=torch.uint8)]


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_fuzz_decode_only_raises_format_error(node):
    try:
        decode_tree(node, _fuzz_arrays())
    except FormatError:
        pass
    try:
        list(walk_arrays(node))
    except FormatError:
        pass


def _mutations(node, path=()):
    """Every (path, subnode) of a JSON value."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _mutations(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _mutations(v, path + (i,))


def _replace(node, path, new):
    if not path:
        return new
    node = copy.copy(node)
    node[path[0]] = _replace(node[path[0]], path[1:], new)
    return node


_VALID = None


def _valid_encoded():
    """A realistic encoded state (node as parsed JSON, materialised arrays), built once."""
    global _VALID
    if _VALID is None:
        model, opt, lam, _ = _make()
        _train(model, opt, [lam], 1, seed=0)
        state = {"model": model, "opt": opt, "sched": lam, "rng": np.random.default_rng(0),
                 "trng": torch.Generator().manual_seed(1), "rs": np.random.RandomState(2),
                 "misc": [np.float32(1), b"x", float("nan"), torch.Size([1]), torch.bfloat16]}
        node, refs = encode_tree(state)
        _VALID = (json.loads(json.dumps(node)), [_materialise(r, _payload_bytes(r)) for r in refs])
    return _VALID


@settings(max_examples=250, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_trees(data):
    node, arrays = _valid_encoded()
    arrays = [a.clone() if isinstance(a, torch.Tensor) else a.copy() for a in arrays]
    spots = list(_mutations(node))
    path, _ = spots[data.draw(st.integers(0, len(spots) - 1))]
    mutated = _replace(node, path, data.draw(json_values))
    try:
        decode_tree(mutated, arrays)
    except FormatError:
        pass


def test_the_observer_is_told_as_the_table_grows_with_final_rows():
    seen = []

    class Observer:
        every = 3

        def arrays_added(self, table):
            seen.append((len(table.values), list(table.host), list(table.nbytes)))

    tensors = {f"t{i}": torch.arange(i + 1, dtype=torch.float32) for i in range(10)}
    tree, table = encode_table({"model": tensors, "tail": [torch.ones(2, 2).t()]}, observer=Observer())
    assert [n for n, _, _ in seen] == [3, 6, 9]
    for n, host, nbytes in seen:           # every row the observer saw is final
        assert host == table.host[:n] and nbytes == table.nbytes[:n]
    assert len(table.values) == 11 and table.host[-1] == -1     # a transposed view: not plain memory
