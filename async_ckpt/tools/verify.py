"""``python -m async_ckpt.verify PATH``: is this checkpoint safe to resume from?

Read-only. PATH is one step directory (``checkpoint-N``), a manager's root (every
step, newest first, plus leftovers of crashed saves, and the step ``restore`` would
pick), a checkpoint of another tool (Hugging Face Trainer folder, Accelerate ``save_state``
folder, Lightning ``.ckpt`` file, single ``torch.save`` file), which is judged the same way,
or a folder of them (a Trainer output dir, an Accelerate project dir, a folder of ``.ckpt``
files: :func:`~async_ckpt.tools.legacy.find_root`), each judged, newest first by the step
the tool recorded.

PATH may also be a storage URL (``memory://name/prefix``): the same checks run through
that backend.

Checks, in order: the commit marker and the manifest's digest (the commit policy's
:class:`~async_ckpt.storage.commit.CommitStatus`), the manifest's validity, every data
file present with its recorded size, and (unless ``--quick``) every chunk's stored
CRC-32C through the storage backend (natively: parallel pread, GIL released, so it runs at
disk speed); ``--deep`` also decodes each zstd frame and checks the decoded bytes'
CRC-32C (CPU-bound). Bad chunks are mapped back to the tensor paths stored in them.

Each report carries typed :class:`Finding` s: what ``fix`` may do about it. fix acts on
those, never on message text.

Exit codes: 0 COMPLETE, 1 PARTIAL, 2 CORRUPT / UNCOMMITTED / not a checkpoint, 64 usage.

Call sequence for programmatic use: :func:`check_path` (or :func:`check_step` for one
directory) returns report objects; :mod:`async_ckpt.report` renders them.
"""

from __future__ import annotations

import argparse
import enum
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from ..errors import CheckpointError
from ..format import names
from ..format.manifest import ItemEntry, Manifest
from ..format.shards import array_references, coverage_problems
from ..storage import is_url, open_root
from ..storage.base import ReadRequest, Storage
from ..storage.commit import MarkerState, policy_for
from ..storage.inspect import data_file_problems
from . import legacy
from .progress import Progress

COMPLETE = "COMPLETE"
PARTIAL = "PARTIAL"
CORRUPT = "CORRUPT"
UNCOMMITTED = "UNCOMMITTED"
NOT_A_CHECKPOINT = "NOT A CHECKPOINT"
EXIT_CODES = {COMPLETE: 0, PARTIAL: 1, CORRUPT: 2, UNCOMMITTED: 2, NOT_A_CHECKPOINT: 2}
EXIT_USAGE = 64

OURS = "async_ckpt"

# (kind, display name, needed for a stable resume, what its absence costs)
COMPONENTS: tuple[tuple[str, str, bool, str], ...] = (
    ("config", "Model Config", False, "model config missing: rebuild the model from code"),
    ("model", "Model Weights", True, "model weights missing: nothing to resume from, training restarts"),
    ("tokenizer", "Tokenizer", False, "tokenizer missing: load it from its original source"),
    ("progress", "Training State", True,
     "training state missing: epoch and loss history are lost (the step comes from the name)"),
    ("optimizer", "Optimizer State", True, "optimizer state missing: momentum resets, expect a loss spike"),
    ("scheduler", "Scheduler State", True,
     "scheduler state missing: the learning rate restarts its schedule (warmup repeats)"),
    ("rng", "RNG States", True, "RNG states missing: dropout and shuffling will differ"),
    ("data", "Data State", False, "data state missing: the data order restarts from the epoch's beginning"),
)
COMPONENT_NAMES = {kind: name for kind, name, _, _ in COMPONENTS}


# ----------------------------------------------------------------------------- report objects

class Repair(str, enum.Enum):
    """What fix may do about a finding."""

    REMOVE_LEFTOVER = "remove_leftover"        # a crashed save's leftover
    REWRITE_MARKER = "rewrite_marker"          # marker missing or damaged; manifest proven intact, chunks too
    ADD_RECONSTRUCTED = "add_reconstructed"    # RNG / training state missing: derive them
    QUARANTINE = "quarantine"                  # corrupt: set aside so restore skips it
    CONVERT = "convert"                        # a legacy layout: convert into ours


@dataclass
class Finding:
    repair: Repair
    detail: str                                 # one line for humans
    kinds: tuple[str, ...] = ()                 # ADD_RECONSTRUCTED: the component kinds

@dataclass
class Component:
    kind: str
    name: str
    required: bool
    present: bool
    items: list[str] = field(default_factory=list)   # item names (ours) or file names (legacy)
    reconstructed: bool = False
    damaged: bool = False


@dataclass
class BadChunk:
    chunk: int
    file: str
    offset: int
    length: int
    error: str
    tensors: list[str] = field(default_factory=list)


