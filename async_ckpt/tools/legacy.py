"""Recognise and read checkpoints written by other tools, without ever running their code.

Three layouts are understood:

* ``hf_trainer`` — a Hugging Face ``Trainer`` ``checkpoint-N`` folder: ``config.json``,
  ``model.safetensors`` / ``pytorch_model.bin`` (or sharded with ``*.index.json``),
  ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth`` /
  ``rng_state_K.pth``, ``trainer_state.json`` and tokenizer files;
* ``accelerate`` — an Accelerate ``save_state`` folder: ``model.safetensors``,
  ``optimizer.bin``, ``scheduler.bin``, ``sampler.bin``, ``random_states_K.pkl``;
* ``torch_file`` — one ``torch.save`` file holding model/optimizer/scheduler keys.

Safety rule: ``.pt/.pth/.bin/.pkl`` files are read only through :func:`safe_torch_load`
(``torch.load(weights_only=True)`` with a minimal numpy allowlist); safetensors through
the safetensors package; JSON through :mod:`json`. Nothing here imports ``pickle``.
``training_args.bin`` (a pickled Python object by design) is never opened.

Everything here is read-only; ``fix`` turns the result of :func:`load_state` into a
committed step with ``saving.write_checkpoint``.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import FormatError, UnsafeFileError
from ..format.manifest import ItemEntry
from ..format.names import COMMIT_NAME, MANIFEST_NAME, parse_step_dir

HF_TRAINER = "hf_trainer"
ACCELERATE = "accelerate"
TORCH_FILE = "torch_file"
LAYOUT_NAMES = {HF_TRAINER: "Hugging Face Trainer checkpoint", ACCELERATE: "Accelerate save_state folder",
                TORCH_FILE: "single torch.save file"}

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json")
NEVER_LOADED = ("training_args.bin",)   # a pickled TrainingArguments object: code, not data

_RNG_HF = re.compile(r"^rng_state(?:_(\d+))?\.pth$")
_RNG_ACC = re.compile(r"^random_states_(\d+)\.pkl$")
_TRAILING_INT = re.compile(r"(\d+)(?:\.[A-Za-z]+)?$")

# Keys a single torch.save file conventionally uses for each component.
_FILE_KEYS = {
    "model": ("model", "model_state_dict", "state_dict", "module", "net"),
    "optimizer": ("optimizer", "optimizer_state_dict", "optim", "opt"),
    "scheduler": ("scheduler", "lr_scheduler", "scheduler_state_dict", "lr_scheduler_state_dict", "sched"),
    "scaler": ("scaler", "grad_scaler", "scaler_state_dict"),
    "rng": ("rng", "rng_state", "rng_states", "random_states"),
    "data": ("sampler", "data", "dataloader", "data_state"),
}
_PROGRESS_KEYS = ("step", "global_step", "epoch", "iteration", "iter", "loss", "best_loss", "best_metric")


# ----------------------------------------------------------------------------- safe loading

def _numpy_allowlist() -> list:
    """The smallest set of numpy globals RNG states and numeric arrays need.

    Files pickled under numpy 1.x name ``numpy.core.multiarray.*``; numpy 2 moved them to
    ``numpy._core``: both spellings are mapped onto the same (real) functions.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allow: list = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    for modname in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allow.append((core.multiarray._reconstruct, f"{modname}._reconstruct"))
        allow.append((core.multiarray.scalar, f"{modname}.scalar"))
    # Unpickling a dtype BUILDs an instance of its per-dtype class (numpy.dtypes.UInt32DType ...).
    for code in "?bBhHiIlLqQefdgFDG":
        allow.append(type(np.dtype(code)))
    return allow


