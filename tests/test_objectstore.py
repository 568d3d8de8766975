"""Checkpoints in object stores through TensorStore, against a real S3 server (moto's, over
HTTP on 127.0.0.1; tests/s3_server.py): round trip, exact resume, rotation, transient and
permanent errors, a server that goes away mid-save, a writer killed mid-upload, a corrupted
object, verify and fix on URLs, memory bounds, two ranks. The storage contract suite
(tests/test_storage_contract.py) runs the same backend on S3, TensorStore's memory
driver and its file driver.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import tracemalloc
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorstore")

from async_ckpt import CheckpointManager, CheckpointManagerOptions, ChecksumError  # noqa: E402
from async_ckpt.errors import SaveError, StorageError  # noqa: E402
from async_ckpt.storage import open_root  # noqa: E402
from async_ckpt.storage.kvstore import endpoint_override, spec_for_url, split_spec  # noqa: E402
from async_ckpt.tools import fix, verify  # noqa: E402
from s3_server import s3_server  # noqa: E402,F401 - the session's S3 server fixture

ROOT = Path(__file__).resolve().parent.parent


def opts(**kw) -> CheckpointManagerOptions:
    kw.setdefault("handle_sigterm", False)
    kw.setdefault("io_threads", 2)
    kw.setdefault("chunk_bytes", 1 << 16)
    return CheckpointManagerOptions(**kw)


@pytest.fixture
def bucket(s3_server):
    return s3_server.new_bucket()


@pytest.fixture
def small_objects(monkeypatch):
    """64 KiB data objects, so a small state spans several of them."""
    monkeypatch.setenv("ASYNC_CKPT_KV_OBJECT_MB", "0.0625")


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setenv("ASYNC_CKPT_KV_ATTEMPTS", "3")
    monkeypatch.setenv("ASYNC_CKPT_KV_BACKOFF_S", "0.01")


@pytest.fixture
def no_hook(s3_server):
    yield
    s3_server.hook = None
    if not s3_server.running:
        s3_server.start()


def model_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(256, 192)
    return {"model": model, "progress": {"step": seed}}


def weights(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state["model"].state_dict().items()}


def assert_weights(state: dict, want: dict) -> None:
    got = state["model"].state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


# ----------------------------------------------------------------------------- round trip


def test_round_trip_layout_and_verify_verdicts_match_local_disk(s3_server, bucket, small_objects, tmp_path):
    url = f"s3://{bucket}/run"
    state = model_state(1)
    with CheckpointManager(url, opts(compression="zstd")) as mgr:
        assert mgr.directory == url
        mgr.save(1, state)
        assert mgr.all_steps() == [1]
    keys = s3_server.keys(bucket)
    data = [k for k in keys if "/data-r0-" in k]
    assert {k.rsplit("/", 1)[1] for k in keys} - {k.rsplit("/", 1)[1] for k in data} == {"COMMIT", "manifest.json"}
    assert len(data) >= 3 and all(k.startswith("run/checkpoint-1/") for k in keys)
    # the manifest names every object with its exact size
    client = s3_server.client()
    manifest = json.loads(client.get_object(Bucket=bucket, Key="run/checkpoint-1/manifest.json")["Body"].read())
    sizes = {f["path"]: f["size"] for f in manifest["files"]}
    assert sizes == {k.rsplit("/", 1)[1]: client.head_object(Bucket=bucket, Key=k)["ContentLength"] for k in data}

    fresh = model_state(2)
    with CheckpointManager(url, opts()) as mgr:
        assert mgr.restore(fresh) == 1
    assert_weights(fresh, weights(model_state(1)))
    assert fresh["progress"] == {"step": 1}

    # the same state on local disk gets the same verdict and exit code
    with CheckpointManager(tmp_path / "local", opts(compression="zstd")) as mgr:
        mgr.save(1, model_state(1))
    remote, local = verify.check_path(url), verify.check_path(tmp_path / "local")
    assert remote.restore_step == local.restore_step == 1
    assert (remote.verdict, remote.steps[0].verdict) == (local.verdict, local.steps[0].verdict) == ("PARTIAL",) * 2
    step = remote.steps[0]
    assert step.committed and step.crc_checked and not step.bad_chunks and not step.problems
    with redirect_stdout(io.StringIO()):
        assert verify.main([url, "--json"]) == verify.main([str(tmp_path / "local"), "--json"]) == 1
        assert verify.main([url + "/checkpoint-1", "--deep"]) == 1


def test_dict_spec_and_url_reach_the_same_objects(s3_server, bucket):
    spec = {"driver": "s3", "bucket": bucket, "path": "nested/run"}
    with CheckpointManager(spec, opts()) as mgr:
        assert mgr.directory == f"s3://{bucket}/nested/run"
        mgr.save(5, model_state(5))
    fresh = model_state(0)
    with CheckpointManager(f"s3://{bucket}/nested/run/", opts()) as mgr:
        assert mgr.all_steps() == [5] and mgr.restore(fresh) == 5
    assert_weights(fresh, weights(model_state(5)))


def test_tensorstore_file_driver_writes_what_the_native_reader_verifies(tmp_path):
    """Same format: a step written through TensorStore's file driver verifies and restores
    through the native files backend, byte for byte."""
    with CheckpointManager({"driver": "file", "path": str(tmp_path / "run")}, opts(compression="zstd")) as mgr:
        assert mgr.directory == f"file://{tmp_path / 'run'}"
        mgr.save(3, model_state(3))
    report = verify.check_path(tmp_path / "run")             # a plain local path: the native reader
    assert report.restore_step == 3 and report.steps[0].crc_checked and not report.steps[0].bad_chunks
    fresh = model_state(0)
    with CheckpointManager(tmp_path / "run", opts()) as mgr:
        assert mgr.restore(fresh) == 3
    assert_weights(fresh, weights(model_state(3)))


# ----------------------------------------------------------------------------- resume and rotation


def _train(model, opt, sched, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 32)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _setup(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def test_exact_resume_through_s3_model_and_adamw_bitwise(s3_server, bucket):
    url = f"s3://{bucket}/run"
    model, opt, sched = _setup(0)
    straight = _train(model, opt, sched, 12)
    want_model, want_opt = model.state_dict(), opt.state_dict()

    model, opt, sched = _setup(0)
    first = _train(model, opt, sched, 6)
    with CheckpointManager(url, opts()) as mgr:
        mgr.save_async(6, {"model": model, "optimizer": opt, "scheduler": sched, "progress": {"step": 6}})
    del model, opt, sched

    model, opt, sched = _setup(123)            # different init and RNG: restore must overwrite both
    progress: dict = {}
    with CheckpointManager(url, opts()) as mgr:
        assert mgr.restore({"model": model, "optimizer": opt, "scheduler": sched, "progress": progress}) == 6
    resumed = first + _train(model, opt, sched, 6)
    assert progress == {"step": 6}
    assert resumed == straight
    for k, v in want_model.items():
        assert torch.equal(model.state_dict()[k], v), k
    got_opt = opt.state_dict()
    for i, s in want_opt["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got_opt["state"][i][k], s[k]), (i, k)


def test_demo_killed_and_resumed_through_s3_replays_the_same_losses(s3_server, bucket, tmp_path):
    """The README demo against S3 in other processes: SIGKILL after step 10 (the last commit
    is step 8), resume: steps 9 and 10 run again and give bitwise the same losses."""
    args = ["--dir", f"s3://{bucket}/run", "--loss-log", str(tmp_path / "loss.jsonl"), "--steps", "12",
            "--save-every", "4", "--dim", "16", "--block", "16", "--batch-size", "4", "--keep", "3"]
    env = dict(os.environ, PYTHONHASHSEED="0")

    def demo(*extra: str):
        return subprocess.run([sys.executable, "-m", "async_ckpt.demo", *args, *extra],
                              capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)

    crashed = demo("--crash-at", "10")
    assert crashed.returncode == -9, crashed.stderr
    resumed = demo("--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 8" in resumed.stdout
    seen: dict[int, list[str]] = {}
    for line in open(tmp_path / "loss.jsonl"):
        rec = json.loads(line)
        seen.setdefault(rec["step"], []).append(rec["loss"])
    assert sorted(seen) == list(range(12))
    assert len(seen[9]) == len(seen[10]) == 2            # run before the kill, and again after the resume
    assert all(len(set(v)) == 1 for v in seen.values()), seen
    with CheckpointManager(f"s3://{bucket}/run", opts()) as mgr:
        assert mgr.all_steps()[-1] == 11


def test_rotation_deletes_the_objects_of_dropped_steps(s3_server, bucket, small_objects):
    url = f"s3://{bucket}/run"
    with CheckpointManager(url, opts(max_to_keep=2)) as mgr:
        for step in range(1, 6):
            mgr.save(step, model_state(step))
        assert mgr.all_steps() == [4, 5]
    prefixes = {k.split("/")[1] for k in s3_server.keys(bucket)}
    assert prefixes == {"checkpoint-4", "checkpoint-5"}
    with CheckpointManager(url, opts(max_to_keep=2)) as mgr:
        assert mgr.all_steps() == [4, 5]


# ----------------------------------------------------------------------------- failures


def test_transient_errors_are_retried(s3_server, bucket, small_objects, quick_retries, no_hook):
    injected = {"PUT": 0, "GET": 0}
    lock = threading.Lock()

    def hook(method, path):
        with lock:
            if method == "PUT" and "/data-r0-" in path and injected["PUT"] < 2:
                injected["PUT"] += 1
                return 503
            if method == "GET" and path.endswith("/manifest.json") and injected["GET"] < 1:
                injected["GET"] += 1
                return 500
        return None

    s3_server.hook = hook
    with CheckpointManager(f"s3://{bucket}/run", opts()) as mgr:
        mgr.save(1, model_state(1))
        fresh = model_state(0)
        assert mgr.restore(fresh) == 1
    assert injected == {"PUT": 2, "GET": 1}
    assert_weights(fresh, weights(model_state(1)))


def test_a_permanent_error_fails_the_save_naming_the_object(s3_server, bucket, small_objects, no_hook):
    refused = []

    def hook(method, path):
        if method == "PUT" and "/checkpoint-2/data-r0-" in path:
            refused.append(path)
            return 403
        return None

    url = f"s3://{bucket}/run"
    with CheckpointManager(url, opts()) as mgr:
        mgr.save(1, model_state(1))
        s3_server.hook = hook
        with pytest.raises(SaveError) as info:
            mgr.save(2, model_state(2))
        s3_server.hook = None
        assert mgr.all_steps() == [1]
    err = info.value.__cause__
    while err is not None and not isinstance(err, StorageError):
        err = err.__cause__ or err.__context__
    assert isinstance(err, StorageError), info.value
    assert err.filename.startswith(f"s3://{bucket}/run/checkpoint-2/data-r0-") and "AccessDenied" in str(err)
    assert len(refused) <= 2            # no retries: one PUT per worker at most
    assert not [k for k in s3_server.keys(bucket) if "checkpoint-2" in k]     # the failed save was removed


def test_server_stopped_mid_save_fails_cleanly_and_the_earlier_step_restores(s3_server, bucket, small_objects,
                                                                           quick_retries, no_hook):
    url = f"s3://{bucket}/run"
    stopped = threading.Event()

    def hook(method, path):
        if method == "PUT" and "/checkpoint-2/data-r0-" in path and not stopped.is_set():
            stopped.set()
            threading.Thread(target=s3_server.stop).start()
        return None

    with CheckpointManager(url, opts()) as mgr:
        mgr.save(1, model_state(1))
        s3_server.hook = hook
        with pytest.raises(SaveError) as info:
            mgr.save(2, model_state(2))
        assert stopped.is_set() and not s3_server.running
        s3_server.hook = None
        s3_server.start()
    chain, err = [], info.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(e, StorageError) and "checkpoint-2" in (e.filename or "") for e in chain), chain

    fresh = model_state(0)
    with CheckpointManager(url, opts()) as mgr:      # the coordinator cleans the leftover on open
        assert mgr.all_steps() == [1]
        assert mgr.restore(fresh) == 1
    assert_weights(fresh, weights(model_state(1)))
    assert not [k for k in s3_server.keys(bucket) if "checkpoint-2" in k]


_WRITER = """
import sys, torch
from async_ckpt import CheckpointManager, CheckpointManagerOptions
torch.manual_seed(1)
model = torch.nn.Linear(256, 192)
opts = CheckpointManagerOptions(handle_sigterm=False, io_threads=2, chunk_bytes=1 << 16)
with CheckpointManager(sys.argv[1], opts) as mgr:
    mgr.save(1, {"model": model, "progress": {"step": 1}})
    print("committed 1", flush=True)
    with torch.no_grad():
        model.weight.add_(1.0)
    mgr.save(2, {"model": model, "progress": {"step": 2}})
    print("committed 2", flush=True)
