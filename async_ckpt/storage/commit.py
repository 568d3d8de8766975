"""A step's lifecycle on a store: where it is written, when it becomes visible, how it goes.

A step counts as committed only when a location with its final name (``checkpoint-N``)
holds a ``COMMIT`` marker whose digest matches its manifest (docs/FORMAT.md section 1).
:meth:`CommitPolicy.status` is the one place that decides it; listing, restore, verify
and fix all use the :class:`CommitStatus` it returns.

Two policies, one contract (tests/test_storage_contract.py runs both):

* :class:`RenameCommit` (POSIX files): write into a hidden ``.checkpoint-N.tmp-<id>``,
  then manifest, marker, fsync, rename to the final name, fsync the root. Deleting hides
  first (rename back to a tmp name), so a crash mid-delete leaves a leftover, never a
  half-deleted step that still looks committed.
* :class:`MarkerLastCommit` (stores without rename): write under the final name; the
  marker goes last, and a step without a marker is a leftover. Deleting removes the marker
  first, for the same reason.

Call sequence of one save, on the coordinator's background thread: :meth:`begin` →
(every rank writes its data into the returned location) → :meth:`publish` with the
merged manifest, or :meth:`abort` on any failure. Readers call :meth:`status`,
:meth:`committed` and :meth:`leftovers` on any thread. One process at a time changes a
root: :meth:`lock` (the manager and fix hold it).
"""

from __future__ import annotations

import abc
import enum
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from ..errors import CheckpointError, FormatError
from ..format import names
from ..format.manifest import (MAX_COMMIT_BYTES, MAX_MANIFEST_BYTES, Manifest, commit_marker_bytes,
                               manifest_digest, parse_commit_marker, parse_manifest_bytes, seal_state)
from .base import Storage

Fault = Callable[[str], None]


def _no_fault(name: str) -> None:
    pass