def safe_torch_load(path: Path, *, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with only the numpy allowlist added; never plain pickle.

    Raises :class:`UnsafeFileError` when the file holds anything the weights-only
    unpickler refuses (a pickled class, a function call...) or is not loadable at all.
    """
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_allowlist()):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        if mmap and "mmap" in str(e):
            return safe_torch_load(path, mmap=False)   # legacy (non-zip) files cannot be mapped
        msg = str(e).strip().splitlines()
        detail = next((line.strip() for line in msg if "GLOBAL" in line or "Unsupported" in line),
                      msg[0] if msg else type(e).__name__)
        raise UnsafeFileError(f"{Path(path).name}: not loadable as weights only ({detail[:300]})") from None


def check_torch_file(path: Path, quick: bool) -> Any:
    """Integrity of a torch.save file: zip CRCs of every record (unless quick), then a
    weights-only load with storages mapped, not read. Returns the object; raises UnsafeFileError."""
    if zipfile.is_zipfile(path):
        if not quick:
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise UnsafeFileError(f"{path.name}: damaged zip archive ({e})") from None
            if bad is not None:
                raise UnsafeFileError(f"{path.name}: CRC mismatch in record {bad}")
        return safe_torch_load(path, mmap=True)
    return safe_torch_load(path)


def check_safetensors(path: Path, quick: bool) -> int:
    """Validate a safetensors file's header (and read every tensor unless quick). Returns tensor count."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            if not quick:
                for k in keys:
                    f.get_tensor(k)
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, TypeError for exotic dtypes
        if "dtype" in str(e).lower() and not quick:
            # numpy cannot hold bfloat16/fp8: fall back to the torch view of the same bytes
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = list(f.keys())
                    for k in keys:
                        f.get_tensor(k)
                return len(keys)
            except Exception as e2:  # noqa: BLE001
                e = e2
        raise UnsafeFileError(f"{path.name}: invalid safetensors file ({e})") from None
    return len(keys)


def load_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as e:  # noqa: BLE001
        raise UnsafeFileError(f"{path.name}: invalid safetensors file ({e})") from None


MAX_JSON_BYTES = 256 << 20
MAX_SIDE_FILE_BYTES = 1 << 30     # config and tokenizer files copied into a converted step


def read_file(path: Path, cap: int = MAX_SIDE_FILE_BYTES) -> bytes:
    """A regular file's bytes, never following a symlink or blocking on a FIFO."""
    from ..storage.native_files import read_regular_file

    try:
        return read_regular_file(str(path), cap, path.name)
    except (FormatError, OSError) as e:
        raise UnsafeFileError(f"{path.name}: unreadable ({e})") from None


def read_json(path: Path) -> Any:
    """A JSON file of another tool: any failure (huge integers, deep nesting, bad UTF-8, a
    FIFO) is an UnsafeFileError naming the file."""
    data = read_file(path, MAX_JSON_BYTES)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: JSONDecodeError and integers over Python's digit limit
        raise UnsafeFileError(f"{path.name}: not valid JSON ({str(e)[:200]})") from None


def _depth(node: Any, limit: int) -> bool:
    """Whether ``node`` nests at most ``limit`` levels (iteratively: no recursion limit)."""
    stack = [(node, 0)]
    while stack:
        n, d = stack.pop()
        if isinstance(n, (dict, list)):
            if d >= limit:
                return False
            stack.extend((v, d + 1) for v in (n.values() if isinstance(n, dict) else n))
    return True


def weight_map_shards(index: Any, name: str) -> list[str]:
    """The shard files an ``*.index.json`` names; UnsafeFileError when it is not a
    ``{"weight_map": {tensor: file name}}`` object."""
    wm = index.get("weight_map", {}) if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise UnsafeFileError(f"{name}: weight_map must map tensor names to file names")
    return sorted(set(wm.values()))


# ----------------------------------------------------------------------------- detection

@dataclass
class LegacyCheckpoint:
    """What was found at ``path``: the layout, the step and the files behind each component.

    ``components`` maps a kind (``model``, ``optimizer``, ``scheduler``, ``progress``,
    ``rng``, ``config``, ``tokenizer``, ``data``, ``scaler``, ``other``) to file names
    relative to ``path`` (for a single file: the keys inside it, filled by :func:`check`).
    """

    path: Path
    layout: str
    step: int | None
    components: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)    # file → why (found while detecting)

    @property
    def description(self) -> str:
        return LAYOUT_NAMES[self.layout]


def _step_from_name(name: str) -> int | None:
    step = parse_step_dir(name)
    if step is not None:
        return step
    m = _TRAILING_INT.search(name)
    return int(m.group(1)) if m else None