"""


@pytest.mark.parametrize("fault", ["mid_write:2", "after_manifest:2"])
def test_sigkilled_writer_commits_nothing_and_its_leftover_is_cleaned(s3_server, bucket, fault):
    url = f"s3://{bucket}/run"
    env = dict(os.environ, ASYNC_CKPT_FAULT=fault, ASYNC_CKPT_KV_OBJECT_MB="0.0625")
    proc = subprocess.run([sys.executable, "-c", _WRITER, url], capture_output=True, text=True, env=env,
                          timeout=240, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.split("\n")[:1] == ["committed 1"] and "committed 2" not in proc.stdout
    left = [k.rsplit("/", 1)[1] for k in s3_server.keys(bucket, "run/checkpoint-2/")]
    assert any(n.startswith("data-r0-") for n in left) and "COMMIT" not in left
    assert ("manifest.json" in left) == fault.startswith("after_manifest")

    report = verify.check_path(url)
    assert report.restore_step == 1
    assert [(s.name, s.verdict) for s in report.steps] == [("checkpoint-2", "UNCOMMITTED"), ("checkpoint-1", "PARTIAL")]
    fresh = model_state(0)
    with CheckpointManager(url, opts()) as mgr:
        assert mgr.all_steps() == [1] and mgr.restore(fresh) == 1
    assert not s3_server.keys(bucket, "run/checkpoint-2/")
    assert_weights(fresh, weights(model_state(1)))


def test_a_corrupted_object_is_a_named_checksum_error(s3_server, bucket, small_objects):
    url = f"s3://{bucket}/run"
    with CheckpointManager(url, opts(compression="zstd")) as mgr:
        mgr.save(1, model_state(1))
    key = "run/checkpoint-1/data-r0-1.bin"
    client = s3_server.client()
    blob = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    blob[len(blob) // 2] ^= 0x10
    client.put_object(Bucket=bucket, Key=key, Body=bytes(blob))

    with CheckpointManager(url, opts()) as mgr:
        with pytest.raises(ChecksumError) as info:
            mgr.restore(model_state(0))
    assert info.value.path == f"s3://{bucket}/{key}"
    report = verify.check_path(url)
    step = report.steps[0]
    assert report.verdict == step.verdict == "CORRUPT"
    assert step.bad_chunks and {b.file for b in step.bad_chunks} == {"data-r0-1.bin"}
    assert all("crc32c mismatch" in b.error for b in step.bad_chunks)
    out = io.StringIO()
    with redirect_stdout(out):
        assert verify.main([url]) == 2
        assert fix.main([url, "--quarantine"]) == 2     # nothing committed is left: UNCOMMITTED/empty
    assert "quarantine it" in out.getvalue()
    with CheckpointManager(url, opts()) as mgr:
        assert mgr.all_steps() == [] and mgr.restore(model_state(0)) is None
    names = {k.split("/")[1] for k in s3_server.keys(bucket)}
    assert len(names) == 1 and names.pop().startswith("checkpoint-1.corrupt-")


# ----------------------------------------------------------------------------- the command-line tools


def test_verify_and_fix_take_the_endpoint_option(s3_server, bucket, monkeypatch):
    url = f"s3://{bucket}/run"
    with CheckpointManager(url, opts()) as mgr:
        mgr.save(1, model_state(1))
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="run/checkpoint-2/data-r0-0.bin", Body=b"partial")   # a crashed save
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")     # wrong: --endpoint must win
    ep = ["--endpoint", s3_server.endpoint]
    out = io.StringIO()
    with redirect_stdout(out):
        assert verify.main([url, "--json", *ep]) == 1
        doc = json.loads(out.getvalue())
        assert doc["restore_step"] == 1 and [s["verdict"] for s in doc["steps"]] == ["UNCOMMITTED", "PARTIAL"]
        assert fix.main([url, "--dry-run", *ep]) == 1
        assert "remove checkpoint-2: leftover of a crashed save" in out.getvalue()
        assert s3_server.keys(bucket, "run/checkpoint-2/")
        assert fix.main([url, *ep]) == 1
        assert fix.main([url, *ep]) == 1
    text = out.getvalue()
    assert "nothing to fix" in text
    assert not s3_server.keys(bucket, "run/checkpoint-2/")
    assert s3_server.keys(bucket, "run/.backup/checkpoint-2/") == ["run/.backup/checkpoint-2/data-r0-0.bin"]


def test_urls_specs_and_the_aws_environment(monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(k, raising=False)
    spec, root, name = spec_for_url("s3", "bkt/a/b/", "s3://bkt/a/b/")
    assert (spec, root, name) == ({"driver": "s3", "bucket": "bkt"}, "a/b", "bkt")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    spec, _, _ = spec_for_url("s3", "bkt", "s3://bkt")
    assert spec == {"driver": "s3", "bucket": "bkt", "endpoint": "http://generic:1", "aws_region": "eu-west-3",
                    "aws_credentials": {"type": "environment"}}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert spec_for_url("s3", "bkt", "")[0]["endpoint"] == "http://s3-only:2"
    assert spec_for_url("s3", "bkt", "")[0]["aws_region"] == "ap-south-1"
    with endpoint_override("http://flag:3"):
        assert spec_for_url("s3", "bkt", "")[0]["endpoint"] == "http://flag:3"
        # an explicit endpoint in a dict spec wins over everything
        assert split_spec({"driver": "s3", "bucket": "b", "endpoint": "http://dict:4", "path": "x"})[0]["endpoint"] \
            == "http://dict:4"
    assert spec_for_url("gs", "bkt/run", "gs://bkt/run")[:2] == ({"driver": "gcs", "bucket": "bkt"}, "run")
    assert split_spec({"driver": "file", "path": "/tmp/x/"}) == ({"driver": "file", "path": "/"}, "tmp/x")
    for bad in ("s3:///run", "gs://", "ts-memory://"):
        with pytest.raises(ValueError):
            open_root(bad)
    with pytest.raises(ValueError, match="absolute"):
        split_spec({"driver": "file", "path": "relative"})
    with pytest.raises(ValueError, match="driver"):
        open_root({"bucket": "b"})


# ----------------------------------------------------------------------------- bounds and ranks


def test_uploads_and_reads_hold_a_bounded_amount_of_python_memory(monkeypatch):
    """32 MiB of state through 1 MiB objects and two workers: the Python bytes a save or a
    restore allocates stay a few objects' worth, not a copy of the state. (TensorStore's
    memory driver: its objects live outside the Python heap, unlike an in-process moto's.)"""
    monkeypatch.setenv("ASYNC_CKPT_KV_OBJECT_MB", "1")
    state = {"w": torch.randn(8 << 20)}                 # 32 MiB
    url = "ts-memory://bounded/run"
    with CheckpointManager(url, opts(compression=None, chunk_bytes=1 << 20)) as mgr:
        tracemalloc.start()
        try:
            mgr.save(1, state)
            _, save_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            target = {"w": torch.zeros(8 << 20)}
            assert mgr.restore(target) == 1
            _, restore_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert torch.equal(target["w"], state["w"])
    assert save_peak < 6 << 20, save_peak           # two 1 MiB objects in flight (+ their parts)
    assert restore_peak < 6 << 20, restore_peak


