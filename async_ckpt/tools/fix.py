"""``python -m async_ckpt.fix PATH``: repair what can be repaired, say plainly what cannot.

Sequence: verify PATH (every chunk's crc) → print the plan → act (unless ``--dry-run``)
→ verify again and print the result. ``--dry-run`` writes nothing at all (not even the
lock file): the root's lock is taken only to act, and only in the root that is written.
Everything it changes in a root of ours is backed up first into ``<root>/.backup/``
(named in the output) unless ``--no-backup``. A second run finds nothing to do and says
"nothing to fix".

Checkpoints of other tools (Hugging Face Trainer ``checkpoint-N`` folders and output dirs,
Accelerate ``save_state`` folders and project dirs, Lightning ``.ckpt`` files and folders
of them, single ``torch.save`` files: :mod:`~async_ckpt.tools.legacy`) are only read:
each becomes a committed ``checkpoint-<step>`` in a root of its own, ``--out DIR`` or by
default ``<source>.async_ckpt`` beside the tool's folder (for one checkpoint inside a
tool's folder, beside that folder), so the tool keeps resuming from its own folder and
nothing of ours appears where it looks. The step is the one the tool recorded, and the
plan says where it came from. Items: ``model``, ``optimizer``, ``scheduler``, ``progress``,
``rng`` (+ ``config``, ``tokenizer``, ``scaler``, ``data``, ``trainer_state``,
``lightning``). A checkpoint that cannot be read is reported and left as it is; one whose
step is already committed in the destination is "already converted".

What it does in a root of ours, per entry (or the one PATH):

* leftovers of crashed saves (``.checkpoint-N.tmp-*``, final-named folders with neither
  manifest nor marker, its own ``.fix-*`` scratch folders): moved to the backup / removed;
* a missing or damaged ``COMMIT`` marker: rewritten, only when the manifest is valid,
  proves itself intact (its ``self_sha256``, FORMAT.md section 2.3) and every chunk
  verifies; a manifest that is damaged or carries no self digest is never re-signed;
* a committed step without RNG or training state: rewritten with RNG derived from
  (``--seed``, step) and ``{"step": N}``, both marked *reconstructed* (verify then says
  PARTIAL and names them: synthesised state is never the original run's);
* a corrupt step: only with ``--quarantine``, renamed ``checkpoint-N.corrupt-<id>`` so
  ``latest_step()`` skips it. Optimizer moments and corrupt bytes cannot be rebuilt.

Exit code: the verdict after fixing, as for verify (0 complete, 1 partial, 2 corrupt /
uncommitted / not a checkpoint; after a conversion, that of the destination root), 64 for
usage errors (an ``--out`` the source tool would trip over among them).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from ..errors import CheckpointError, RootBusyError, StorageError
from ..format import names
from ..storage.commit import RenameCommit
from ..storage.native_files import fsync_dir
from . import legacy, verify
from .verify import CORRUPT, EXIT_CODES, EXIT_USAGE, NOT_A_CHECKPOINT, OURS, UNCOMMITTED, Repair, StepReport

BACKUP_DIR = ".backup"
_SCRATCH = re.compile(r"\.fix-[0-9a-f]{8,32}")


@dataclass
class Action:
    what: str                      # one line for the plan
    run: Callable[[], str]         # does it; returns one line for the log


class Fixer:
    """Plans and applies the repairs for one PATH. Single-threaded. Planning only reads;
    acting holds the lock of the one root it writes (PATH's root of ours, or the
    destination of a conversion), never a lock in another tool's folder."""

    def __init__(self, path: Path, *, seed: int = 0, backup: bool = True, quarantine: bool = False,
                 step: int | None = None, out=None, dest: Path | None = None) -> None:
        self.path = Path(path)
        self.seed = seed
        self.backup = backup
        self.quarantine = quarantine
        self.step = step
        self.out = out or sys.stdout
        self.actions: list[Action] = []
        self.cannot: list[str] = []
        self.already: list[str] = []
        self._policy: RenameCommit | None = None
        self.dest_arg = Path(dest) if dest is not None else None
        # Another tool's checkpoints: read only, converted into a root of their own (dest).
        self.source = legacy.find_root(self.path)          # a folder of them
        self.home: Path | None = None
        self.listed: list[Path] = []
        self.entries: list[Path] = []
        if self.source is not None:
            self.home, self.listed, self.entries = self.source.home, self.source.listed, self.source.entries
        elif legacy.detect(self.path) is not None:         # one of them
            parent = legacy.root_of(self.path)
            self.home = parent.home if parent is not None else self.path
            self.listed = parent.listed if parent is not None else []
            self.entries = [self.path]
        self.converting = self.home is not None
        self.dest_refused: str | None = None
        if self.converting:
            self.is_root = self.source is not None
            self.dest = Path(os.path.abspath(self.dest_arg if self.dest_arg is not None
                                             else legacy.default_dest(self.home)))
            self.root = self.dest                           # the only root written
        else:
            self.is_root = verify.is_root(self.path)
            self.root = self.path if self.is_root else self.path.parent
        self.result_path = self.path   # what to verify afterwards (a conversion's or quarantine's target)

    @property
    def policy(self) -> RenameCommit:
        """The root's commit policy (local files: rename-based), built on first use."""
        if self._policy is None:
            from ..storage.native_files import NativeStorage
            self._policy = RenameCommit(NativeStorage(), str(self.root))
        return self._policy

    # ------------------------------------------------------------------ helpers

    def _say(self, line: str = "") -> None:
        self.out.write(line + "\n")
        self.out.flush()

    def backup_dir(self) -> Path:
        """``<root>/.backup``, created as a real directory. A planted symlink (or anything else
        that is not a directory) under that name is refused: nothing is written through it."""
        base = self.root / BACKUP_DIR
        try:
            os.mkdir(base, 0o755)
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(base).st_mode):
            raise StorageError(errno.ELOOP, f"{BACKUP_DIR} is not a real directory (a symlink?); refusing to "
                                            "write backups through it", str(base))
        return base

    def backup_path(self, name: str) -> Path:
        """A new name for ``name`` inside the backup directory (nothing there is replaced)."""
        base = self.backup_dir()
        target = base / name
        n = 1
        while os.path.lexists(target):
            target = base / f"{name}.{n}"
            n += 1
        return target

    def _set_aside(self, path: Path) -> str:
        """Move ``path`` into the backup (or delete it with --no-backup); return what happened.
        A symlink is moved or removed itself, never followed."""
        if self.backup:
            target = self.backup_path(path.name)
            os.rename(path, target)
            fsync_dir(str(self.root))
            return f"backup: {target}"
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)      # never follows symlinks inside
        else:
            path.unlink()
        fsync_dir(str(self.root))
        return "deleted (--no-backup)"

    # ------------------------------------------------------------------ planning

    def plan(self) -> verify.StepReport | verify.RootReport:
        if self.converting:
            return self._plan_import()
        report = verify.check_path(self.path, step=self.step if self.is_root else None)
        if isinstance(report, verify.RootReport):
            for rep in report.steps:
                self._plan_one(rep)
            for e in sorted(os.scandir(self.root), key=lambda e: e.name):
                if _SCRATCH.fullmatch(e.name) and e.is_dir(follow_symlinks=False):
                    p = Path(e.path)
                    self.actions.append(Action(f"remove {e.name} (scratch left by an interrupted fix)",
                                               lambda p=p: self._set_aside(p)))
        else:
            self._plan_one(report)
        return report

    def _plan_one(self, rep: StepReport) -> None:
        """Plan one entry; what cannot even be looked at is reported, never raised."""
        try:
            self._plan_step(rep)
        except (CheckpointError, OSError, ValueError) as e:
            self.cannot.append(f"{rep.name}: cannot be planned ({type(e).__name__}: {e})")

    def _plan_step(self, rep: StepReport) -> None:
        path = Path(rep.path)
        name = rep.name
        if rep.deleted:
            self.already.append(f"{name}: {rep.reason}")
            return
        if rep.verdict == NOT_A_CHECKPOINT:
            self.cannot.append(rep.reason)
            return
        if rep.layout == OURS and rep.finding(Repair.REMOVE_LEFTOVER) is not None:
            strangers = [e.name for e in os.scandir(path) if not names.is_data_file_name(e.name)]
            if strangers:   # not only our data files: somebody else's folder, leave it alone
                self.cannot.append(f"{name}: holds files this tool does not recognise "
                                   f"({', '.join(sorted(strangers)[:5])}); left alone")
                return
            self.actions.append(Action(f"remove {name}: leftover of a crashed save",
                                       lambda: self._set_aside(path)))
            return
        if rep.layout == "leftover":
            self.actions.append(Action(f"remove {name}: leftover of a crashed save",
                                       lambda: self._set_aside(path)))
            return
        if rep.layout in legacy.LAYOUT_NAMES:
            self.cannot.append(f"{name}: another tool's checkpoint inside a root of ours; run fix on it to "
                               "convert it into a root of its own")
            return
        if names.parse_quarantine_dir(name) is not None:
            return   # already quarantined
        if rep.finding(Repair.REWRITE_MARKER) is not None:
            self.actions.append(Action(f"{name}: write a new commit marker ({rep.reason}); the manifest "
                                       "is valid and every chunk verifies",
                                       lambda: self._rewrite_marker(path, rep.step)))
            return
        if rep.verdict == CORRUPT:
            self._plan_corrupt(rep, path)
            return
        if rep.verdict == UNCOMMITTED and names.parse_step_dir(name) is not None:
            why = "; ".join([rep.reason] + [n for n in rep.notes if "self digest" in n])
            self.cannot.append(f"{name} is not committed ({why})")
            return
        adds = [k for f in rep.findings if f.repair is Repair.ADD_RECONSTRUCTED for k in f.kinds]
        if adds:
            label = " and ".join(verify.COMPONENT_NAMES[k] for k in adds)
            self.actions.append(Action(f"{name}: add {label}, reconstructed from seed {self.seed} and "
                                       f"step {rep.step}",
                                       lambda: self._add_items(path, rep.step, adds)))
        self._cannot_reconstruct(rep)

    def _cannot_reconstruct(self, rep: StepReport) -> None:
        """What is missing and no repair adds, with its cost."""
        kind_of = {cost: kind for kind, _, _, cost in verify.COMPONENTS}
        for cost in rep.missing:
            if kind_of.get(cost) not in ("rng", "progress"):
                self.cannot.append(f"{rep.name}: {cost} (cannot be reconstructed)")

    def _plan_corrupt(self, rep: StepReport, path: Path) -> None:
        what = (f"{len(rep.bad_chunks)} bad chunk(s)" if rep.bad_chunks else "; ".join(rep.problems[:3]))
        if self.quarantine and rep.step is not None:
            self.actions.append(Action(f"{rep.name}: quarantine it ({what}) so restore skips it",
                                       lambda: self._quarantine(path, rep.step)))
        else:
            self.cannot.append(f"{rep.name} is CORRUPT ({what}): corrupt data cannot be rebuilt; "
                               "re-run with --quarantine to set it aside")

    def _plan_import(self) -> verify.StepReport | verify.RootReport:
        """Plan the conversion of another tool's checkpoints into ``self.dest``; reads only."""
        report = verify.check_path(self.path, step=self.step if self.is_root else None)
        self.dest_refused = legacy.dest_problem(self.dest, self.entries, self.listed,
                                                self.source.path if self.source is not None else None)
        if self.dest_refused is not None:
            return report
        if self.dest.is_dir():
            self.result_path = self.dest
        planned: dict[int, str] = {}
        for rep in (report.steps if isinstance(report, verify.RootReport) else [report]):
            if rep.layout in legacy.LAYOUT_NAMES:
                try:
                    self._plan_convert(rep, planned)
                except (CheckpointError, OSError, ValueError) as e:
                    self.cannot.append(f"{rep.name}: cannot be planned ({type(e).__name__}: {e})")
            elif rep.layout in (OURS, "leftover"):
                where = self.source.description if self.source is not None else "another tool's folder"
                self.cannot.append(f"{rep.name}: in our layout inside a {where}; left alone (fix writes "
                                   "nothing into another tool's folder)")
        return report

    def _plan_convert(self, rep: StepReport, planned: dict[int, str]) -> None:
        path = Path(rep.path)
        if rep.deleted or rep.verdict == NOT_A_CHECKPOINT:
            self.cannot.append(f"{rep.name}: {rep.reason or 'gone'}")
            return
        found = legacy.detect(path)
        if found is None:
            self.cannot.append(f"{rep.name}: changed while being planned; run fix again")
            return
        found.layout, found.step, found.step_source = rep.layout, rep.step, rep.step_source
        if rep.verdict == CORRUPT:
            self.cannot.append(f"{rep.name}: cannot convert, unreadable: {'; '.join(rep.problems)} "
                               "(left as it is)")
            return
        step = found.step if found.step is not None else 0
        if step > names.MAX_STEP:
            self.cannot.append(f"{rep.name}: cannot convert, its step {step} exceeds the largest step the format "
                               f"allows ({names.MAX_STEP})")
            return
        if step in planned:
            self.already.append(f"{rep.name}: step {step} again, as in {planned[step]}: converted once, "
                                f"from {planned[step]}")
            return
        planned[step] = rep.name
        target = self.dest / names.step_dir_name(step)
        if os.path.lexists(target):
            if self.dest.is_dir() and self.policy.status(target.name).committed:
                self.already.append(f"{rep.name}: already converted into {target}")
            else:
                self.cannot.append(f"{rep.name}: cannot convert, {target} exists and is not a committed step")
            return
        self.actions.append(Action(f"{rep.name}: convert {found.description}, step {step} (from "
                                   f"{found.step_source or 'its name'}), into {target}",
                                   lambda: self._convert(found, target)))
        self._cannot_reconstruct(rep)

    # ------------------------------------------------------------------ actions

    def _rewrite_marker(self, step_dir: Path, step: int) -> str:
        """A new marker for a step whose manifest proves itself intact. The old marker (whatever
        it is: a file, a FIFO, a symlink) is moved into the backup, never opened or followed."""
        marker = step_dir / names.COMMIT_NAME
        msg = "old marker: none"
        moved = None
        if os.path.lexists(marker):
            if self.backup:
                target = self.backup_path(step_dir.name)
                target.mkdir()
                moved = target / names.COMMIT_NAME
                os.rename(marker, moved)
                msg = f"backup: {moved}"
            else:
                msg = "old marker overwritten (--no-backup)"
        try:
            self.policy.rewrite_marker(step)      # refuses a manifest that cannot prove itself intact
        except BaseException:
            if moved is not None and not os.path.lexists(marker):
                os.rename(moved, marker)
            raise
        return f"wrote {marker}; {msg}"

    def _quarantine(self, step_dir: Path, step: int) -> str:
        target = self.root / self.policy.quarantine(step)
        if self.result_path == step_dir:
            self.result_path = target
        return f"renamed to {target.name} (nothing deleted; restore ignores it)"

    def _swap_in(self, step: int, state: dict, meta: dict, original: Path | None,
                 metrics: dict | None = None) -> str:
        """Write ``state`` as committed ``step`` into a new tmp location, then commit it,
        in place of ``original`` when given: the original is untouched until the new step
        is complete, then moved to the backup, and put back if the final rename fails."""
        from .. import faults
        from ..pipeline.saving import abort_quietly, write_state

        policy = self.policy
        location = policy.begin(step)
        try:
            manifest = write_state(policy.storage, location, step, state, item_meta=meta, metrics=metrics)
            if original is None:
                final = Path(policy.publish(location, step, manifest, faults.hit))
                return f"wrote {final}"
            aside = self.backup_path(original.name) if self.backup else self.root / names.tmp_dir_name(step)
            final = Path(policy.replace(location, step, manifest, str(aside)))
        except BaseException:
            abort_quietly(policy, location)
            raise
        if self.backup:
            return f"wrote {final}; original kept in {aside}"
        policy.storage.remove(str(aside))
        return f"wrote {final}; original deleted (--no-backup)"

    def _convert(self, found: legacy.LegacyCheckpoint, target: Path) -> str:
        conv = legacy.load_state(found, self.seed)
        if self.dest / names.step_dir_name(conv.step) != target:
            raise RuntimeError(f"{found.path.name} changed since it was planned (step {conv.step} now); "
                               "run fix again")
        if os.path.lexists(target):
            raise RuntimeError(f"{target} appeared meanwhile; run fix again")
        result = self._swap_in(conv.step, conv.state, conv.item_meta, None)
        return "; ".join([result] + conv.notes)

    def _add_items(self, step_dir: Path, step: int, kinds: list[str]) -> str:
        from .. import rng
        from ..format.manifest import ItemEntry
        from ..pipeline.restore import load_items

        status = self.policy.status(step_dir.name)
        manifest = status.manifest
        if not status.committed or manifest is None or manifest.world_size != 1:
            raise RuntimeError("only committed single-rank steps can be extended")
        state = load_items(self.policy.storage, str(step_dir), manifest)
        meta = dict(manifest.section(0).items)
        if "rng" in kinds:
            name = "rng" if "rng" not in state else "rng_reconstructed"
            state[name] = rng.derived(self.seed, step)
            meta[name] = ItemEntry("rng", f"derived from seed {self.seed}", reconstructed=True)
        if "progress" in kinds:
            name = "progress" if "progress" not in state else "progress_reconstructed"
            state[name] = {"step": step}
            meta[name] = ItemEntry("progress", "step from the folder name", reconstructed=True)
        return self._swap_in(step, state, meta, step_dir, dict(manifest.metrics))

    # ------------------------------------------------------------------ driver

    def run(self, dry_run: bool = False) -> int:
        if dry_run or self.converting:
            return self._run(dry_run)      # no lock: a dry run writes nothing; a conversion locks dest
        try:
            release = self._lock()
        except RootBusyError as e:
            self._say(f"fix: {e}; stop the training run first")
            return EXIT_CODES[CORRUPT]
        except StorageError as e:
            self._say(f"fix: cannot take the root's lock: {e}")
            return EXIT_CODES[CORRUPT]
        try:
            return self._run(dry_run)
        finally:
            if release is not None:
                release()

    def _lock(self):
        if not self.root.is_dir():
            return None
        try:
            return self.policy.lock()
        except (RootBusyError, StorageError):
            raise         # busy, or a planted lock file (a symlink): never act without the lock
        except OSError:
            return None   # read-only root: the plan still prints; acting will fail plainly

    def _run(self, dry_run: bool) -> int:
        from . import report as report_mod

        before = self.plan()
        if self.dest_refused is not None:      # a destination the tool would trip over: nothing planned
            self._say(f"fix: cannot convert into {self.dest}: {self.dest_refused}")
            return EXIT_USAGE if self.dest_arg is not None else EXIT_CODES[CORRUPT]
        if before.verdict == NOT_A_CHECKPOINT and not self.actions:
            for line in self.cannot or [getattr(before, "reason", "") or f"{self.path}: no checkpoints"]:
                self._say(f"fix: {line}")
            return EXIT_CODES[NOT_A_CHECKPOINT]
        self._say(f"fix {self.path}")
        if self.converting:
            what = (f"{self.source.description}, {len(self.entries)} checkpoint{'s' * (len(self.entries) != 1)}"
                    if self.source is not None else legacy.LAYOUT_NAMES.get(getattr(before, "layout", ""),
                                                                          "a checkpoint of another tool"))
            self._say(f"  source: {what}; read only, nothing in it changes (its tool still resumes from it)")
            how = "--out" if self.dest_arg is not None else f"default: beside {self.home.name}; --out DIR to choose"
            self._say(f"  converted steps go to: {self.dest} ({how})")
        for line in self.already:
            self._say(f"  {line}")
        if not self.actions:
            self._say("nothing to fix" + (" (what is left cannot be fixed, see below)" if self.cannot else ""))
        else:
            self._say("plan:")
            for i, a in enumerate(self.actions, 1):
                self._say(f"  {i}. {a.what}")
            if self.backup and not self.converting:
                self._say(f"  backups go to {self.root / BACKUP_DIR}")
        for line in self.cannot:
            self._say(f"  cannot fix: {line}")
        if dry_run or not self.actions:
            if dry_run and self.actions:
                self._say("dry run: nothing changed")
            if self.result_path != self.path and not dry_run:
                return self._verify_result().exit_code
            return before.exit_code
        release = None
        if self.converting:
            try:
                release = self._open_dest()
            except RootBusyError as e:
                self._say(f"fix: {e}; stop the training run first")
                return EXIT_CODES[CORRUPT]
            except (StorageError, OSError) as e:
                self._say(f"fix: cannot write {self.dest}: {e}")
                return EXIT_CODES[CORRUPT]
        failed = 0
        try:
            for i, a in enumerate(self.actions, 1):
                try:
                    self._say(f"  {i}. done: {a.run()}")
                except Exception as e:  # noqa: BLE001 - report every failure, keep going with the rest
                    failed += 1
                    self._say(f"  {i}. FAILED: {type(e).__name__}: {e}")
        finally:
            if release is not None:
                release()
        self._say("")
        self._say("result:")
        after = self._verify_result()
        report_mod.render(after, self.out)
        return max(after.exit_code, 2) if failed else after.exit_code

    def _open_dest(self):
        """Create the destination root (only now: a plan never writes) and take its lock."""
        os.makedirs(self.dest, exist_ok=True)
        self.result_path = self.dest
        if not stat.S_ISDIR(os.lstat(self.dest).st_mode):
            raise StorageError(errno.ENOTDIR, "not a directory", str(self.dest))
        return self.policy.lock()

    def _verify_result(self) -> verify.StepReport | verify.RootReport:
        if self.converting:
            return verify.check_path(self.result_path, step=self.step)
        return verify.check_path(self.result_path, step=self.step if self.is_root else None)


