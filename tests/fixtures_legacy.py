"""Builders for checkpoints written the way other tools write them (tests only).

Every file is produced with the tools' own writers where we have them (torch.save,
safetensors, json); the hostile and numpy-1.x files are crafted without ever being
loaded. Nothing here reads a pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import stat
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 6)
        self.drop = torch.nn.Dropout(0.1)
        self.fc2 = torch.nn.Linear(6, 3)

    def forward(self, x):  # noqa: D401 - a model
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def trained(seed: int = 0, steps: int = 3):
    """A tiny model, AdamW (with moments) and a StepLR scheduler after a few steps."""
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        sched.step()
    return model, opt, sched


def fresh():
    """Objects of the same shapes with different values, to restore into."""
    torch.manual_seed(1234)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9)
    return model, opt, sched


# ----------------------------------------------------------------------------- hostile / old pickles

class _Evil:
    """Pickles to a call of os.system: would create ``sentinel`` if it were ever unpickled."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def malicious_torch_file(path: Path, sentinel: Path, zip_format: bool = True) -> None:
    """A torch.save file whose pickle calls os.system("touch sentinel") when loaded unsafely."""
    torch.save({"state": {}, "param_groups": [], "evil": _Evil(sentinel)}, path,
               _use_new_zipfile_serialization=zip_format)


class _NumPy1Pickler(pickle._Pickler):
    """Writes ndarray reconstruction the way numpy 1.x named it: numpy.core.multiarray."""

    def save_global(self, obj, name=None):
        core = getattr(np, "_core", np.core)
        if obj is core.multiarray._reconstruct:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _NumPy1PickleModule:
    __name__ = "numpy1_pickle"
    Pickler = _NumPy1Pickler


def numpy1_torch_save(obj: Any, path: Path) -> None:
    """torch.save ``obj`` as if numpy 1.x had been installed when it was written."""
    torch.save(obj, path, pickle_module=_NumPy1PickleModule)


def hf_rng_state(seed: int = 7) -> dict:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    random.random(), np.random.rand(), torch.rand(1)   # move the streams off their seeds
    return {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()}


# ----------------------------------------------------------------------------- layouts