def test_two_ranks_upload_their_own_objects_and_the_coordinator_commits(s3_server, bucket):
    from async_ckpt.pipeline.plan import plan_save
    from async_ckpt.pipeline.restore import load_items
    from async_ckpt.pipeline.saving import build_manifest, write_rank
    from async_ckpt.pipeline.snapshot import take_snapshot
    from async_ckpt.storage.commit import policy_for

    url = f"s3://{bucket}/run"
    coordinator, root = open_root(url)
    policy = policy_for(coordinator, root)
    location = policy.begin(3)
    states = [{"model": {"w": torch.full((1000,), float(r))}, "progress": {"rank": r}} for r in range(2)]
    results = [None, None]

    def rank(r: int) -> None:        # each rank has a backend of its own, as in its own process
        storage, _ = open_root(url, io_threads=2)
        plan = plan_save(states[r], 1 << 16)
        snap = take_snapshot(plan, torch.empty(max(1, plan.staging_bytes), dtype=torch.uint8))
        results[r] = write_rank(storage, location, 3, r, snap)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert policy.committed() == {}
    policy.publish(location, 3, build_manifest(3, results, {}, 0.0))
    status = policy.status_of_step(3)
    assert status.committed and status.manifest.world_size == 2
    assert {k.rsplit("/", 1)[1] for k in s3_server.keys(bucket)} >= {"data-r0-0.bin", "data-r1-0.bin", "COMMIT"}
    for r in range(2):
        got = load_items(coordinator, location, status.manifest, rank=r)
        assert torch.equal(got["model"]["w"], states[r]["model"]["w"]) and got["progress"] == {"rank": r}
