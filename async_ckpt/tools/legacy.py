"""Recognise and read checkpoints written by other tools, without ever running their code.

One checkpoint of another tool (:func:`detect`):

* ``hf_trainer`` — a Hugging Face ``Trainer`` ``checkpoint-N`` folder: ``config.json``,
  ``model.safetensors`` / ``pytorch_model.bin`` (or sharded with ``*.index.json``),
  ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth`` /
  ``rng_state_K.pth``, ``trainer_state.json`` and tokenizer files;
* ``accelerate`` — an Accelerate ``save_state`` folder: ``model.safetensors``,
  ``optimizer.bin``, ``scheduler.bin``, ``sampler.bin``, ``random_states_K.pkl``;
* ``lightning`` — a PyTorch Lightning ``.ckpt`` file (``state_dict``, ``optimizer_states``,
  ``lr_schedulers``, ``epoch``, ``global_step``, ``loops``, ``callbacks``);
* ``torch_file`` — one ``torch.save`` file holding model/optimizer/scheduler keys.

A folder holding several of them (:func:`find_root`): a Trainer output dir
(``checkpoint-N`` folders, the final model possibly at the top), an Accelerate project dir
(``checkpoints/checkpoint_N``) or its ``checkpoints`` folder, a folder of ``.ckpt`` files.
Such a folder belongs to its tool: nothing here, nor in ``fix``, ever writes into it;
converted steps go into a root of their own (:func:`default_dest`).

The step of each checkpoint comes from the tool's own records (:func:`resolve_step`), and
the report says which: ``trainer_state.json`` ``global_step``, a Lightning file's
``global_step``, the scheduler's position (``last_epoch``), Accelerate's saved step; the
name only when nothing else records it.

A Trainer folder's model gets back the tied names Hugging Face leaves out of its weight
files (GPT-2's ``lm_head.weight``), as the same array as the weight they are tied to
(:func:`tied_aliases`), so a converted step restores into a model built with
``from_config``.

Safety rule: ``.pt/.pth/.bin/.pkl/.ckpt`` files are read only through :func:`safe_torch_load`
(``torch.load(weights_only=True)`` with a minimal numpy allowlist); safetensors through
the safetensors package; JSON through :mod:`json`. Nothing here imports ``pickle``.
``training_args.bin`` (a pickled Python object by design) is never opened.

Everything here is read-only; ``fix`` turns the result of :func:`load_state` into a
committed step with ``saving.write_state``.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import FormatError, UnsafeFileError
from ..format.manifest import ItemEntry
from ..format.names import COMMIT_NAME, MANIFEST_NAME, parse_step_dir, step_of_any

HF_TRAINER = "hf_trainer"
ACCELERATE = "accelerate"
LIGHTNING = "lightning"
TORCH_FILE = "torch_file"
LAYOUT_NAMES = {HF_TRAINER: "Hugging Face Trainer checkpoint", ACCELERATE: "Accelerate save_state folder",
                LIGHTNING: "Lightning checkpoint file", TORCH_FILE: "single torch.save file"}

# Folders holding several checkpoints of a tool (find_root).
HF_OUTPUT = "hf_output_dir"
ACCELERATE_PROJECT = "accelerate_project"
LIGHTNING_DIR = "lightning_dir"
MIXED_DIR = "legacy_dir"
ROOT_NAMES = {HF_OUTPUT: "Hugging Face Trainer output dir", ACCELERATE_PROJECT: "Accelerate project dir",
              LIGHTNING_DIR: "folder of Lightning checkpoints", MIXED_DIR: "folder of other tools' checkpoints"}
DEST_SUFFIX = ".async_ckpt"

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
_ACC_DIR = re.compile(r"checkpoint_(\d{1,19})")          # Accelerate's automatic checkpoint naming
_LIGHTNING_KEYS = ("pytorch-lightning_version", "optimizer_states", "lr_schedulers", "loops")

# Keys a single torch.save file conventionally uses for each component.
_FILE_KEYS = {
    "model": ("model", "model_state_dict", "state_dict", "module", "net"),
    "optimizer": ("optimizer", "optimizer_state_dict", "optim", "opt", "optimizer_states"),
    "scheduler": ("scheduler", "lr_scheduler", "scheduler_state_dict", "lr_scheduler_state_dict", "sched",
                  "lr_schedulers"),
    "scaler": ("scaler", "grad_scaler", "scaler_state_dict"),
    "rng": ("rng", "rng_state", "rng_states", "random_states"),
    "data": ("sampler", "data", "dataloader", "data_state"),
}
_PROGRESS_KEYS = ("step", "global_step", "epoch", "iteration", "iter", "loss", "best_loss", "best_metric")
_STEP_KEYS = ("global_step", "step", "iteration", "iter")


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
    ``step`` is the name's number until :func:`resolve_step` (run by :func:`check` and
    :func:`load_state`) reads the tool's own records; ``step_source`` then says where it
    came from.
    """

    path: Path
    layout: str
    step: int | None
    components: dict[str, list[str]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)    # file → why (found while detecting)
    step_source: str = ""

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
            layout = LIGHTNING if path.suffix.lower() == ".ckpt" else TORCH_FILE   # check() reads the keys
            return LegacyCheckpoint(path, layout, _step_from_name(path.stem))
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


