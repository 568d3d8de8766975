"""The TensorStore kvstore backend against our native files backend and the raw disk, and,
with ``--s3``, against a local S3 server (moto, in its own process) with boto3's
``upload_file`` / ``download_file`` of the same bytes as that server's ceiling.

    python -m benchmarks.bench_objectstore [--size 256MiB] [--repeat 5] [--s3] [--dir SCRATCH]
                                           [--object-mib 32] [--threads N]

The state: fp32 tensors of random values (incompressible), saved with ``compression=None``
so every row moves the same bytes. Each repetition runs every contender once, in rotating
order; the table shows medians and the median of the per-repetition ratios.

Local rows (same scratch folder, every write fsync'd inside its timing, page cache dropped
before every timed read):

  raw disk          one file: sequential write + fsync; read back
  native            CheckpointManager(path).save → committed; restore
  kvstore file      CheckpointManager({"driver": "file", "path": ...}): TensorStore's file driver

S3 rows (``--s3``; ``moto_server`` on 127.0.0.1 in a subprocess, so it does not share our GIL):

  kvstore s3        CheckpointManager("s3://bucket/run").save → committed; restore
  boto3             upload_file / download_file of one file holding the same bytes
                    (multipart, boto3's default TransferConfig: 8 MiB parts, 10 threads), and
                    put_object / get_object of that file in one request each

Figures are for this machine only; moto keeps objects in its process's memory, so the S3
rows measure the client stack and the HTTP path, not a real object store's network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from async_ckpt import CheckpointManager, CheckpointManagerOptions
from benchmarks._ceilings import files_under
from benchmarks.bench_native import ceiling_read, ceiling_write, drop_cache, parse_size


def make_state(nbytes: int) -> dict:
    g = torch.Generator().manual_seed(0)
    per = 16 << 20
    n = max(1, nbytes // per)
    sizes = [per] * n
    sizes[-1] += nbytes - per * n
    return {"model": {f"w{i}": torch.rand(s // 4, generator=g) for i, s in enumerate(sizes)}}


def fresh_like(state: dict) -> dict:
    return {"model": {k: torch.empty_like(v) for k, v in state["model"].items()}}


def state_bytes(state: dict) -> np.ndarray:
    return np.concatenate([v.numpy().view(np.uint8) for v in state["model"].values()])


def options(threads: int) -> CheckpointManagerOptions:
    return CheckpointManagerOptions(compression=None, io_threads=threads, max_to_keep=None, handle_sigterm=False)


class ManagerRows:
    """save (to committed) and restore through one long-lived CheckpointManager, as in training
    (and as benchmarks/_ours.py): an untimed first save allocates the staging buffer;
    rotation is off and each step is deleted after its restore, outside the timings."""

    def __init__(self, name: str, target: Any, threads: int, local_dir: Optional[Path] = None) -> None:
        self.name = name
        self.local_dir = local_dir
        self.mgr = CheckpointManager(target, options(threads))
        self.step = 0

    def warm_up(self, state: dict) -> None:
        self.step += 1
        self.mgr.save(self.step, state)
        self.mgr.delete(self.step)

    def save(self, state: dict) -> float:
        self.step += 1
        t0 = time.perf_counter()
        self.mgr.save(self.step, state)
        return time.perf_counter() - t0

    def restore(self, state: dict) -> float:
        into = fresh_like(state)
        if self.local_dir is not None:
            drop_cache(files_under(self.local_dir))
        t0 = time.perf_counter()
        got = self.mgr.restore(into, step=self.step)
        took = time.perf_counter() - t0
        assert got == self.step, (self.name, got)
        for k, v in state["model"].items():
            assert torch.equal(into["model"][k], v), (self.name, k)
        self.mgr.delete(self.step)
        return took

    def close(self) -> None:
        self.mgr.close()


class RawDisk:
    name = "raw disk (one file, buffered write + fsync; read)"

    def __init__(self, folder: Path, data: np.ndarray) -> None:
        self.folder, self.data = folder, data
        self.path = folder / "raw.bin"

    def save(self, state: dict) -> float:
        if self.path.exists():
            self.path.unlink()
        return ceiling_write(str(self.path), self.data, direct=False)

    def restore(self, state: dict) -> float:
        drop_cache([str(self.path)])
        return ceiling_read(str(self.path), np.empty_like(self.data), direct=False)


class Boto3:
    name = "boto3 upload_file / download_file"

    def __init__(self, endpoint: str, bucket: str, folder: Path, data: np.ndarray) -> None:
        import boto3

        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                   aws_access_key_id="bench", aws_secret_access_key="bench")
        self.bucket = bucket
        self.src = folder / "upload.bin"
        self.dst = folder / "download.bin"
        data.tofile(self.src)

    def save(self, state: dict) -> float:
        t0 = time.perf_counter()
        self.client.upload_file(str(self.src), self.bucket, "boto3/state.bin")
        return time.perf_counter() - t0

    def restore(self, state: dict) -> float:
        if self.dst.exists():
            self.dst.unlink()
        t0 = time.perf_counter()
        self.client.download_file(self.bucket, "boto3/state.bin", str(self.dst))
        return time.perf_counter() - t0


class Boto3Single(Boto3):
    name = "boto3 put_object / get_object (one request)"

    def save(self, state: dict) -> float:
        t0 = time.perf_counter()
        with open(self.src, "rb") as f:
            self.client.put_object(Bucket=self.bucket, Key="boto3/single.bin", Body=f)
        return time.perf_counter() - t0

    def restore(self, state: dict) -> float:
        t0 = time.perf_counter()
        body = self.client.get_object(Bucket=self.bucket, Key="boto3/single.bin")["Body"].read()
        took = time.perf_counter() - t0
        assert len(body) == self.src.stat().st_size
        return took


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto_server did not start (pip install 'moto[server]')")


def run(contenders: list, state: dict, repeat: int) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {c.name: {"save": [], "restore": []} for c in contenders}
    for c in contenders:
        if isinstance(c, ManagerRows):
            c.warm_up(state)
    for rep in range(repeat):
        order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
        for c in order:
            times[c.name]["save"].append(c.save(state))
            times[c.name]["restore"].append(c.restore(state))
        print(f"  repetition {rep + 1}/{repeat} done", file=sys.stderr, flush=True)
    return times


def table(times: dict, nbytes: int, base: str, title: str) -> str:
    mib = nbytes / (1 << 20)
    lines = [f"### {title}", "",
             f"| contender | save s (MiB/s) | restore s (MiB/s) | save ÷ {base} | restore ÷ {base} |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, t in times.items():
        row = [name]
        for op in ("save", "restore"):
            m = statistics.median(t[op])
            row.append(f"{m:.3f} ({mib / m:.0f})")
        for op in ("save", "restore"):
            ratios = [a / b for a, b in zip(t[op], times[base][op])]
            row.append(f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}–{max(ratios):.2f}]")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=parse_size, default=parse_size("256MiB"))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--s3", action="store_true", help="also against a local moto S3 server, with boto3 as the ceiling")
    p.add_argument("--dir", default=None, help="scratch folder (default: a new temp folder)")
    p.add_argument("--object-mib", type=float, default=32.0, help="raw MiB per data object (kvstore backend)")
    p.add_argument("--threads", type=int, default=max(2, min(8, os.cpu_count() or 2)))
    args = p.parse_args(argv)
    os.environ["ASYNC_CKPT_KV_OBJECT_MB"] = str(args.object_mib)
    scratch = Path(tempfile.mkdtemp(prefix="bench-objectstore-", dir=args.dir))
    state = make_state(args.size)
    data = state_bytes(state)
    print(f"state {args.size / (1 << 20):.0f} MiB fp32 (incompressible), compression=None, io_threads={args.threads}, "
          f"{args.object_mib:g} MiB objects, median of {args.repeat}; ratio columns: median [min-max] of the "
          f"per-repetition ratios\n", flush=True)
    try:
        local: list = [RawDisk(scratch, data)]
        try:
            local.append(ManagerRows("native (local path)", str(scratch / "native"), args.threads, scratch / "native"))
            local.append(ManagerRows("kvstore file driver", {"driver": "file", "path": str(scratch / "ts")},
                                     args.threads, scratch / "ts"))
            print(table(run(local, state, args.repeat), args.size, local[1].name, "local disk"), flush=True)
        finally:
            for c in local[1:]:
                c.close()
        if args.s3:
            proc, endpoint = start_moto()
            try:
                os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                                  AWS_ENDPOINT_URL_S3=endpoint)
                import boto3

                bucket = f"bench-{uuid.uuid4().hex[:12]}"
                boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
                remote: list = [Boto3(endpoint, bucket, scratch, data), Boto3Single(endpoint, bucket, scratch, data)]
                try:
                    remote.append(ManagerRows("kvstore s3 (ours)", f"s3://{bucket}/run", args.threads))
                    print()
                    print(table(run(remote, state, args.repeat), args.size, remote[0].name,
                                f"local S3 server (moto_server at {endpoint})"), flush=True)
                finally:
                    for c in remote[2:]:
                        c.close()
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