def detect(path: Path) -> LegacyCheckpoint | None:
    """The legacy checkpoint at ``path``, or None when it is not one (or is ours)."""
    path = Path(path)
    if path.is_symlink():
        return None
    if path.is_file():
        if path.suffix.lower() in TORCH_SUFFIXES and path.name not in NEVER_LOADED:
            return LegacyCheckpoint(path, TORCH_FILE, _step_from_name(path.stem))
        return None
    if not path.is_dir():
        return None
    names = {p.name for p in path.iterdir() if p.is_file() and not p.is_symlink()}
    if MANIFEST_NAME in names or COMMIT_NAME in names:
        return None
    comps: dict[str, list[str]] = {}

    def add(kind: str, files: list[str]) -> None:
        if files:
            comps.setdefault(kind, []).extend(sorted(files))

    index = [n for n in INDEX_FILES if n in names]
    shards: list[str] = []
    unreadable: dict[str, str] = {}
    for n in index:
        try:
            shards.extend(weight_map_shards(read_json(path / n), n))
        except UnsafeFileError as e:
            unreadable[n] = str(e)
    add("model", index + [n for n in WEIGHT_FILES if n in names] + [s for s in shards if s in names]
        + sorted(n for n in names if re.match(r"^(model|pytorch_model)_\d+\.(safetensors|bin)$", n)))
    add("config", [n for n in CONFIG_FILES if n in names])
    add("tokenizer", [n for n in TOKENIZER_FILES if n in names])
    add("progress", [n for n in ("trainer_state.json",) if n in names])
    add("optimizer", [n for n in names if re.match(r"^optimizer(_\d+)?\.(pt|bin)$", n)])
    add("scheduler", [n for n in names if re.match(r"^(scheduler|lr_scheduler)(_\d+)?\.(pt|bin)$", n)])
    add("scaler", [n for n in ("scaler.pt",) if n in names])
    add("rng", [n for n in names if _RNG_HF.match(n) or _RNG_ACC.match(n)])
    add("data", [n for n in names if re.match(r"^sampler(_\d+)?\.bin$", n)])
    add("other", [n for n in names if re.match(r"^custom_checkpoint_\d+\.pkl$", n)])
    if not comps or set(comps) <= {"config", "tokenizer"}:
        return None
    accelerate = any(re.match(r"^(optimizer|scheduler|sampler)(_\d+)?\.bin$|^random_states_\d+\.pkl$", n)
                     for n in names)
    hf = ("trainer_state.json" in names or any(re.match(r"^(optimizer|scheduler)\.pt$|^rng_state", n)
                                               for n in names))
    if not (accelerate or hf or "model" in comps):
        return None
    layout = ACCELERATE if accelerate and not hf else HF_TRAINER
    ckpt = LegacyCheckpoint(path, layout, _step_from_name(path.name), comps,
                            sorted(n for n in NEVER_LOADED if n in names), unreadable)
    missing = [s for s in shards if s not in names]
    if missing:
        comps["missing_shards"] = missing
    return ckpt


# ----------------------------------------------------------------------------- checking

@dataclass
class FileProblem:
    file: str
    kind: str
    message: str


def _classify_file_keys(obj: Any) -> dict[str, list[str]]:
    """Which components a single torch.save file's top-level dict holds."""
    comps: dict[str, list[str]] = {}
    if not isinstance(obj, dict):
        return {"other": ["<object>"]}
    import torch

    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": ["<state_dict>"]}
    used: set = set()
    for kind, keys in _FILE_KEYS.items():
        for k in keys:
            if k in obj and k not in used:
                comps.setdefault(kind, []).append(k)
                used.add(k)
    progress = [k for k in _PROGRESS_KEYS if k in obj]
    if progress:
        comps["progress"] = progress
        used.update(progress)
    other = [str(k) for k in obj if k not in used]
    if other:
        comps["other"] = other
    return comps


def check(ckpt: LegacyCheckpoint, quick: bool = False) -> list[FileProblem]:
    """Read every file of ``ckpt`` the safe way and report what cannot be read.

    For a single torch file this also fills ``ckpt.components`` from its keys.
    """
    problems: list[FileProblem] = []
    if ckpt.layout == TORCH_FILE:
        try:
            obj = check_torch_file(ckpt.path, quick)
        except UnsafeFileError as e:
            problems.append(FileProblem(ckpt.path.name, "model", str(e)))
            return problems
        ckpt.components = _classify_file_keys(obj)
        if ckpt.step is None or not _TRAILING_INT.search(ckpt.path.stem):
            step = _file_step(obj)
            ckpt.step = step if step is not None else ckpt.step
        return problems
    for shard in ckpt.components.get("missing_shards", []):
        problems.append(FileProblem(shard, "model", f"{shard}: listed in the index but missing"))
    for kind, files in ckpt.components.items():
        if kind == "missing_shards":
            continue
        for name in files:
            p = ckpt.path / name
            if name in ckpt.unreadable:
                problems.append(FileProblem(name, kind, ckpt.unreadable[name]))
                continue
            try:
                if name == "trainer_state.json":
                    check_trainer_state(read_json(p))
                elif name.endswith(".json"):
                    read_json(p)
                elif name.endswith(".safetensors"):
                    check_safetensors(p, quick)
                elif name.endswith((".pt", ".pth", ".bin", ".pkl")):
                    check_torch_file(p, quick)
            except UnsafeFileError as e:
                problems.append(FileProblem(name, kind, str(e)))
    return problems