def hf_checkpoint(root: Path, step: int, *, rng: str | None = "normal", weights: str = "safetensors",
                  trainer_state: bool = True, optimizer: bool = True, scheduler: bool = True,
                  tokenizer: bool = True, config: bool = True, malicious: str | None = None,
                  sentinel: Path | None = None, seed: int = 0) -> dict:
    """A Hugging Face Trainer ``checkpoint-<step>`` folder. ``rng`` is "normal", "numpy1" or None;
    ``weights`` "safetensors", "bin" or "sharded"; ``malicious`` names a file to replace with a
    hostile pickle. Returns the objects and RNG dict that were saved."""
    model, opt, sched = trained(seed)
    d = Path(root) / f"checkpoint-{step}"
    d.mkdir(parents=True)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    elif weights == "bin":
        torch.save(sd, d / "pytorch_model.bin")
    else:
        keys = sorted(sd)
        half = len(keys) // 2
        shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
        weight_map = {}
        for fname, ks in shards.items():
            save_file({k: sd[k] for k in ks}, str(d / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in ks})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config:
        (d / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 6}))
        (d / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    if tokenizer:
        (d / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {"a": 0}}}))
        (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
        (d / "tokenizer.model").write_bytes(bytes(range(256)))
    if optimizer:
        torch.save(opt.state_dict(), d / "optimizer.pt")
    if scheduler:
        torch.save(sched.state_dict(), d / "scheduler.pt")
    torch.save({"scale": torch.tensor(1024.0), "growth_factor": 2.0}, d / "scaler.pt")
    rng_state = hf_rng_state(seed + 7)
    if rng == "normal":
        torch.save(rng_state, d / "rng_state.pth")
    elif rng == "numpy1":
        numpy1_torch_save(rng_state, d / "rng_state.pth")
    if trainer_state:
        (d / "trainer_state.json").write_text(json.dumps({
            "global_step": step, "epoch": 1.5, "best_metric": None,
            "log_history": [{"step": 10, "loss": 2.5, "epoch": 0.5}, {"step": 20, "loss": 1.75, "epoch": 1.0},
                            {"step": 20, "eval_loss": 1.9}],
        }))
    # training_args.bin is a pickled TrainingArguments: stand in with a hostile pickle, it must never load
    if sentinel is not None:
        malicious_torch_file(d / "training_args.bin", sentinel)
    if malicious is not None:
        assert sentinel is not None
        malicious_torch_file(d / malicious, sentinel)
    return {"path": d, "model": model, "optimizer": opt, "scheduler": sched, "rng": rng_state}


def accelerate_folder(path: Path, *, seed: int = 0, rng: bool = True, steps: int = 3) -> dict:
    """An Accelerate ``save_state`` folder (model.safetensors, optimizer.bin, scheduler.bin,
    random_states_0.pkl); the scheduler's position (``last_epoch``) is ``steps``."""
    model, opt, sched = trained(seed, steps=steps)
    d = Path(path)
    d.mkdir(parents=True)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    torch.save(opt.state_dict(), d / "optimizer.bin")
    torch.save(sched.state_dict(), d / "scheduler.bin")
    st = hf_rng_state(seed + 3)
    states = {"step": 0, "random_state": st["python"], "numpy_random_seed": st["numpy"],
              "torch_manual_seed": st["cpu"], "torch_cuda_manual_seed": []}
    if rng:
        torch.save(states, d / "random_states_0.pkl")
    return {"path": d, "model": model, "optimizer": opt, "scheduler": sched, "rng": st}


def torch_file(path: Path, *, step: int = 40, seed: int = 0) -> dict:
    """A single torch.save file with model/optimizer/scheduler/epoch/step keys."""
    model, opt, sched = trained(seed)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": 2, "step": step}, path)
    return {"path": Path(path), "model": model, "optimizer": opt, "scheduler": sched}


def accelerate_project(root: Path, steps: tuple[int, ...] = (2, 5)) -> dict:
    """An Accelerate project dir with automatic checkpoint naming: ``checkpoints/checkpoint_K``
    for K = 0, 1, ... whose scheduler has stepped ``steps[K]`` times."""
    out = {}
    for k, n in enumerate(steps):
        out[n] = accelerate_folder(Path(root) / "checkpoints" / f"checkpoint_{k}", seed=k, steps=n)
    return out


def lightning_file(path: Path, *, step: int = 8, epoch: int = 1, seed: int = 0) -> dict:
    """A file laid out as Lightning's ``TorchCheckpointIO`` writes one (no Lightning needed)."""
    model, opt, sched = trained(seed, steps=step)
    ckpt = {"epoch": epoch, "global_step": step, "pytorch-lightning_version": "2.6.6",
            "state_dict": model.state_dict(), "loops": {"fit_loop": {"epoch_progress": {"current": epoch}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_path": ""}},
            "optimizer_states": [opt.state_dict()], "lr_schedulers": [sched.state_dict()]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return {"path": Path(path), "model": model, "optimizer": opt, "scheduler": sched}


def tree_fingerprint(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (root included, symlinks not followed): type, size,
    mtime_ns, mode, a folder's names and the sha256 of a file's bytes. Equal before and
    after = untouched."""
    root = Path(root)

    def entry(p: Path) -> tuple:
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            return ("file", st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode),
                    hashlib.sha256(p.read_bytes()).hexdigest())
        if stat.S_ISDIR(st.st_mode):
            return ("dir", st.st_mtime_ns, stat.S_IMODE(st.st_mode), tuple(sorted(os.listdir(p))))
        return ("other", st.st_mode, st.st_mtime_ns)

    out = {".": entry(root)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = entry(p)
    return out


def assert_equal(a, b, path="") -> None:
    """Bitwise equality of nested state dicts (tensors, numbers, lists, dicts)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)