# ----------------------------------------------------------------------------- CLI

HELP_EPILOG = """\
exit codes (the verdict after fixing, as for verify):
  0   COMPLETE      1   PARTIAL (what cannot be reconstructed is listed)
  2   CORRUPT / UNCOMMITTED / not a checkpoint / an action failed
  64  usage error

Other tools' checkpoints (Hugging Face Trainer, Accelerate, Lightning, torch.save files, or
a folder of them) are only read: they are converted into a new root, --out DIR or by
default <source>.async_ckpt beside the tool's folder, so the tool still resumes from its
own folder. Backups of what fix changes in a root of ours go to <root>/.backup/ unless
--no-backup. --dry-run writes nothing. Running fix twice is safe: the second run says
"nothing to fix".
"""


def build_parser() -> argparse.ArgumentParser:
    p = verify.UsageParser(prog="python -m async_ckpt.fix",
                description="Repair a checkpoint root, step or legacy checkpoint: remove crashed saves' "
                            "leftovers, re-commit verified steps, convert legacy layouts, add missing RNG "
                            "state, quarantine corrupt steps.",
                epilog=HELP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a manager's root, a checkpoint-N directory, another tool's checkpoint "
                                "or a folder of them")
    p.add_argument("--out", metavar="DIR",
                   help="where other tools' checkpoints are converted to (a root of ours; default: "
                        "<source>.async_ckpt beside the tool's folder, never inside what the tool reads)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument("--no-backup", action="store_true", help="delete instead of moving to <root>/.backup/")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for reconstructed RNG states (derived from seed and step; default 0)")
    p.add_argument("--quarantine", action="store_true",
                   help="rename corrupt steps to checkpoint-N.corrupt-<id> so restore skips them")
    p.add_argument("--step", type=verify.non_negative_int, help="in a root, fix only this step")
    p.add_argument("--endpoint", metavar="URL",
                   help="S3 endpoint for s3:// paths (default: $AWS_ENDPOINT_URL_S3, then $AWS_ENDPOINT_URL, "
                        "then AWS); credentials and region come from the AWS_* environment variables")
    return p


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    from ..storage import is_url
    if args.out is not None and is_url(args.path):
        build_parser().error("--out applies to other tools' checkpoints on local paths")
    if is_url(args.path):       # a store without rename: the repairs it allows (tools/fix_store.py)
        from ..storage.kvstore import endpoint_override
        from .fix_store import StoreFixer
        try:
            with endpoint_override(args.endpoint):
                return StoreFixer(args.path, backup=not args.no_backup, quarantine=args.quarantine,
                                  step=args.step).run(dry_run=args.dry_run)
        except (CheckpointError, OSError, ValueError) as e:    # unreachable store, unsupported URL
            print(f"fix: {args.path}: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_CODES[CORRUPT]
    try:
        fixer = Fixer(Path(args.path), seed=args.seed, backup=not args.no_backup,
                      quarantine=args.quarantine, step=args.step, dest=args.out)
        if args.out is not None and not fixer.converting:
            build_parser().error(f"--out applies to other tools' checkpoints; {args.path} is not one")
        return fixer.run(dry_run=args.dry_run)
    except (CheckpointError, OSError, ValueError) as e:   # e.g. a root that cannot be listed
        print(f"fix: {args.path}: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_CODES[CORRUPT]


if __name__ == "__main__":
    sys.exit(main())