def check_trainer_state(ts: Any) -> None:
    """What conversion needs of ``trainer_state.json``: an object that the typed tree can hold."""
    from ..format.tree import MAX_DEPTH

    if not isinstance(ts, dict):
        raise UnsafeFileError(f"trainer_state.json: expected an object, found {type(ts).__name__}")
    if not _depth(ts, MAX_DEPTH - 8):
        raise UnsafeFileError(f"trainer_state.json: nests deeper than {MAX_DEPTH - 8} levels")


def _file_step(obj: Any) -> int | None:
    if isinstance(obj, dict):
        for k in ("global_step", "step", "iteration", "iter"):
            v = obj.get(k)
            if type(v) is int and v >= 0:
                return v
    return None


# ----------------------------------------------------------------------------- conversion

@dataclass
class Conversion:
    """A state mapping ready for ``saving.write_checkpoint`` plus what the user must be told."""

    step: int
    state: dict[str, Any]
    item_meta: dict[str, ItemEntry]
    notes: list[str]


def _rng_from_any(obj: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """Map HF / Accelerate / our own RNG dicts onto the manager's layout
    ``{"python", "numpy", "torch", "cuda"}``; returns (state, missing stream names)."""
    import torch

    if not isinstance(obj, dict):
        return None, ["python", "numpy", "torch"]
    aliases = {"python": ("python", "random_state"),
               "numpy": ("numpy", "numpy_random_seed"),
               "torch": ("torch", "cpu", "torch_manual_seed"),
               "cuda": ("cuda", "torch_cuda_manual_seed")}
    out: dict[str, Any] = {}
    for ours, names in aliases.items():
        for n in names:
            if n in obj and obj[n] is not None:
                out[ours] = obj[n]
                break
    cuda = out.get("cuda", [])
    if isinstance(cuda, torch.Tensor):
        cuda = [cuda]
    out["cuda"] = [torch.as_tensor(c, dtype=torch.uint8) for c in cuda]
    if "python" in out:
        v = out["python"]
        out["python"] = (int(v[0]), tuple(int(x) for x in v[1]), v[2])
    if "numpy" in out:
        v = out["numpy"]
        out["numpy"] = (str(v[0]), v[1], int(v[2]), int(v[3]), float(v[4]))
    missing = [k for k in ("python", "numpy", "torch") if k not in out]
    return out, missing


def _float(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (bools, strings, ints beyond float range)."""
    if type(value) not in (int, float):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _progress_from_trainer_state(ts: Any, step: int) -> tuple[dict[str, Any], list[str]]:
    notes = []
    progress: dict[str, Any] = {"step": step}
    if not isinstance(ts, dict):
        return progress, ["trainer_state.json is not an object; only the step is kept"]
    gs = ts.get("global_step")
    if type(gs) is int:
        progress["global_step"] = gs
        if gs != step:
            notes.append(f"trainer_state.json says global_step {gs}, the folder says {step}")
    epoch = _float(ts.get("epoch"))
    if epoch is not None:
        progress["epoch"] = epoch
    history = ts.get("log_history")
    if isinstance(history, list):
        progress["loss_history"] = [[e.get("step") if type(e.get("step")) is int else None, loss]
                                    for e in history if isinstance(e, dict)
                                    and (loss := _float(e.get("loss"))) is not None]
    progress["trainer_state"] = ts
    return progress, notes


def _text(path: Path) -> str:
    try:
        return read_file(path).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnsafeFileError(f"{path.name}: not UTF-8 text ({e})") from None


def _load_model_files(ckpt: LegacyCheckpoint) -> dict[str, Any]:
    weights: dict[str, Any] = {}
    for name in ckpt.components.get("model", []):
        p = ckpt.path / name
        if name.endswith(".json"):
            continue
        part = load_safetensors(p) if name.endswith(".safetensors") else safe_torch_load(p)
        if not isinstance(part, dict):
            raise UnsafeFileError(f"{name}: expected a dict of tensors, found {type(part).__name__}")
        weights.update(part)
    return weights


def load_state(ckpt: LegacyCheckpoint, seed: int,
               derive_rng: Callable[[int, int], dict[str, Any]] | None = None) -> Conversion:
    """Everything readable in ``ckpt`` as a manager-style state mapping.

    Items: ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``progress``, ``rng``,
    ``config`` (file name → text), ``tokenizer`` (file name → bytes), ``data``. RNG
    streams that are missing are derived from (seed, step) and marked reconstructed;
    a missing ``trainer_state.json`` leaves a progress item with the step only, also
    marked reconstructed. Raises UnsafeFileError when a needed file is unreadable.
    """
    if derive_rng is None:
        from ..rng import derived as derive_rng
    notes: list[str] = []
    state: dict[str, Any] = {}
    meta: dict[str, ItemEntry] = {}
    src = ckpt.path.name

    if ckpt.layout == TORCH_FILE:
        obj = safe_torch_load(ckpt.path)
        comps = _classify_file_keys(obj)
        step = ckpt.step if ckpt.step is not None else (_file_step(obj) or 0)
        if "<state_dict>" in comps.get("model", []):
            obj = {"model": obj}
            comps = {"model": ["model"]}
        for kind in ("model", "optimizer", "scheduler", "scaler", "data"):
            if kind in comps:
                key = comps[kind][0]
                state[kind] = obj[key]
                meta[kind] = ItemEntry(kind, f"{src}[{key!r}]")
        progress = {"step": step}
        for k in comps.get("progress", []):
            progress[k] = obj[k]
        state["progress"] = progress
        meta["progress"] = ItemEntry("progress", f"{src} (step keys)",
                                     reconstructed=not comps.get("progress"))
        rng_obj = obj[comps["rng"][0]] if "rng" in comps else None
        for k in comps.get("other", []):
            if k in obj:
                state.setdefault("extra", {})[k] = obj[k]
        if "extra" in state:
            meta["extra"] = ItemEntry("other", f"{src} (other keys)")
    else:
        step = ckpt.step if ckpt.step is not None else 0
        comps = ckpt.components
        if comps.get("missing_shards"):
            raise UnsafeFileError(f"model shards missing: {', '.join(comps['missing_shards'])}")
        if "model" in comps:
            state["model"] = _load_model_files(ckpt)
            meta["model"] = ItemEntry("model", f"{src}/{', '.join(comps['model'])}")
        for kind in ("optimizer", "scheduler", "scaler", "data"):
            files = comps.get(kind, [])
            if files:
                state[kind] = safe_torch_load(ckpt.path / files[0])
                meta[kind] = ItemEntry(kind, f"{src}/{files[0]}")
                if len(files) > 1:
                    notes.append(f"{kind}: {len(files)} files, converted {files[0]} only "
                                 f"(one {kind} per state mapping)")
        if "progress" in comps:
            ts = read_json(ckpt.path / "trainer_state.json")
            check_trainer_state(ts)
            state["progress"], more = _progress_from_trainer_state(ts, step)
            notes += more
            meta["progress"] = ItemEntry("progress", f"{src}/trainer_state.json")
        else:
            state["progress"] = {"step": step}
            meta["progress"] = ItemEntry("progress", "step from the folder name", reconstructed=True)
            notes.append(f"training state: step {step} from the name; epoch and loss history are lost")
        if "config" in comps:
            state["config"] = {n: _text(ckpt.path / n) for n in comps["config"]}
            meta["config"] = ItemEntry("config", f"{src}/{', '.join(comps['config'])}")
        if "tokenizer" in comps:
            state["tokenizer"] = {n: read_file(ckpt.path / n) for n in comps["tokenizer"]}
            meta["tokenizer"] = ItemEntry("tokenizer", f"{src} tokenizer files")
        for name in comps.get("other", []):
            state.setdefault("extra", {})[name] = safe_torch_load(ckpt.path / name)
            meta["extra"] = ItemEntry("other", f"{src} custom checkpoints")
        rng_files = sorted(comps.get("rng", []), key=lambda n: int(re.sub(r"\D", "", n) or 0))
        rng_obj = safe_torch_load(ckpt.path / rng_files[0]) if rng_files else None
        if len(rng_files) > 1:
            notes.append(f"RNG: {len(rng_files)} per-process files, kept {rng_files[0]} (process 0)")
        for skipped in ckpt.skipped:
            notes.append(f"{skipped}: not converted (a pickled Python object, never loaded)")

    rng, missing = _rng_from_any(rng_obj) if rng_obj is not None else (None, ["python", "numpy", "torch"])
    if rng is None or missing:
        derived = derive_rng(seed, step)
        rng = {**derived, **(rng or {})}
        if missing == ["python", "numpy", "torch"]:
            notes.append(f"RNG states: none saved; derived from seed {seed} and step {step} (reconstructed)")
        else:
            notes.append(f"RNG states: {', '.join(missing)} missing; derived from seed {seed} and step {step}")
    state["rng"] = rng
    meta["rng"] = ItemEntry("rng", "RNG states" if not missing else f"derived from seed {seed}",
                            reconstructed=bool(missing))
    return Conversion(step, state, meta, notes)