# ----------------------------------------------------------------------------- folders of several checkpoints

@dataclass
class LegacyRoot:
    """A folder another tool keeps several checkpoints in (never written to by this package).

    ``entries``: the checkpoints, as paths (folders or ``.ckpt`` files), in name order.
    ``ours``: names of entries in our layout found there (left alone). ``home``: the folder
    the default destination is named after (an Accelerate ``checkpoints`` folder's project
    dir, else ``path``). ``listed``: folders the tool itself lists, where nothing may be added.
    """

    path: Path
    layout: str
    entries: list[Path]
    home: Path
    listed: list[Path]
    ours: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return ROOT_NAMES[self.layout]

    def name_of(self, entry: Path) -> str:
        """An entry's name relative to the folder (``checkpoint-500``, ``checkpoints/checkpoint_3``)."""
        return str(Path(os.path.abspath(entry)).relative_to(os.path.abspath(self.path)))


def _is_ours_dir(path: Path) -> bool:
    return os.path.lexists(path / MANIFEST_NAME) or os.path.lexists(path / COMMIT_NAME)


def _scan(folder: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(layout, path) of every checkpoint of another tool directly inside ``folder``, and the
    names of entries in our layout. Symlinks are never followed nor counted."""
    found: list[tuple[str, Path]] = []
    ours: list[str] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return [], []
    for e in entries:
        p = Path(e.path)
        if e.is_symlink():
            continue
        if e.is_file(follow_symlinks=False):
            if e.name.endswith(".ckpt"):
                found.append((LIGHTNING, p))
            continue
        if not e.is_dir(follow_symlinks=False):
            continue
        if parse_step_dir(e.name) is not None or _ACC_DIR.fullmatch(e.name):
            if _is_ours_dir(p):
                ours.append(e.name)
                continue
            ck = detect(p)
            if ck is not None:
                found.append((ck.layout, p))
        elif step_of_any(e.name) is not None:
            ours.append(e.name)          # a crashed save's tmp folder or a quarantined step of ours
    return found, ours


def find_root(path: Path) -> LegacyRoot | None:
    """The folder at ``path`` when it holds checkpoints of other tools (see the module doc),
    whatever else is at its top (a Trainer's final ``save_model`` output, logs); else None."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or _is_ours_dir(path):
        return None
    found, ours = _scan(path)
    listed = [path]
    accelerate_dir = path / "checkpoints"
    nested: list[tuple[str, Path]] = []
    if accelerate_dir.is_dir() and not accelerate_dir.is_symlink():
        nested = [(lay, p) for lay, p in _scan(accelerate_dir)[0] if _ACC_DIR.fullmatch(p.name)]
    if nested:
        listed.append(accelerate_dir)
        found += nested
    if not found:
        return None
    layouts = {lay for lay, _ in found}
    if nested and layouts <= {ACCELERATE, HF_TRAINER}:
        layout = ACCELERATE_PROJECT
    elif layouts == {LIGHTNING}:
        layout = LIGHTNING_DIR
    elif layouts == {HF_TRAINER} and all(parse_step_dir(p.name) is not None for _, p in found):
        layout = HF_OUTPUT
    elif all(_ACC_DIR.fullmatch(p.name) for _, p in found):
        layout = ACCELERATE_PROJECT
    else:
        layout = MIXED_DIR
    home = path
    if layout == ACCELERATE_PROJECT and not nested and path.name == "checkpoints":
        home = path.parent         # Accelerate's own checkpoints folder: name the project
    root = LegacyRoot(path, layout, sorted((p for _, p in found), key=lambda p: str(p)), home, listed, ours)
    top = detect(path)
    if top is not None and "model" in top.components:
        weights = ", ".join(n for n in top.components["model"] if not n.endswith(".json"))
        root.notes.append(f"{weights} at the top: a final model (save_model), not a training checkpoint; "
                          "left as it is (from_pretrained reads it)")
    if ours:
        root.notes.append(f"{', '.join(ours)}: in our layout inside another tool's folder; fix leaves "
                          "them alone (it never writes into another tool's folder)")
    return root


def root_of(path: Path) -> LegacyRoot | None:
    """The folder of other tools' checkpoints that lists the checkpoint ``path``, if any."""
    path = Path(os.path.abspath(path))
    root = find_root(path.parent)
    if root is not None and path in [Path(os.path.abspath(p)) for p in root.entries]:
        return root
    return None


def default_dest(home: Path) -> Path:
    """Where ``fix`` converts the checkpoints of ``home`` (a tool's folder or one checkpoint)
    by default: a new root beside it, ``<home>.async_ckpt``; never inside it."""
    home = Path(os.path.abspath(home))
    return home.parent / (home.name + DEST_SUFFIX)


def dest_problem(dest: Path, entries: list[Path], listed: list[Path], folder: Path | None = None) -> str | None:
    """Why ``dest`` may not receive the steps converted from ``entries`` (checkpoints of
    another tool, in ``folder``), or None. It must not be ``folder`` itself, lie inside a
    checkpoint, or be a name the tool lists in one of the ``listed`` folders (``checkpoint-*``
    in a Trainer output dir, anything in Accelerate's ``checkpoints``, ``*.ckpt``), and it
    must not hold another tool's checkpoints."""
    dest = Path(os.path.abspath(dest))
    if folder is not None and dest == Path(os.path.abspath(folder)):
        return f"{dest} is the source folder itself"
    for src in entries:
        src = Path(os.path.abspath(src))
        if dest == src or src in dest.parents:
            return f"{dest} is {'the source' if dest == src else 'inside the source'} {src}"
    for tool_dir in listed:
        tool_dir = Path(os.path.abspath(tool_dir))
        if dest == tool_dir:
            return f"{dest} is the folder the source tool keeps its checkpoints in"
        if tool_dir in dest.parents:
            first = dest.relative_to(tool_dir).parts[0]
            if first.startswith("checkpoint") or first.endswith(".ckpt") or tool_dir.name == "checkpoints":
                return (f"{dest} is inside {tool_dir} under a name the source tool lists as one of its "
                        "checkpoints (it would pick, rotate or trip over it); choose a folder outside it")
    if os.path.lexists(dest) and (dest.is_symlink() or not dest.is_dir()):
        return f"{dest} exists and is not a directory"
    if dest.is_dir() and (find_root(dest) is not None or detect(dest) is not None):
        return f"{dest} holds checkpoints of another tool"
    return None


# ----------------------------------------------------------------------------- checking

@dataclass
class FileProblem:
    file: str
    kind: str
    message: str


def _empty(value: Any) -> bool:
    return isinstance(value, (list, tuple, dict)) and not value


def _is_lightning(obj: Any) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and any(k in obj for k in _LIGHTNING_KEYS)


def _classify_file_keys(obj: Any) -> dict[str, list[str]]:
    """Which components a single torch.save file's top-level dict holds (an empty
    ``optimizer_states`` / ``lr_schedulers`` list, as Lightning writes without an
    optimizer, holds none)."""
    comps: dict[str, list[str]] = {}
    if not isinstance(obj, dict):
        return {"other": ["<object>"]}
    import torch

    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": ["<state_dict>"]}
    used: set = set()
    for kind, keys in _FILE_KEYS.items():
        for k in keys:
            if k in obj and k not in used and not (kind != "model" and _empty(obj[k])):
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

    For a single torch file this also fills ``ckpt.components`` from its keys and tells a
    Lightning checkpoint from another ``torch.save`` file. Resolves the step from the
    tool's own records (:func:`resolve_step`).
    """
    problems: list[FileProblem] = []
    if ckpt.layout in (TORCH_FILE, LIGHTNING):
        try:
            obj = check_torch_file(ckpt.path, quick)
        except UnsafeFileError as e:
            problems.append(FileProblem(ckpt.path.name, "model", str(e)))
            return problems
        ckpt.layout = LIGHTNING if _is_lightning(obj) else TORCH_FILE
        ckpt.components = _classify_file_keys(obj)
        resolve_step(ckpt, obj)
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
    resolve_step(ckpt)
    return problems


def check_trainer_state(ts: Any) -> None:
    """What conversion needs of ``trainer_state.json``: an object that the typed tree can hold."""
    from ..format.tree import MAX_DEPTH

    if not isinstance(ts, dict):
        raise UnsafeFileError(f"trainer_state.json: expected an object, found {type(ts).__name__}")
    if not _depth(ts, MAX_DEPTH - 8):
        raise UnsafeFileError(f"trainer_state.json: nests deeper than {MAX_DEPTH - 8} levels")


def _count(value: Any) -> int | None:
    """A step count: a non-negative int (never a bool, a float or a string)."""
    return value if type(value) is int and value >= 0 else None


def _scheduler_position(sched: Any) -> int | None:
    """``last_epoch`` of a scheduler state dict (or of the first in a list): how many times
    ``scheduler.step()`` ran, i.e. optimizer steps for a per-step schedule."""
    if isinstance(sched, (list, tuple)) and sched:
        sched = sched[0]
    return _count(sched.get("last_epoch")) if isinstance(sched, dict) else None


def _file_step(obj: Any, name: str) -> tuple[int | None, str]:
    """The step a torch.save / Lightning file records, and where it came from."""
    if not isinstance(obj, dict):
        return None, ""
    for k in _STEP_KEYS:
        if _count(obj.get(k)) is not None:
            return obj[k], f"{name}[{k!r}]"
    for k in _FILE_KEYS["scheduler"]:
        pos = _scheduler_position(obj.get(k))
        if pos is not None:
            return pos, f"{name}[{k!r}] last_epoch (the scheduler's position)"
    return None, ""


def _name_step(name: str, what: str) -> tuple[int | None, str]:
    step = _step_from_name(name)
    return (step, f"the {what} name") if step is not None else (None, "")


def _records_step(ckpt: LegacyCheckpoint, obj: Any) -> tuple[int, str]:
    name = ckpt.path.name
    if ckpt.layout in (TORCH_FILE, LIGHTNING):
        step, source = _file_step(obj, name)
        if step is None:
            step, source = _name_step(ckpt.path.stem, "file")
        if step is None and isinstance(obj, dict) and _count(obj.get("epoch")) is not None:
            step, source = obj["epoch"], f"{name}['epoch'] (no step recorded: the epoch stands in)"
        return (step, source) if step is not None else (0, "no step recorded anywhere: 0")
    if ckpt.layout == HF_TRAINER and "trainer_state.json" in ckpt.components.get("progress", []):
        try:
            ts = read_json(ckpt.path / "trainer_state.json")
        except UnsafeFileError:
            ts = None             # check() reports it
        gs = _count(ts.get("global_step")) if isinstance(ts, dict) else None
        if gs is not None:
            named = _step_from_name(name)
            also = f" (the folder name says {named})" if named is not None and named != gs else ""
            return gs, f"trainer_state.json global_step{also}"
    if ckpt.layout == ACCELERATE:
        for fname in ckpt.components.get("scheduler", [])[:1]:
            try:
                pos = _scheduler_position(safe_torch_load(ckpt.path / fname))
            except UnsafeFileError:
                pos = None
            if pos is not None:
                return pos, f"{fname} last_epoch (the scheduler's position)"
        rng_files = sorted(n for n in ckpt.components.get("rng", []) if _RNG_ACC.match(n))
        for fname in rng_files[:1]:
            try:
                states = safe_torch_load(ckpt.path / fname)
            except UnsafeFileError:
                states = None
            saved = _count(states.get("step")) if isinstance(states, dict) else None
            if saved:      # accelerator.step: 0 unless gradient accumulation counted it
                return saved, f"{fname} step (accelerator.step)"
        step, _ = _name_step(name, "folder")
        if step is not None:
            return step, (f"the folder name ({name}: Accelerate's save counter, not a training step; "
                          "nothing else records the step)")
        return 0, "no step recorded anywhere: 0"
    step, source = _name_step(name, "folder")
    return (step, source) if step is not None else (0, "no step recorded anywhere: 0")


def resolve_step(ckpt: LegacyCheckpoint, obj: Any = None) -> None:
    """Set ``ckpt.step`` from the tool's own records and ``ckpt.step_source`` to where it
    came from. Order: a Trainer's ``trainer_state.json`` ``global_step``; a file's
    ``global_step``/``step``/``iteration``, then its scheduler's ``last_epoch``, its name,
    its ``epoch``; an Accelerate folder's scheduler position, then ``accelerator.step``,
    then the folder's save counter; else the name; else 0. ``obj``: a file's loaded dict."""
    ckpt.step, ckpt.step_source = _records_step(ckpt, obj)


# ----------------------------------------------------------------------------- conversion

@dataclass
class Conversion:
    """A state mapping ready for ``saving.write_checkpoint`` plus what the user must be told."""

    step: int
    state: dict[str, Any]
    item_meta: dict[str, ItemEntry]
    notes: list[str]
    step_source: str = ""


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
            notes.append(f"trainer_state.json says global_step {gs}; the step is {step}")
    epoch = _float(ts.get("epoch"))
    if epoch is not None:
        progress["epoch"] = epoch
    history = ts.get("log_history")
    if isinstance(history, list):
        progress["loss_history"] = [[e.get("step") if type(e.get("step")) is int else None, loss]
                                    for e in history if isinstance(e, dict)
                                    and (loss := _float(e.get("loss"))) is not None]
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


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_WEIGHT_NAME = re.compile(r"[A-Za-z0-9_.]{1,512}")


def tied_aliases(config: Any, weights: dict[str, Any]) -> tuple[dict[str, str], str]:
    """The weights a transformers model ties to another and Hugging Face therefore leaves out
    of its weight files (GPT-2: ``lm_head.weight`` is ``transformer.wte.weight``), among the
    names ``weights`` lacks: ``{alias: stored name}``, and a note when none could be looked up.

    Read from the class attribute ``_tied_weights_keys`` of the architecture ``config.json``
    names, looked up in the installed transformers package only (no model is built, no code
    from the checkpoint runs); a config with ``tie_word_embeddings: false`` ties nothing."""
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not (isinstance(archs, list) and archs and isinstance(archs[0], str) and _IDENT.fullmatch(archs[0])):
        return {}, ""
    if config.get("tie_word_embeddings") is False:
        return {}, ""
    try:
        import transformers

        cls = getattr(transformers, archs[0], None)
        base = transformers.PreTrainedModel
    except Exception:  # noqa: BLE001 - not installed, or a broken install: nothing to look up
        return {}, (f"tied weights of {archs[0]} not looked up (transformers is not importable): "
                    "restore into model.state_dict() rather than the model")
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return {}, f"{archs[0]} is not a transformers model class: no tied weights added"
    keys = getattr(cls, "_tied_weights_keys", None)
    out: dict[str, str] = {}
    if isinstance(keys, dict):
        for alias, stored in keys.items():
            if (isinstance(alias, str) and isinstance(stored, str) and _WEIGHT_NAME.fullmatch(alias)
                    and _WEIGHT_NAME.fullmatch(stored) and alias not in weights and stored in weights):
                out[alias] = stored
    return out, ""


def _one_or_list(values: list[Any]) -> Any:
    """Lightning keeps optimizers and schedulers in lists: one becomes the item itself (so
    ``restore({"optimizer": opt})`` works), several stay a list (``[opt_a, opt_b]``)."""
    return values[0] if len(values) == 1 else list(values)


def _finish_rng(state: dict[str, Any], meta: dict[str, ItemEntry], notes: list[str], rng_obj: Any,
                seed: int, step: int, derive_rng: Callable[[int, int], dict[str, Any]]) -> None:
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


def _load_file(ckpt: LegacyCheckpoint, state: dict[str, Any], meta: dict[str, ItemEntry],
               notes: list[str]) -> Any:
    """A torch.save or Lightning file's items; returns its RNG object (or None)."""
    src = ckpt.path.name
    obj = safe_torch_load(ckpt.path)
    resolve_step(ckpt, obj)
    step = ckpt.step
    if _is_lightning(obj):
        ckpt.layout = LIGHTNING
        state["model"] = obj["state_dict"]
        meta["model"] = ItemEntry("model", f"{src}['state_dict']")
        for key, item in (("optimizer_states", "optimizer"), ("lr_schedulers", "scheduler")):
            values = obj.get(key)
            if isinstance(values, (list, tuple)) and values:
                state[item] = _one_or_list(list(values))
                meta[item] = ItemEntry(item, f"{src}[{key!r}]" + ("[0]" if len(values) == 1 else ""))
                if len(values) > 1:
                    notes.append(f"{item}: {len(values)} in {key}, kept as a list (restore into a list of "
                                 f"{len(values)}, in the order configure_optimizers returns them)")
        progress = {"step": step}
        for k in ("global_step", "epoch"):
            if _count(obj.get(k)) is not None:
                progress[k] = obj[k]
        state["progress"] = progress
        meta["progress"] = ItemEntry("progress", f"{src} global_step/epoch; step from {ckpt.step_source}",
                                     reconstructed="global_step" not in progress)
        rest = {k: v for k, v in obj.items() if k not in ("state_dict", "optimizer_states", "lr_schedulers")}
        if rest:
            state["lightning"] = rest
            meta["lightning"] = ItemEntry("other", f"{src}: loops, callbacks, hyper-parameters, version")
        notes.append("RNG: Lightning checkpoints hold no RNG state")
        return None
    comps = _classify_file_keys(obj)
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
    meta["progress"] = ItemEntry("progress", f"{src} (step keys); step from {ckpt.step_source}",
                                 reconstructed=not comps.get("progress"))
    for k in comps.get("other", []):
        if k in obj:
            state.setdefault("extra", {})[k] = obj[k]
    if "extra" in state:
        meta["extra"] = ItemEntry("other", f"{src} (other keys)")
    return obj[comps["rng"][0]] if "rng" in comps else None


def _load_folder(ckpt: LegacyCheckpoint, state: dict[str, Any], meta: dict[str, ItemEntry],
                 notes: list[str]) -> Any:
    """A Trainer or Accelerate folder's items; returns its RNG object (or None)."""
    src = ckpt.path.name
    comps = ckpt.components
    if comps.get("missing_shards"):
        raise UnsafeFileError(f"model shards missing: {', '.join(comps['missing_shards'])}")
    if not ckpt.step_source:
        resolve_step(ckpt)
    step = ckpt.step if ckpt.step is not None else 0
    if "model" in comps:
        weights = _load_model_files(ckpt)
        meta_src = f"{src}/{', '.join(comps['model'])}"
        if "config.json" in comps.get("config", []):
            aliases, why = tied_aliases(read_json(ckpt.path / "config.json"), weights)
            for alias, stored in aliases.items():
                weights[alias] = weights[stored]       # one tensor under both names: stored once
            if aliases:
                tied = ", ".join(f"{a} = {s}" for a, s in aliases.items())
                meta_src += f" (+ tied: {tied})"
                notes.append(f"model: tied weights added under their second name ({tied}; the Trainer stores "
                             "them once), so the step restores into a model built with from_config")
            if why:
                notes.append(why)
        state["model"] = weights
        meta["model"] = ItemEntry("model", meta_src)
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
        meta["progress"] = ItemEntry("progress", f"{src}/trainer_state.json; step from {ckpt.step_source}")
        state["trainer_state"] = ts
        meta["trainer_state"] = ItemEntry("progress", f"{src}/trainer_state.json")
    else:
        state["progress"] = {"step": step}
        meta["progress"] = ItemEntry("progress", f"step {step} from {ckpt.step_source}", reconstructed=True)
        what = "Accelerate saves none" if ckpt.layout == ACCELERATE else "no trainer_state.json"
        notes.append(f"training state: only the step, {step} from {ckpt.step_source}; epoch and loss "
                     f"history are not known ({what}): marked reconstructed")
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
    if len(rng_files) > 1:
        notes.append(f"RNG: {len(rng_files)} per-process files, kept {rng_files[0]} (process 0)")
    for skipped in ckpt.skipped:
        notes.append(f"{skipped}: not converted (a pickled Python object, never loaded)")
    if ckpt.layout == HF_TRAINER and "trainer_state" in state:
        # What AsyncCheckpointTrainer reads to resume (async_ckpt.integrations.hf).
        state["integration"] = {"framework": "transformers", "source": f"{LAYOUT_NAMES[HF_TRAINER]} {src}",
                                "items": sorted(set(state) | {"integration", "rng"})}
        meta["integration"] = ItemEntry("other", f"converted from {src}")
    return safe_torch_load(ckpt.path / rng_files[0]) if rng_files else None


def load_state(ckpt: LegacyCheckpoint, seed: int,
               derive_rng: Callable[[int, int], dict[str, Any]] | None = None) -> Conversion:
    """Everything readable in ``ckpt`` as a manager-style state mapping.

    Items: ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``progress``, ``rng``,
    ``config`` (file name → text), ``tokenizer`` (file name → bytes), ``data``; from a
    Trainer folder also ``trainer_state`` and ``integration`` (so ``AsyncCheckpointTrainer``
    resumes from the step), from a Lightning file ``lightning`` (its other keys). The model
    of a Trainer folder gets the tied names Hugging Face leaves out (:func:`tied_aliases`).
    The step comes from the tool's records (:func:`resolve_step`, unless ``ckpt.step_source``
    is already set). RNG streams that are missing are derived from (seed, step) and marked
    reconstructed; a progress item holding only the step is marked reconstructed too.
    Raises UnsafeFileError when a needed file is unreadable.
    """
    if derive_rng is None:
        from ..rng import derived as derive_rng
    notes: list[str] = []
    state: dict[str, Any] = {}
    meta: dict[str, ItemEntry] = {}
    if ckpt.layout in (TORCH_FILE, LIGHTNING):
        rng_obj = _load_file(ckpt, state, meta, notes)
    else:
        rng_obj = _load_folder(ckpt, state, meta, notes)
    step = ckpt.step if ckpt.step is not None else 0
    _finish_rng(state, meta, notes, rng_obj, seed, step, derive_rng)
    return Conversion(step, state, meta, notes, ckpt.step_source)