@dataclass
class ItemDetail:
    name: str
    kind: str
    type: str
    reconstructed: bool
    tensors: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)


@dataclass
class StepReport:
    path: str
    name: str
    step: int | None
    layout: str                     # "async_ckpt", a legacy.* layout, "leftover" or "unknown"
    verdict: str
    committed: bool = False
    reason: str = ""                # why it is not committed / not a checkpoint
    step_source: str = ""           # other tools' checkpoints: where the step came from
    components: list[Component] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)       # costs of missing required components
    reconstructed: list[str] = field(default_factory=list)  # costs of required state fix synthesised
    problems: list[str] = field(default_factory=list)      # integrity problems other than chunks
    bad_chunks: list[BadChunk] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fixable: list[str] = field(default_factory=list)       # what `fix` would do about it (text)
    findings: list[Finding] = field(default_factory=list)  # the same, typed, for fix
    crc_checked: bool = False
    deep: bool = False              # zstd frames decoded and raw crc32c checked too
    deleted: bool = False           # vanished while being checked (rotation), not damaged
    files: int = 0
    chunks: int = 0
    total_bytes: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    writer: str = ""
    created_unix: float | None = None
    world_size: int | None = None
    rank_bytes: list[int] = field(default_factory=list)     # stored bytes per rank (its data files)
    scan_seconds: float = 0.0       # the crc pass alone (reading + checking), for the throughput
    metrics: dict[str, float] = field(default_factory=dict)
    items: list[ItemDetail] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def can_fix(self, repair: Repair, detail: str, kinds: tuple[str, ...] = ()) -> None:
        self.findings.append(Finding(repair, detail, kinds))
        self.fixable.append(detail)

    def finding(self, repair: Repair) -> Optional[Finding]:
        return next((f for f in self.findings if f.repair is repair), None)


@dataclass
class PassedOver:
    """A final-named step newer than the one restore would pick, and why restore skips it."""

    step: int
    name: str
    verdict: str
    reason: str


@dataclass
class RootReport:
    path: str
    verdict: str
    steps: list[StepReport]
    restore_step: int | None
    quarantined: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    passed_over: list[PassedOver] = field(default_factory=list)   # newest first
    layout: str = OURS              # or a legacy.ROOT_NAMES key: another tool's folder

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]


# ----------------------------------------------------------------------------- tree paths

def array_paths(tree: Any) -> dict[int, list[str]]:
    """Array index → every tree path that references it (``model["fc.weight"]``, ``optimizer.state[0].exp_avg``).

    ``tree`` is an already validated rank tree (parse_manifest ran walk_arrays)."""
    from ..format.tree import _key_part  # the same path spelling encode errors use

    out: dict[int, list[str]] = {}
    for index, parts in array_references(tree):
        path = ""
        for p in parts:
            if type(p) is tuple:            # a list index
                path += f"[{p[1]}]"
            else:
                part = _key_part(p)
                path = (path + part) if path or not part.startswith(".") else part[1:]
        out.setdefault(index, []).append(path)
    for paths in out.values():
        paths.sort()
    return out


def item_of_path(path: str) -> str:
    """The top-level item a tree path belongs to: ``model["fc.weight"]`` → ``model``."""
    if path.startswith('["'):
        end = path.find('"]')
        return path[2:end] if end > 0 else path
    for i, ch in enumerate(path):
        if ch in ".[":
            return path[:i]
    return path


# ----------------------------------------------------------------------------- our layout

def default_threads() -> int:
    """Reader threads: enough outstanding preads to keep a fast disk busy, even on few cores."""
    return max(8, min(32, (os.cpu_count() or 4) * 2))


def _short_error(message: str) -> str:
    """Drop the reader's "chunk N ('path', offset .., length ..)" prefix: the report says that."""
    kind, _, rest = message.partition(": ")
    if "): " in rest:
        rest = rest.split("): ", 1)[1]
    return f"{rest} [{kind}]" if rest else message


def reader_storage(threads: int | None = None) -> Storage:
    """The native files backend sized for a verify pass (many outstanding preads)."""
    from ..storage.native_files import NativeStorage
    return NativeStorage(io_threads=threads or default_threads(), compression=None)