class MarkerState(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    BAD = "bad"


@dataclass(frozen=True)
class CommitStatus:
    """Everything known about one step location after reading its marker and manifest.

    ``manifest_sealed`` is what the manifest proves about itself (its ``self_sha256``, see
    docs/FORMAT.md section 2.3): True when intact, False when damaged, None when it carries no
    self digest (written before it existed). It is what lets a repair tell a damaged marker
    (re-sign) from a damaged manifest (never re-sign)."""

    name: str
    step: Optional[int]
    marker: MarkerState
    marker_problem: str = ""          # why the marker is MISSING/BAD
    manifest: Optional[Manifest] = None
    manifest_found: bool = False      # a manifest object exists (valid or not)
    manifest_problem: str = ""        # unreadable, invalid or naming another step
    is_location: bool = True          # False: the name is a file, a symlink or missing
    manifest_sealed: Optional[bool] = None

    @property
    def committed(self) -> bool:
        return (self.is_location and self.marker is MarkerState.OK and self.manifest is not None
                and not self.manifest_problem and names.parse_step_dir(self.name) is not None)

    @property
    def manifest_proven(self) -> bool:
        """The manifest is valid and proves itself intact: a new marker may bind it."""
        return self.manifest is not None and not self.manifest_problem and self.manifest_sealed is True

    @property
    def reason(self) -> str:
        """Why it is not committed ("" when it is)."""
        if self.committed:
            return ""
        if not self.is_location:
            return "not a directory"
        if names.parse_step_dir(self.name) is None:
            return f"{self.name!r} is not a checkpoint-<step> name"
        return self.marker_problem or self.manifest_problem


def _digest_problem(sealed: Optional[bool]) -> str:
    """Why a marker and a manifest disagree, as far as the manifest's self digest tells."""
    if sealed is True:
        return ("the commit marker does not match the manifest, which proves itself intact "
                "(self_sha256): the marker is damaged")
    if sealed is False:
        return ("manifest.json is damaged: it matches neither the commit marker's digest nor its own "
                "(self_sha256)")
    return ("manifest digest does not match the commit marker, and the manifest carries no self digest "
            "(written by an older version): cannot tell whether the marker or the manifest is damaged")


class CommitPolicy(abc.ABC):
    """How steps under one root become visible and go away, on one storage backend."""

    # Manifests this policy published or parsed, by the SHA-256 of their file's bytes: a
    # manifest read back with the same digest is the same document, and is not parsed again
    # (20,000 arrays: about 120 ms). The most recent few; Manifest objects are never mutated.
    _KNOWN_MANIFESTS = 4

    def __init__(self, storage: Storage, root: str) -> None:
        self.storage = storage
        self.root = root
        self._known: OrderedDict[str, Manifest] = OrderedDict()
        self._known_lock = threading.Lock()

    def _remember(self, digest: str, manifest: Manifest) -> None:
        with self._known_lock:
            self._known[digest] = manifest
            self._known.move_to_end(digest)
            while len(self._known) > self._KNOWN_MANIFESTS:
                self._known.popitem(last=False)

    def _parse(self, data: bytes, digest: str) -> Manifest:
        """parse_manifest_bytes, or the manifest already known under ``digest`` (the SHA-256
        of ``data``)."""
        with self._known_lock:
            known = self._known.get(digest)
        if known is not None:
            return known
        manifest = parse_manifest_bytes(data)
        self._remember(digest, manifest)
        return manifest

    def where(self, name: str) -> str:
        return self.storage.join(self.root, name)

    # ------------------------------------------------------------------ one save

    @abc.abstractmethod
    def begin(self, step: int) -> str:
        """Create the location the ranks write ``step`` into; return it."""

    def publish(self, location: str, step: int, manifest: Manifest, fault: Fault = _no_fault) -> str:
        """Write the manifest, then the marker, and make the step visible; return its final
        location. Every rank's data must already be durable in ``location``."""
        data, digest = manifest.to_sealed()
        self.storage.put(location, names.MANIFEST_NAME, data)
        fault("after_manifest")
        self.storage.put(location, names.COMMIT_NAME, commit_marker_bytes(step, data, digest))
        fault("after_marker")
        final = self._make_visible(location, step, fault)
        # ``data`` is exactly ``manifest`` serialised (tests/test_manifest_bytes.py): a restore
        # that reads these bytes back uses the object (the marker binds the same digest).
        self._remember(digest, manifest)
        return final

    @abc.abstractmethod
    def _make_visible(self, location: str, step: int, fault: Fault) -> str:
        ...

    def abort(self, location: str) -> None:
        """Remove a save that will not commit (its marker, if any, goes first)."""
        self.storage.remove(location, names.COMMIT_NAME)
        self.storage.remove(location)

    # ------------------------------------------------------------------ reading

    def _read_marker(self, location: str, step: Optional[int]) -> tuple[MarkerState, str, Optional[dict]]:
        try:
            doc = parse_commit_marker(self.storage.get(location, names.COMMIT_NAME, MAX_COMMIT_BYTES))
        except FileNotFoundError:
            return MarkerState.MISSING, "no commit marker (the save did not finish)", None
        except (CheckpointError, OSError) as e:
            return MarkerState.BAD, f"unreadable commit marker: {e}", None
        if step is not None and doc["step"] != step:
            return MarkerState.BAD, f"commit marker names step {doc['step']}, the directory says {step}", doc
        return MarkerState.OK, "", doc

    def status(self, name: str) -> CommitStatus:
        """Read the marker and manifest of the location ``name`` under the root, in full.

        Never raises for what it finds (a FIFO, a symlink, garbage, giant numbers): every
        problem is a reason in the returned status."""
        step = names.step_of_any(name)
        storage = self.storage
        info = storage.stat(self.root, name)
        if info is None or info.kind != "location":
            return CommitStatus(name, step, MarkerState.MISSING, "not a directory", is_location=False)
        location = self.where(name)
        marker, marker_problem, marker_doc = self._read_marker(location, step)
        try:
            data = storage.get(location, names.MANIFEST_NAME, MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            return CommitStatus(name, step, marker, marker_problem, None, False, "manifest.json missing")
        except (CheckpointError, OSError) as e:
            return CommitStatus(name, step, marker, marker_problem, None, True, f"unreadable manifest: {e}")
        sealed = seal_state(data)
        digest = manifest_digest(data)
        if marker is MarkerState.OK and marker_doc is not None and digest != marker_doc["manifest_sha256"]:
            marker, marker_problem = MarkerState.BAD, _digest_problem(sealed)
        try:
            manifest = self._parse(data, digest)
        except FormatError as e:
            return CommitStatus(name, step, marker, marker_problem, None, True, f"invalid manifest: {e}",
                                manifest_sealed=sealed)
        problem = ""
        if step is not None and manifest.step != step:
            problem = f"manifest names step {manifest.step}, the directory says {step}"
        return CommitStatus(name, step, marker, marker_problem, manifest, True, problem, manifest_sealed=sealed)

    def bound(self, name: str) -> tuple[bool, str]:
        """``(True, "")`` when ``name`` is a final-named location whose marker names its step and
        binds its manifest by digest; else ``(False, why)``. Reads the marker and streams the
        manifest through SHA-256 without parsing it: how a root's steps are listed cheaply.
        :meth:`status` still decides whether the manifest is valid before anything is read."""
        step = names.parse_step_dir(name)
        if step is None:
            return False, f"{name!r} is not a checkpoint-<step> name"
        info = self.storage.stat(self.root, name)
        if info is None or info.kind != "location":
            return False, "not a directory"
        location = self.where(name)
        marker, problem, doc = self._read_marker(location, step)
        if marker is not MarkerState.OK or doc is None:
            return False, problem
        try:
            digest = self.storage.sha256(location, names.MANIFEST_NAME, MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            return False, "manifest.json missing"
        except (CheckpointError, OSError) as e:
            return False, f"unreadable manifest: {e}"
        if digest != doc["manifest_sha256"]:
            return False, "manifest digest does not match the commit marker"
        return True, ""

    def step_names(self) -> list[tuple[int, str]]:
        """Final-named step locations (committed or not), ascending by step."""
        return sorted((s, e.name) for e in self.storage.list(self.root)
                      if e.is_location and (s := names.parse_step_dir(e.name)) is not None)

    def committed(self) -> dict[int, CommitStatus]:
        """Every committed step's status, by step (manifests parsed and validated in full)."""
        out = {}
        for step, name in self.step_names():
            status = self.status(name)
            if status.committed:
                out[step] = status
        return out

    def bound_steps(self) -> list[int]:
        """Steps whose marker binds their manifest (see :meth:`bound`), ascending: the cheap
        listing, without parsing a manifest."""
        return [step for step, name in self.step_names() if self.bound(name)[0]]

    def status_of_step(self, step: int) -> CommitStatus:
        return self.status(names.step_dir_name(step))

    @abc.abstractmethod
    def leftovers(self) -> list[str]:
        """Names of saves that can never commit (crashed, or half-deleted)."""

    def clean_leftovers(self) -> list[str]:
        """Remove every leftover; return their names. Coordinator only, at open."""
        found = self.leftovers()
        for name in found:
            self.storage.remove(self.where(name))
        return found

    # ------------------------------------------------------------------ removing and repairing

    @abc.abstractmethod
    def delete(self, step: int, fault: Fault = _no_fault) -> None:
        """Delete committed ``step`` so that no crash leaves it looking committed."""

    def quarantine(self, step: int) -> str:
        """Set ``step`` aside as ``checkpoint-N.corrupt-<id>`` (nothing deleted); return the name."""
        target = names.quarantine_dir_name(step)
        self.storage.move(self.where(names.step_dir_name(step)), self.where(target))
        self.storage.sync(self.root)
        return target

    def rewrite_marker(self, step: int) -> None:
        """A new marker binding the step's current manifest. Refused (CheckpointError) unless
        the manifest is valid, names ``step`` and proves itself intact (its self digest): a
        marker is never written over a manifest that may be damaged. Whether its chunks verify
        is the caller's (fix's) to check first."""
        location = self.where(names.step_dir_name(step))
        data = self.storage.get(location, names.MANIFEST_NAME, MAX_MANIFEST_BYTES)
        sealed = seal_state(data)
        if sealed is not True:
            raise CheckpointError(
                f"{self.storage.describe(location, names.MANIFEST_NAME)}: refusing to write a commit marker: "
                + ("the manifest does not match its own digest (damaged)" if sealed is False else
                   "the manifest carries no self digest (written by an older version), so it cannot be "
                   "proven intact"))
        manifest = parse_manifest_bytes(data)
        if manifest.step != step:
            raise CheckpointError(f"{self.storage.describe(location)}: the manifest names step {manifest.step}")
        self.storage.put(location, names.COMMIT_NAME, commit_marker_bytes(step, data), replace=True)
        self.storage.sync(location)

    def replace(self, location: str, step: int, manifest: Manifest, set_aside: str) -> str:
        """Publish ``location`` as ``step`` in place of the committed step of that name, which
        moves to ``set_aside`` first (and back if publishing fails). Needs rename."""
        raise CheckpointError(f"{self.storage.describe(self.root)}: replacing a committed step needs a "
                              "store with atomic rename")

    def lock(self) -> Optional[Callable[[], None]]:
        """The root's lock (RootBusyError when another live process holds it)."""
        return self.storage.lock(self.root)


class RenameCommit(CommitPolicy):
    """tmp location → manifest → marker → fsync → rename → fsync root (POSIX files)."""

    def begin(self, step: int) -> str:
        location = self.where(names.tmp_dir_name(step))
        self.storage.create_location(location)
        return location

    def _make_visible(self, location: str, step: int, fault: Fault) -> str:
        self.storage.sync(location)
        final = self.where(names.step_dir_name(step))
        self.storage.move(location, final)
        fault("after_rename")
        self.storage.sync(self.root)
        return final

    def leftovers(self) -> list[str]:
        return sorted(e.name for e in self.storage.list(self.root)
                      if e.is_location and names.parse_tmp_dir(e.name) is not None)

    def delete(self, step: int, fault: Fault = _no_fault) -> None:
        final = self.where(names.step_dir_name(step))
        hidden = self.where(names.tmp_dir_name(step))
        try:
            self.storage.move(final, hidden)
        except FileNotFoundError:
            return
        fault("during_rotation")
        self.storage.remove(hidden)

    def replace(self, location: str, step: int, manifest: Manifest, set_aside: str) -> str:
        data, digest = manifest.to_sealed()
        self.storage.put(location, names.MANIFEST_NAME, data)
        self.storage.put(location, names.COMMIT_NAME, commit_marker_bytes(step, data, digest))
        self.storage.sync(location)
        final = self.where(names.step_dir_name(step))
        self.storage.move(final, set_aside)
        try:
            self.storage.move(location, final)
        except BaseException:
            self.storage.move(set_aside, final)
            raise
        self.storage.sync(self.root)
        return final


class MarkerLastCommit(CommitPolicy):
    """Data, then manifest, then marker, all under the final name (stores without rename)."""

    def begin(self, step: int) -> str:
        location = self.where(names.step_dir_name(step))
        if self.storage.stat(self.root, names.step_dir_name(step)) is not None:
            raise FileExistsError(f"{self.storage.describe(location)} already exists; refusing to overwrite it")
        self.storage.create_location(location)
        return location

    def _make_visible(self, location: str, step: int, fault: Fault) -> str:
        self.storage.sync(location)
        return location

    def leftovers(self) -> list[str]:
        # Only a missing marker marks a leftover: a damaged one is kept for verify and fix.
        out = []
        for step, name in self.step_names():
            if self.storage.stat(self.where(name), names.COMMIT_NAME) is None:
                out.append(name)
        return out

    def delete(self, step: int, fault: Fault = _no_fault) -> None:
        location = self.where(names.step_dir_name(step))
        self.storage.remove(location, names.COMMIT_NAME)
        self.storage.sync(location)
        fault("during_rotation")
        self.storage.remove(location)


def policy_for(storage: Storage, root: str) -> CommitPolicy:
    """Rename-based commit where the store can rename atomically, marker-last elsewhere."""
    return (RenameCommit if storage.supports_rename else MarkerLastCommit)(storage, root)
