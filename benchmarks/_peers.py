"""The tools people use today, each called the way its documentation shows, every write fsync'd.

Each peer is ``fn(state, folder) -> {row_id: seconds}`` (plus
``"stored:<row_id>": bytes`` where the stored size differs from the raw one): it saves ``state`` into a fresh
``folder``, makes it durable (fsync of every file and directory, inside the timing), drops
the page cache for the files, and times its own load. ``folder`` is removed by the caller.

Every load ends with the bytes in the live state's tensors (copied in place, as ``restore``
and DCP ``load`` do): a load that returns lazily mapped tensors (safetensors maps the file)
would otherwise be timed before it has read anything.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ._ceilings import drop_caches, files_under, fsync_tree
from ._states import BenchState, flatten

PeerFn = Callable[[BenchState, Path], dict[str, float]]


@torch.no_grad()
def copy_into(st: BenchState, loaded: dict[str, torch.Tensor]) -> None:
    """Copy every loaded tensor into the state's tensor of the same name."""
    for name, target in st.flat.items():
        target.copy_(loaded[name])


def torch_save(st: BenchState, folder: Path) -> dict[str, float]:
    folder.mkdir(parents=True)
    path = folder / "state.pt"
    t0 = time.perf_counter()
    torch.save(st.tree, path)
    fsync_tree(path)
    save = time.perf_counter() - t0
    drop_caches([str(path)])
    t0 = time.perf_counter()
    loaded = torch.load(path, weights_only=True)
    copy_into(st, flatten(loaded))
    load = time.perf_counter() - t0
    del loaded
    return {"torch_save": save, "torch_load": load}


def safetensors_save(st: BenchState, folder: Path) -> dict[str, float]:
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True)
    path = folder / "model.safetensors"
    t0 = time.perf_counter()
    save_file(st.flat, str(path))
    fsync_tree(path)
    save = time.perf_counter() - t0
    drop_caches([str(path)])
    t0 = time.perf_counter()
    loaded = load_file(str(path))
    copy_into(st, loaded)
    load = time.perf_counter() - t0
    del loaded
    return {"safetensors_save": save, "safetensors_load": load}


def _dcp():
    import torch.distributed.checkpoint as dcp
    return dcp


def dcp_save(st: BenchState, folder: Path) -> dict[str, float]:
    dcp = _dcp()
    path = folder / "dcp"
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        dcp.save(st.tree, checkpoint_id=str(path), no_dist=True)
        fsync_tree(path)        # FileSystemWriter fsyncs its files; the directories too here
        save = time.perf_counter() - t0
        drop_caches(files_under(path))
        t0 = time.perf_counter()
        dcp.load(st.tree, checkpoint_id=str(path), no_dist=True)    # in place, like ours
        load = time.perf_counter() - t0
    return {"dcp_save": save, "dcp_load": load}


def dcp_async_save(st: BenchState, folder: Path) -> dict[str, float]:
    """DCP's ``async_save`` with its defaults (thread executor, default stager): the part that
    blocks the caller, and the time until its future resolves and the files are fsync'd."""
    dcp = _dcp()
    path = folder / "dcp_async"
    folder.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        future = dcp.async_save(st.tree, checkpoint_id=str(path), no_dist=True)
        blocking = time.perf_counter() - t0
        future.result()
        fsync_tree(path)
        total = time.perf_counter() - t0
    return {"dcp_async_blocking": blocking, "dcp_async_total": total}


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _ts_spec(path: Path, arr: np.ndarray, zstd: bool) -> dict:
    dtype = "bfloat16" if arr.dtype.name == "bfloat16" else arr.dtype.name
    chunk = list(arr.shape)
    if arr.ndim and arr.nbytes > (32 << 20):      # ~32 MiB chunks so tensorstore can parallelise
        row = max(1, arr.nbytes // arr.shape[0])
        chunk[0] = max(1, (32 << 20) // row)
    codecs: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if zstd:
        codecs.append({"name": "zstd", "configuration": {"level": 1}})
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"shape": list(arr.shape), "data_type": dtype,
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                         "codecs": codecs},
            "create": True, "delete_existing": True}


def _tensorstore(st: BenchState, folder: Path, zstd: bool) -> tuple[float, float, int]:
    import tensorstore as ts

    root = folder / ("zarr3_zstd" if zstd else "zarr3")
    root.mkdir(parents=True)
    arrays = {name: _numpy(t) for name, t in st.flat.items()}
    t0 = time.perf_counter()
    opened = [(ts.open(_ts_spec(root / name, a, zstd)), a) for name, a in arrays.items()]
    writes = [f.result().write(a) for f, a in opened]
    for w in writes:
        w.result()
    fsync_tree(root)
    save = time.perf_counter() - t0
    del opened, writes
    stored = stored_bytes(root)
    drop_caches(files_under(root))
    t0 = time.perf_counter()
    opened = [ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(root / name)}})
              for name in arrays]
    reads = [f.result().read() for f in opened]
    for name, r in zip(arrays, reads):
        np.copyto(arrays[name], r.result())     # arrays[name] views the state's tensor
    load = time.perf_counter() - t0
    return save, load, stored


def tensorstore_zarr3(st: BenchState, folder: Path) -> dict[str, float]:
    save, load, stored = _tensorstore(st, folder, False)
    return {"ts_save": save, "ts_load": load, "stored:ts_save": stored}


def tensorstore_zarr3_zstd(st: BenchState, folder: Path) -> dict[str, float]:
    save, load, stored = _tensorstore(st, folder, True)
    return {"ts_zstd_save": save, "ts_zstd_load": load, "stored:ts_zstd_save": stored}


PEERS: dict[str, PeerFn] = {
    "torch.save": torch_save,
    "safetensors": safetensors_save,
    "dcp.save": dcp_save,
    "dcp.async_save": dcp_async_save,
    "tensorstore": tensorstore_zarr3,
    "tensorstore_zstd": tensorstore_zarr3_zstd,
}


def stored_bytes(folder: Path) -> int:
    return sum(os.path.getsize(p) for p in files_under(folder))