def scan_chunks(storage: Storage, location: str, manifest: Manifest, chunk_ids: Sequence[int], *,
                progress: Progress | None = None, deep: bool = False) -> dict[int, str]:
    """CRC-check the given chunks; return chunk → error for the bad ones.

    By default each chunk's *stored* bytes are checked against ``crc32c`` without decoding
    (natively: pread and crc slice by slice at disk speed). ``deep`` decodes zstd frames as
    well and checks ``raw_crc32c`` (CPU-bound: catches a writer's codec bug, not disk
    damage). One storage call per batch; batches exist only to move the bar.
    """
    if not chunk_ids:
        return {}
    chunks = manifest.chunks
    order = sorted(chunk_ids, key=lambda i: (chunks[i].file, chunks[i].offset))
    total = sum(chunks[i].length for i in order)
    batch_bytes = max(256 << 20, total // 50) if progress is not None and progress.enabled else total + 1
    errors: dict[int, str] = {}
    batch: list[int] = []
    size = 0

    def flush() -> None:
        nonlocal size
        requests = [ReadRequest(i, chunks[i], None, decode=deep) for i in batch]
        for i, err in zip(batch, storage.read(location, manifest.files, requests, True)):
            if err is not None:
                errors[i] = _short_error(err)
        if progress is not None:
            progress.update(size)
        batch.clear()
        size = 0

    for i in order:
        batch.append(i)
        size += chunks[i].length
        if size >= batch_bytes:
            flush()
    if batch:
        flush()
    return errors


def check_ours(step_dir: Union[Path, str], *, quick: bool = False, threads: int | None = None,
               show_progress: bool | None = None, deep: bool = False,
               storage: Storage | None = None) -> StepReport:
    """Judge one directory in our layout (final-named, quarantined or without a marker).

    ``step_dir`` is a local path, or a location of ``storage`` when one is given."""
    storage = storage or reader_storage(threads)
    root, name = _split(storage, str(step_dir))
    return _check_ours(storage, root, name, quick=quick, show_progress=show_progress, deep=deep)


def _split(storage: Storage, location: str) -> tuple[str, str]:
    location = location.rstrip("/") or location
    head, _, tail = location.rpartition("/")
    return head if head or not location.startswith("/") else "/", tail


def _check_ours(storage: Storage, root: str, name: str, *, quick: bool = False,
                show_progress: bool | None = None, deep: bool = False) -> StepReport:
    t0 = time.perf_counter()
    location = storage.join(root, name)
    status = policy_for(storage, root).status(name)
    step = status.step
    rep = StepReport(storage.describe(location), name, step, OURS, UNCOMMITTED)
    final_name = names.parse_step_dir(name) is not None
    manifest = status.manifest
    rep.committed = status.committed
    if status.manifest_problem:
        if status.manifest_found:
            rep.problems.append(status.manifest_problem)
        elif status.marker is MarkerState.MISSING:
            rep.reason = "no manifest and no commit marker: a save that crashed while writing data"
            rep.can_fix(Repair.REMOVE_LEFTOVER, "remove it (leftover of a crashed save)")
        else:
            rep.problems.append("manifest.json missing: it cannot be rebuilt (the names of the saved "
                                "values live only there)")
    if names.parse_quarantine_dir(name) is not None:
        rep.notes.append("quarantined by fix: restore ignores it")
    marker = status.marker
    if marker is not MarkerState.OK and not rep.reason:
        rep.reason = status.marker_problem

    if manifest is not None:
        _check_manifest_files(rep, storage, location, manifest, quick, show_progress, deep)

    # Verdict.
    if marker is MarkerState.BAD:
        rep.problems.append(status.marker_problem)
    only_marker = (manifest is not None and not rep.bad_chunks
                   and rep.problems in ([], [status.marker_problem]))
    if rep.problems or rep.bad_chunks:
        rep.verdict = CORRUPT
    elif manifest is None or marker is MarkerState.MISSING:
        rep.verdict = UNCOMMITTED
    else:
        rep.verdict = _completeness(rep)
    if final_name and only_marker and marker is not MarkerState.OK:
        if not status.manifest_proven:
            rep.notes.append("the manifest carries no self digest (written by an older version): it cannot "
                             "be proven intact, so fix will not write a commit marker for it")
        elif rep.crc_checked:
            rep.can_fix(Repair.REWRITE_MARKER,
                        "write a new commit marker: the manifest is valid, proves itself intact "
                        "(self digest) and every chunk verifies")
        else:
            rep.notes.append("run without --quick to learn whether fix can commit it (every chunk must verify)")
    if final_name and rep.verdict in (COMPLETE, PARTIAL):
        for c in rep.components:
            if not c.present and c.kind in ("rng", "progress"):
                rep.can_fix(Repair.ADD_RECONSTRUCTED, f"add {c.name} (reconstructed)", (c.kind,))
    if final_name and rep.verdict == CORRUPT and rep.finding(Repair.REWRITE_MARKER) is None:
        rep.can_fix(Repair.QUARANTINE, "quarantine it (fix --quarantine), so restore skips it")
    if rep.verdict != COMPLETE and _vanished(storage, root, name, location, marker):
        _deleted_while_checking(rep)
    rep.seconds = time.perf_counter() - t0
    return rep


def _vanished(storage: Storage, root: str, name: str, location: str, marker: MarkerState) -> bool:
    """The step went away while it was being checked: its name is gone (rename-based
    rotation hides a step before removing it) or its marker is (marker-last rotation
    removes the marker first)."""
    info = storage.stat(root, name)
    if info is None or info.kind != "location":
        return True
    return marker is MarkerState.OK and storage.stat(location, names.COMMIT_NAME) is None


def _deleted_while_checking(rep: StepReport) -> None:
    rep.deleted = True
    rep.verdict = UNCOMMITTED
    rep.committed = False
    rep.reason = "deleted while checking (rotation): a running manager removed it; not damage"
    rep.problems.clear()
    rep.bad_chunks.clear()
    rep.missing.clear()
    rep.components = []
    rep.findings.clear()
    rep.fixable.clear()


def _check_manifest_files(rep: StepReport, storage: Storage, location: str, manifest: Manifest, quick: bool,
                          show_progress: bool | None, deep: bool = False) -> None:
    rep.writer = manifest.writer
    rep.created_unix = manifest.created_unix
    rep.world_size = manifest.world_size
    rep.metrics = dict(manifest.metrics)
    rep.files = len(manifest.files)
    rep.chunks = len(manifest.chunks)
    rep.total_bytes = sum(f.size for f in manifest.files)

    rep.rank_bytes = [sum(f.size for f in manifest.files if f.rank == r) for r in range(manifest.world_size)]
    for problem in coverage_problems(manifest):        # section 6: shards tile every array
        rep.problems.append(f"sharded array {problem}")
    problems, links = data_file_problems(storage, location, manifest)
    real_size: dict[int, int | None] = {i: f.size for i, f in enumerate(manifest.files)}
    for p in problems:
        rank_of = f"rank {manifest.files[p.file].rank}: " if manifest.world_size > 1 else ""
        rep.problems.append(rank_of + p.message)
        real_size[p.file] = p.size
    for i, n in links.items():
        rep.notes.append(f"{manifest.files[i].path}: hard link shared with {n - 1} other name(s), e.g. a "
                         "neighbouring step's unchanged frozen parameters (deleting a step "
                         "removes only its own name)")
    expected = {names.MANIFEST_NAME, names.COMMIT_NAME} | {f.path for f in manifest.files}
    extra = sorted(e.name for e in storage.list(location) if e.name not in expected)
    if extra:
        rep.notes.append(f"unexpected entries (ignored): {', '.join(extra[:10])}"
                         + (" ..." if len(extra) > 10 else ""))

    # chunk → (rank, array) and array → paths, for naming what a bad chunk holds
    paths_by_rank = [array_paths(r.tree) for r in manifest.ranks]
    bad: dict[int, str] = {}
    to_scan: list[int] = []
    for i, c in enumerate(manifest.chunks):
        size = real_size.get(c.file)
        if size is None:
            bad[i] = f"data file {manifest.files[c.file].path} unavailable"
        elif c.offset + c.length > size:
            bad[i] = f"runs past the end of the file ({size} bytes): truncated"
        else:
            to_scan.append(i)
    if not quick:
        scan_bytes = sum(manifest.chunks[i].length for i in to_scan)
        bar = Progress(scan_bytes, f"verify {rep.name}", enabled=show_progress)
        t_scan = time.perf_counter()
        try:
            bad.update(scan_chunks(storage, location, manifest, to_scan, progress=bar, deep=deep))
        finally:
            bar.close()
        rep.scan_seconds = time.perf_counter() - t_scan
        rep.crc_checked = True
        rep.deep = deep
        rep.bytes_checked = scan_bytes

    chunk_arrays: dict[int, list[tuple[int, int]]] = {}
    for r_i, r in enumerate(manifest.ranks):
        for a_i, a in enumerate(r.arrays):
            for chunk, _, _ in a.parts:
                chunk_arrays.setdefault(chunk, []).append((r_i, a_i))
    damaged_items: set[str] = set()
    for i in sorted(bad):
        c = manifest.chunks[i]
        tensors: list[str] = []
        for r_i, a_i in chunk_arrays.get(i, []):
            prefix = f"rank {r_i}: " if manifest.world_size > 1 else ""
            for p in paths_by_rank[r_i].get(a_i, []):
                tensors.append(prefix + p)
                damaged_items.add(item_of_path(p))
        rep.bad_chunks.append(BadChunk(i, manifest.files[c.file].path, c.offset, c.length, bad[i],
                                       sorted(set(tensors))))

    items = manifest.items()
    rep.components = _components(
        {kind: [n for n, e in items.items() if e.kind == kind] for kind in COMPONENT_NAMES},
        {n for n, e in items.items() if e.reconstructed}, damaged_items)
    rep.items = _item_details(manifest, items, paths_by_rank)
    others = [n for n, e in items.items() if e.kind not in COMPONENT_NAMES]
    if others:
        rep.notes.append("other items: " + ", ".join(f"{n} ({items[n].kind})" for n in others))


def _components(found: dict[str, list[str]], reconstructed: set[str], damaged: set[str]) -> list[Component]:
    out = []
    for kind, name, required, _ in COMPONENTS:
        names_ = found.get(kind, [])
        out.append(Component(kind, name, required, bool(names_), list(names_),
                             bool(names_) and all(n in reconstructed for n in names_),
                             any(n in damaged for n in names_)))
    return out


RECONSTRUCTED_COSTS = {
    "rng": "RNG states reconstructed by fix (derived from a seed, not the original run's): dropout and "
           "shuffling will not repeat the original run",
    "progress": "training state reconstructed by fix: only the step is known{source}; epoch and loss "
                "history are not",
}


def _completeness(rep: StepReport) -> str:
    """COMPLETE only when every required component holds the original run's state: one that
    fix synthesised (RNG from a seed, a progress item holding only the step) makes it
    PARTIAL, each listed with its cost in ``rep.reconstructed``."""
    rep.missing = [cost for (kind, _, required, cost), c in zip(COMPONENTS, rep.components)
                   if required and not c.present]
    types = {d.name: d.type for d in rep.items}
    rep.reconstructed = []
    for (kind, _, required, _), c in zip(COMPONENTS, rep.components):
        if required and c.present and c.reconstructed and kind in RECONSTRUCTED_COSTS:
            source = "; ".join(types[n] for n in c.items if types.get(n))
            rep.reconstructed.append(RECONSTRUCTED_COSTS[kind].format(source=f" ({source})" if source else ""))
    return PARTIAL if rep.missing or rep.reconstructed else COMPLETE


def _item_details(manifest: Manifest, items: dict[str, ItemEntry],
                  paths_by_rank: list[dict[int, list[str]]]) -> list[ItemDetail]:
    details = {n: ItemDetail(n, e.kind, e.type, e.reconstructed) for n, e in items.items()}
    dtypes: dict[str, Counter] = {n: Counter() for n in items}
    for r, paths in zip(manifest.ranks, paths_by_rank):
        for a_i, a in enumerate(r.arrays):
            owners = {item_of_path(p) for p in paths.get(a_i, [])}
            for n in owners & details.keys():
                d = details[n]
                d.tensors += 1
                d.raw_bytes += a.nbytes
                for chunk, _, length in a.parts:
                    c = manifest.chunks[chunk]
                    d.stored_bytes += length * c.length // c.raw_length if c.raw_length else 0
                dtypes[n][a.dtype] += 1
                break   # a tensor shared by two items counts once, for the first
    for n, d in details.items():
        d.dtypes = dict(dtypes[n])
    return list(details.values())


# ----------------------------------------------------------------------------- legacy layouts

def check_legacy(ckpt: legacy.LegacyCheckpoint, *, quick: bool = False) -> StepReport:
    t0 = time.perf_counter()
    rep = StepReport(str(ckpt.path), ckpt.path.name, ckpt.step, ckpt.layout, COMPLETE)
    problems = legacy.check(ckpt, quick)
    rep.step = ckpt.step
    rep.layout = ckpt.layout          # check() tells a Lightning file from another torch.save file
    rep.step_source = ckpt.step_source
    rep.notes.append(f"legacy layout ({ckpt.description}): run fix to convert")
    if ckpt.step_source:
        rep.notes.append(f"step {ckpt.step} from {ckpt.step_source}")
    for name in ckpt.skipped:
        rep.notes.append(f"{name}: skipped, it is a pickled Python object (never loaded)")
    for p in problems:
        rep.problems.append(p.message)
    found = {k: v for k, v in ckpt.components.items() if k != "missing_shards"}
    if ckpt.path.is_file():
        rep.total_bytes = ckpt.path.stat().st_size
        rep.files = 1
    else:
        files = {n for group in found.values() for n in group}
        rep.files = len(files)
        rep.total_bytes = sum((ckpt.path / n).stat().st_size for n in files if (ckpt.path / n).is_file())
    rep.bytes_checked = 0 if quick else rep.total_bytes
    rep.crc_checked = not quick
    bad_files = {p.file for p in problems}
    rep.components = _components(found, set(), bad_files)
    if ckpt.path.is_dir():
        rep.items = [ItemDetail(n, kind, "file", False, raw_bytes=(ckpt.path / n).stat().st_size,
                                stored_bytes=(ckpt.path / n).stat().st_size)
                     for kind, files in found.items() for n in files if (ckpt.path / n).is_file()]
    for c in rep.components:   # a component whose every file is unreadable is not there
        if c.present and all(n in bad_files for n in c.items):
            c.present = False
    rep.verdict = CORRUPT if rep.problems else _completeness(rep)
    if rep.step is not None and rep.step > names.MAX_STEP:
        rep.notes.append(f"its step {rep.step} exceeds the largest step the format allows ({names.MAX_STEP}): "
                         "fix cannot convert it")
    elif rep.verdict != CORRUPT:
        rep.can_fix(Repair.CONVERT, "convert it into the committed layout")
    rep.seconds = time.perf_counter() - t0
    return rep


# ----------------------------------------------------------------------------- entry points

Target = Union[Path, str]


def why(rep: StepReport) -> str:
    """One line: the verdict of a step and its first reason."""
    if rep.problems:
        return f"{rep.verdict}: {rep.problems[0]}"
    if rep.bad_chunks:
        n = len(rep.bad_chunks)
        return f"{rep.verdict}: {n} bad chunk{'s' * (n != 1)}"
    if rep.layout in legacy.LAYOUT_NAMES:
        return f"{rep.verdict}: a legacy layout ({legacy.LAYOUT_NAMES[rep.layout]}); fix converts it"
    return f"{rep.verdict}: {rep.reason}" if rep.reason else rep.verdict


def _is_ours(path: Path) -> bool:
    return (path / names.MANIFEST_NAME).exists() or (path / names.COMMIT_NAME).exists()


def _leftover(path: str, name: str, step: int) -> StepReport:
    rep = StepReport(path, name, step, "leftover", UNCOMMITTED,
                     reason="leftover of a crashed save (hidden tmp directory); restore ignores it")
    rep.can_fix(Repair.REMOVE_LEFTOVER, "remove it (leftover of a crashed save)")
    return rep


def _check_in_store(storage: Storage, root: str, name: str, *, quick: bool, show_progress: bool | None,
                    deep: bool) -> StepReport:
    tmp = names.parse_tmp_dir(name)
    if tmp is not None:
        return _leftover(storage.describe(storage.join(root, name)), name, tmp)
    info = storage.stat(root, name)
    if info is None or info.kind != "location":
        where = storage.describe(storage.join(root, name))
        what = "does not exist" if info is None else "is not a checkpoint this tool recognises"
        return StepReport(where, name, None, "unknown", NOT_A_CHECKPOINT, reason=f"{where} {what}")
    return _check_ours(storage, root, name, quick=quick, show_progress=show_progress, deep=deep)


def check_step(path: Target, *, quick: bool = False, threads: int | None = None,
               show_progress: bool | None = None, deep: bool = False) -> StepReport:
    """Judge one step directory (a path or a storage URL) or legacy checkpoint (file or folder).

    Never raises for what it finds: an unreadable or hostile input is a CORRUPT report whose
    problems say why, a step that vanishes meanwhile is reported as deleted (rotation)."""
    try:
        return _check_step(path, quick=quick, threads=threads, show_progress=show_progress, deep=deep)
    except (CheckpointError, OSError, ValueError) as e:   # ValueError: FormatError's other base
        where = str(path)
        name = where.rstrip("/").rpartition("/")[2]
        rep = StepReport(where, name, names.step_of_any(name), OURS, CORRUPT)
        if not is_url(path) and not os.path.lexists(path):
            rep.verdict = NOT_A_CHECKPOINT
            rep.reason = f"{where} does not exist"
            return rep
        rep.problems.append(f"cannot be checked: {type(e).__name__}: {e}")
        return rep


def _check_step(path: Target, *, quick: bool, threads: int | None, show_progress: bool | None,
                deep: bool) -> StepReport:
    if is_url(path):
        storage, location = open_root(path)
        root, name = _split(storage, location)
        return _check_in_store(storage, root, name, quick=quick, show_progress=show_progress, deep=deep)
    path = Path(path)
    name = path.name
    if path.is_symlink():
        return StepReport(str(path), name, None, "unknown", NOT_A_CHECKPOINT,
                          reason=f"{path} is a symlink; checkpoints are read only from real directories and files")
    tmp = names.parse_tmp_dir(name)
    if tmp is not None:
        return _leftover(str(path), name, tmp)
    if path.is_dir() and _is_ours(path):
        return check_ours(path, quick=quick, threads=threads, show_progress=show_progress, deep=deep)
    found = legacy.detect(path)
    if found is not None:
        return check_legacy(found, quick=quick)
    if path.is_dir() and (names.parse_step_dir(name) is not None or names.parse_quarantine_dir(name) is not None):
        return check_ours(path, quick=quick, threads=threads, show_progress=show_progress, deep=deep)
    what = "does not exist" if not path.exists() else "is not a checkpoint this tool recognises"
    return StepReport(str(path), name, None, "unknown", NOT_A_CHECKPOINT, reason=f"{path} {what}")


def is_root(path: Target) -> bool:
    """A directory (or store prefix) that holds step directories (or leftovers) rather than being one."""
    if is_url(path):
        storage, location = open_root(path)
        return names.step_of_any(_split(storage, location)[1]) is None
    path = Path(path)
    if not path.is_dir() or _is_ours(path) or names.parse_step_dir(path.name) is not None:
        return False
    if legacy.find_root(path) is not None:      # another tool's folder of checkpoints
        return True
    if legacy.detect(path) is not None:
        return False
    for e in os.scandir(path):
        if e.is_dir(follow_symlinks=False) and names.step_of_any(e.name) is not None:
            return True
    return False


def check_root(root: Target, *, quick: bool = False, threads: int | None = None,
               show_progress: bool | None = None, step: int | None = None, deep: bool = False) -> RootReport:
    """Every step under ``root`` newest first (leftovers of crashed saves among them).

    A folder of other tools' checkpoints (:func:`legacy.find_root`) is judged the same way:
    each of its checkpoints, ordered by the step its tool recorded (``step`` filters on that
    step), with ``layout`` naming the folder's kind."""
    local = not is_url(root)
    if local:
        storage, location = reader_storage(threads), str(root)
    else:
        storage, location = open_root(root)
    lroot = legacy.find_root(Path(location)) if local else None
    theirs = {lroot.name_of(p) for p in lroot.entries} if lroot is not None else set()
    entries: list[tuple[int, int, str]] = []
    quarantined: list[str] = []
    for e in sorted(storage.list(location), key=lambda e: e.name):
        if not e.is_location or e.name in theirs:
            continue
        s, t = names.parse_step_dir(e.name), names.parse_tmp_dir(e.name)
        if s is not None:
            entries.append((s, 1, e.name))
        elif t is not None:
            entries.append((t, 0, e.name))
        elif names.parse_quarantine_dir(e.name) is not None:
            quarantined.append(e.name)
    if step is not None:
        entries = [x for x in entries if x[0] == step]
    entries.sort(key=lambda x: (-x[0], -x[1], x[2]))
    steps = []
    for _, _, n in entries:
        if local:
            r = check_step(Path(location) / n, quick=quick, threads=threads, show_progress=show_progress,
                           deep=deep)
        else:
            r = _check_in_store(storage, location, n, quick=quick, show_progress=show_progress, deep=deep)
        if r.verdict == NOT_A_CHECKPOINT and storage.stat(location, n) is None:
            r = StepReport(r.path, n, names.step_of_any(n), "leftover" if names.parse_tmp_dir(n) is not None
                           else OURS, UNCOMMITTED)
            _deleted_while_checking(r)
        steps.append(r)
    if lroot is not None:
        for p in lroot.entries:
            r = check_step(p, quick=quick, threads=threads, show_progress=show_progress, deep=deep)
            r.name = lroot.name_of(p)
            if step is None or r.step == step:
                steps.append(r)
        steps.sort(key=lambda r: (-(r.step if r.step is not None else -1), r.layout == "leftover", r.name))
    committed = [r.step for r in steps if r.committed and r.step is not None]
    restore_step = max(committed) if committed else None
    rep = RootReport(str(root), NOT_A_CHECKPOINT, steps, restore_step, quarantined,
                     layout=lroot.layout if lroot is not None else OURS)
    if lroot is not None:
        n = len(lroot.entries)
        rep.notes.append(f"{lroot.description}: {n} checkpoint{'s' * (n != 1)} in their tool's own layout, which "
                         f"that tool resumes from; `python -m async_ckpt.fix {root}` converts them into a new "
                         f"root ({legacy.default_dest(lroot.home)} unless --out) and changes nothing here")
        rep.notes.extend(lroot.notes)
    # Every final-named step newer than the pick: restore passes over it, which must never be silent.
    for r in steps:
        if (r.step is not None and (restore_step is None or r.step > restore_step) and not r.deleted
                and not r.committed and r.layout not in ("leftover", *legacy.LAYOUT_NAMES)
                and names.parse_step_dir(r.name) is not None):
            rep.passed_over.append(PassedOver(r.step, r.name, r.verdict, why(r)))
    if restore_step is not None:
        pick = next(r for r in steps if r.committed and r.step == restore_step)
        rep.verdict = pick.verdict
        if pick.verdict == CORRUPT:
            rep.notes.append(f"restore would pick step {restore_step}, which is CORRUPT: run fix --quarantine "
                             "so that it falls back to an older step")
    else:
        legacy_steps = [r for r in steps if r.layout in legacy.LAYOUT_NAMES]
        if legacy_steps:
            rep.verdict = legacy_steps[0].verdict      # the newest: what its tool would resume from
            if lroot is None:
                rep.notes.append("no step in the committed layout yet: run fix to convert the legacy ones")
        elif steps:
            rep.verdict = CORRUPT if any(r.verdict == CORRUPT for r in steps) else UNCOMMITTED
    deleted = [r.name for r in steps if r.deleted]
    if deleted:
        rep.notes.append(f"deleted while checking (rotation by a running manager): {', '.join(deleted)}")
    leftovers = [r for r in steps if r.layout == "leftover"]
    if leftovers:
        rep.notes.append(f"{len(leftovers)} leftover(s) of crashed saves: fix removes them")
    if step is not None and not steps:
        rep.notes.append(f"no checkpoint-{step} under {root}")
    return rep


def check_path(path: Target, *, quick: bool = False, threads: int | None = None,
               show_progress: bool | None = None, step: int | None = None,
               deep: bool = False) -> StepReport | RootReport:
    if is_root(path):
        return check_root(path, quick=quick, threads=threads, show_progress=show_progress, step=step,
                          deep=deep)
    if not is_url(path):
        path = Path(path)
        if step is not None and path.is_dir() and (path / names.step_dir_name(step)).exists():
            path = path / names.step_dir_name(step)
    return check_step(path, quick=quick, threads=threads, show_progress=show_progress, deep=deep)


# ----------------------------------------------------------------------------- CLI

HELP_EPILOG = """\
exit codes:
  0   COMPLETE     every component a stable resume needs is present and intact
  1   PARTIAL      intact, but something a stable resume needs is missing (listed with its cost)
  2   CORRUPT      a bad chunk, missing or truncated file, or invalid manifest/marker
      UNCOMMITTED  a crashed save's leftovers; restore ignores it
      or PATH is not a checkpoint
  64  usage error

For a root directory the verdict (and exit code) is that of the step restore would pick.
Other tools' checkpoints (Hugging Face Trainer, Accelerate save_state, Lightning .ckpt, one
torch.save file) are judged the same way, and so is a folder of them (a Trainer output dir,
an Accelerate project dir, a folder of .ckpt files): each checkpoint, newest first by the
step its tool recorded. `python -m async_ckpt.fix PATH` converts them into a new root
beside the folder, which it leaves as it is.
"""


class UsageParser(argparse.ArgumentParser):
    """verify's and fix's parser: a usage error is one line and exit 64 (argparse's 2 would
    read as CORRUPT)."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="python -m async_ckpt.verify",
                description="Check that a checkpoint (one step, a manager's root, or a legacy "
                            "checkpoint) is committed, intact and complete enough to resume from.",
                epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a checkpoint-N directory, a manager's root, another tool's checkpoint "
                                "or a folder of them")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="per-item tensor counts, bytes, dtypes, compression ratio, timestamps, writer")
    p.add_argument("--json", action="store_true", help="print one machine-readable JSON document")
    p.add_argument("--quick", action="store_true",
                   help="skip the crc pass: marker, manifest and file sizes only")
    p.add_argument("--deep", action="store_true",
                   help="also decode every zstd frame and check the decoded bytes' crc (CPU-bound)")
    p.add_argument("--step", type=non_negative_int, help="in a root, verify only this step")
    p.add_argument("--plain", action="store_true", help="ASCII [ok]/[missing] instead of emoji")
    p.add_argument("--threads", type=positive_int, default=None, help="reader threads, 1 to 1024 (default: auto)")
    p.add_argument("--endpoint", metavar="URL",
                   help="S3 endpoint for s3:// paths (default: $AWS_ENDPOINT_URL_S3, then $AWS_ENDPOINT_URL, "
                        "then AWS); credentials and region come from the AWS_* environment variables")
    return p


def _int_arg(text: str, lo: int, hi: int) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"{value} is out of range [{lo}, {hi}]")
    return value


def positive_int(text: str) -> int:
    return _int_arg(text, 1, 1024)


def non_negative_int(text: str) -> int:
    return _int_arg(text, 0, names.MAX_STEP)


def main(argv: Iterable[str] | None = None) -> int:
    from . import report

    args = build_parser().parse_args(None if argv is None else list(argv))
    if args.quick and args.deep:
        build_parser().error("--quick and --deep contradict each other")
    from ..storage.kvstore import endpoint_override

    try:
        with endpoint_override(args.endpoint):
            result = check_path(args.path if is_url(args.path) else Path(args.path), quick=args.quick,
                                threads=args.threads, step=args.step, deep=args.deep)
    except ImportError as e:
        print(f"verify: the native extension is unavailable ({e}); --quick checks without it",
              file=sys.stderr)
        return EXIT_CODES[CORRUPT]
    except (CheckpointError, OSError, ValueError) as e:   # a root that cannot even be listed
        print(f"verify: {args.path}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_CODES[CORRUPT]
    if args.json:
        print(report.to_json(result))
    else:
        report.render(result, sys.stdout, verbose=args.verbose, plain=args.plain)
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
