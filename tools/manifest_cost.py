"""What reading manifests costs: parse time and peak RSS for synthetic manifests, and the
time to open a root (``CheckpointManager(root)``) holding such steps.

    python tools/manifest_cost.py               # both cases
    python tools/manifest_cost.py tensors20k    # a 20k-tensor model + AdamW-like state
    python tools/manifest_cost.py zeroparts     # one array with 24M zero-length parts (hostile)
    python tools/manifest_cost.py zeroparts8m   # 8M of them: under the container cap

Each measurement runs in a fresh subprocess of a small parent, so its peak RSS (ru_maxrss)
is its own; the RSS just before the measured call (imports, the manifest's bytes) is shown
beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _tensor_node(i: int) -> dict:
    return {"$": "tensor", "array": i, "device": "cpu", "requires_grad": False}


def manifest_20k(step: int) -> bytes:
    """20k parameters (model) + exp_avg/exp_avg_sq per parameter: 60k arrays, 64 MiB chunks."""
    from async_ckpt.format.manifest import (ArrayEntry, ChunkEntry, FileEntry, ItemEntry, Manifest,
                                            RankSection)
    n = 20_000
    arrays, chunks = [], []
    cursor, chunk_raw = 0, 64 << 20
    for i in range(3 * n):
        nbytes = 4096 * 4
        ci, off = divmod(cursor, chunk_raw)
        arrays.append(ArrayEntry("torch.float32", (64, 64), nbytes, ((ci, off, nbytes),)))
        cursor += nbytes
    for ci in range(-(-cursor // chunk_raw)):
        raw = min(chunk_raw, cursor - ci * chunk_raw)
        chunks.append(ChunkEntry(0, ci * chunk_raw, raw, raw, "raw", 0, 1, 1))
    model = {"$": "dict", "keys": [f"layers.{i}.weight" for i in range(n)],
             "values": [_tensor_node(i) for i in range(n)]}
    state = {"$": "dict", "keys": list(range(n)),
             "values": [{"$": "dict", "keys": ["step", "exp_avg", "exp_avg_sq"],
                         "values": [3, _tensor_node(n + i), _tensor_node(2 * n + i)]} for i in range(n)]}
    opt = {"$": "dict", "keys": ["state", "param_groups"],
           "values": [state, {"$": "list", "v": [{"$": "dict", "keys": ["lr", "params"],
                                                  "values": [0.001, {"$": "list", "v": list(range(n))}]}]}]}
    tree = {"$": "dict", "keys": ["model", "optimizer"],
            "values": [{"$": "state", "type": "M", "v": model}, {"$": "state", "type": "O", "v": opt}]}
    items = {"model": ItemEntry("model", "M"), "optimizer": ItemEntry("optimizer", "O")}
    m = Manifest(step, "bench", time.time(), 1, {"loss": 1.0}, (FileEntry("data-r0-0.bin", cursor, 0),),
                 tuple(chunks), (RankSection(0, items, tree, tuple(arrays)),), {})
    return m.to_bytes()


def manifest_zero_parts(step: int, parts: int = 24_000_000) -> bytes:
    """The hostile case: one empty array whose parts list holds ``parts`` zero-length ranges."""
    head = {"format": "async_ckpt", "format_version": 1, "writer": "x", "step": step, "created_unix": 0,
            "world_size": 1, "metrics": {}, "files": [{"path": "data-r0-0.bin", "size": 1, "rank": 0}],
            "chunks": [{"file": 0, "offset": 0, "length": 1, "raw_length": 1, "codec": "raw", "shuffle": 0,
                        "crc32c": 0, "raw_crc32c": 0}],
            "ranks": [{"rank": 0, "items": {"model": {"kind": "model", "type": "x"}},
                       "tree": {"$": "dict", "keys": ["model"],
                                "values": [{"$": "tensor", "array": 0, "device": "cpu", "requires_grad": False}]},
                       "arrays": [{"dtype": "torch.uint8", "shape": [0], "nbytes": 0, "parts": "@@"}]}],
            "extra": {}}
    text = json.dumps(head, separators=(",", ":")).encode()
    return text.replace(b'"@@"', b"[" + b",".join([b"[0,0,0]"] * parts) + b"]")


def manifest_zero_parts_8m(step: int) -> bytes:
    """Under the reader's cap on JSON containers: parsed, then refused at the first empty part."""
    return manifest_zero_parts(step, 8_000_000)


def write_root(root: Path, make, steps=(1, 2, 3)) -> None:
    from async_ckpt.format.manifest import commit_marker_bytes
    for step in steps:
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        data = make(step)
        (d / "manifest.json").write_bytes(data)
        size = json.loads(data)["files"][0]["size"] if len(data) < (64 << 20) else 1
        with open(d / "data-r0-0.bin", "wb") as f:
            f.truncate(size)
        (d / "COMMIT").write_bytes(commit_marker_bytes(step, data))


CHILD = r"""
import resource, sys, time, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[3])
what, path, repeat = sys.argv[1], sys.argv[2], int(sys.argv[4])

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

if what == "parse":
    from async_ckpt.format.manifest import parse_manifest_bytes
    from async_ckpt.errors import FormatError
    data = open(path, "rb").read()
    def run():
        try:
            parse_manifest_bytes(data)
            return "ok"
        except FormatError as e:
            return "FormatError: " + str(e)[:120]
else:
    from async_ckpt import CheckpointManager, CheckpointManagerOptions
    def run():
        with CheckpointManager(path, CheckpointManagerOptions(handle_sigterm=False)) as m:
            return f"steps {m.all_steps()}"
before = rss_mib()
best = None
for _ in range(repeat):
    t0 = time.perf_counter()
    out = run()
    dt = time.perf_counter() - t0
    best = dt if best is None else min(best, dt)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"{best:.3f} s (best of {repeat}), peak RSS {peak:.0f} MiB ({before:.0f} MiB before the call), {out}")
"""

GEN = r"""
import sys
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[1] + "/tools")
import manifest_cost
from pathlib import Path
manifest_cost.write_root(Path(sys.argv[3]), getattr(manifest_cost, sys.argv[2]))
"""


def measure(what: str, path: Path, repeat: int) -> str:
    proc = subprocess.run([sys.executable, "-c", CHILD, what, str(path), str(REPO), str(repeat)],
                          capture_output=True, text=True, timeout=1800)
    return (proc.stdout.strip() or proc.stderr.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    # This process stays small (no torch, no manifest in memory): a child's peak RSS starts
    # from its parent's at fork, so generating here would inflate every figure.
    cases = {"tensors20k": ("manifest_20k", 3), "zeroparts": ("manifest_zero_parts", 1),
             "zeroparts8m": ("manifest_zero_parts_8m", 1)}
    for name in argv or ["tensors20k", "zeroparts"]:
        make, repeat = cases[name]
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "root"
            subprocess.run([sys.executable, "-c", GEN, str(REPO), make, str(root)], check=True, timeout=1800)
            size = (root / "checkpoint-1" / "manifest.json").stat().st_size
            print(f"{name}: manifest {size / 2**20:.1f} MiB")
            print(f"  parse_manifest_bytes:              {measure('parse', root / 'checkpoint-1' / 'manifest.json', repeat)}")
            print(f"  CheckpointManager(root), 3 steps:  {measure('open', root, repeat)}")


if __name__ == "__main__":
    main(sys.argv[1:])
