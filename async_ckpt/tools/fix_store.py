"""``python -m async_ckpt.fix URL``: the repairs a store without rename allows (s3://, gs://,
ts-memory://, memory://).

Same sequence, output and exit codes as for a local root (:mod:`async_ckpt.tools.fix`):
verify → plan → act (unless ``--dry-run``) → verify again. What it does per step:

* a leftover of a crashed save (a final-named step with neither marker nor manifest, or a
  hidden tmp prefix): copied into ``<root>/.backup/`` and removed (removed only, with
  ``--no-backup``);
* a missing or mismatched ``COMMIT``: rewritten, only when the manifest is valid and every
  chunk verifies (the old marker is copied into the backup first);
* a corrupt step, only with ``--quarantine``: copied to ``checkpoint-N.corrupt-<id>``,
  then removed under its own name, marker first.

Adding reconstructed RNG or training state and converting legacy layouts rewrite a step in
place, which needs an atomic rename: on a store they are reported, not done.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from ..errors import RootBusyError
from ..format import names
from ..storage import open_root
from ..storage.commit import policy_for
from . import verify
from .verify import CORRUPT, EXIT_CODES, NOT_A_CHECKPOINT, OURS, Repair, StepReport

BACKUP_DIR = ".backup"


class StoreFixer:
    """Plans and applies the repairs for one URL (a root or one step). Single-threaded."""

    def __init__(self, url: str, *, backup: bool = True, quarantine: bool = False, step: int | None = None,
                 out: TextIO | None = None) -> None:
        self.url = url.rstrip("/")
        self.backup = backup
        self.quarantine = quarantine
        self.step = step
        self.out = out or sys.stdout
        self.storage, location = open_root(self.url)
        self.is_root = verify.is_root(self.url)
        if self.is_root:
            self.root, self.root_url = location, self.url
        else:
            self.root = location.rpartition("/")[0]
            self.root_url = self.url.rpartition("/")[0]
        self.policy = policy_for(self.storage, self.root)
        self.actions: list[tuple[str, Callable[[], str]]] = []
        self.cannot: list[str] = []
        self.result_url = self.url

    def _say(self, line: str = "") -> None:
        self.out.write(line + "\n")
        self.out.flush()

    # ------------------------------------------------------------------ planning

    def plan(self) -> StepReport | verify.RootReport:
        report = verify.check_path(self.url, step=self.step if self.is_root else None)
        for rep in report.steps if isinstance(report, verify.RootReport) else [report]:
            self._plan_step(rep)
        return report

    def _plan_step(self, rep: StepReport) -> None:
        name = rep.name
        if rep.verdict == NOT_A_CHECKPOINT:
            self.cannot.append(rep.reason)
            return
        if rep.layout == "leftover" or (rep.layout == OURS and rep.finding(Repair.REMOVE_LEFTOVER) is not None):
            strangers = [e.name for e in self.storage.list(self.policy.where(name))
                         if e.is_location or not names.is_data_file_name(e.name)]
            if rep.layout == OURS and strangers:
                self.cannot.append(f"{name}: holds objects this tool does not recognise "
                                   f"({', '.join(sorted(strangers)[:5])}); left alone")
                return
            self.actions.append((f"remove {name}: leftover of a crashed save", lambda: self._set_aside(name)))
            return
        if names.parse_quarantine_dir(name) is not None:
            return
        if rep.finding(Repair.REWRITE_MARKER) is not None and rep.step is not None:
            self.actions.append((f"{name}: write a new commit marker ({rep.reason}); the manifest is valid and "
                                 "every chunk verifies", lambda: self._rewrite_marker(name, rep.step)))
            return
        if rep.verdict == CORRUPT:
            what = f"{len(rep.bad_chunks)} bad chunk(s)" if rep.bad_chunks else "; ".join(rep.problems[:3])
            if self.quarantine and rep.step is not None:
                self.actions.append((f"{name}: quarantine it ({what}) so restore skips it",
                                     lambda: self._quarantine(name, rep.step)))
            else:
                self.cannot.append(f"{name} is CORRUPT ({what}): corrupt data cannot be rebuilt; "
                                   "re-run with --quarantine to set it aside")
            return
        for f in rep.findings:
            if f.repair is Repair.ADD_RECONSTRUCTED:
                self.cannot.append(f"{name}: {f.detail}: rewriting a step needs a store with atomic rename "
                                   "(copy the step to a local folder and fix it there)")
        kind_of = {cost: kind for kind, _, _, cost in verify.COMPONENTS}
        for cost in rep.missing:
            if kind_of.get(cost) not in ("rng", "progress"):
                self.cannot.append(f"{name}: {cost} (cannot be reconstructed)")

    # ------------------------------------------------------------------ actions

    def _backup_location(self, name: str) -> str:
        taken = {e.name for e in self.storage.list(self.storage.join(self.root, BACKUP_DIR))}
        target, n = name, 1
        while target in taken:
            target, n = f"{name}.{n}", n + 1
        return self.storage.join(self.root, BACKUP_DIR, target)

    def _set_aside(self, name: str) -> str:
        location = self.policy.where(name)
        if self.backup:
            target = self._backup_location(name)
            self.storage.move(location, target)
            return f"backup: {self.storage.describe(target)}"
        self.storage.remove(location)
        return "deleted (--no-backup)"

    def _rewrite_marker(self, name: str, step: int) -> str:
        location = self.policy.where(name)
        msg = "old marker: none"
        if self.storage.stat(location, names.COMMIT_NAME) is not None:
            if self.backup:
                target = self._backup_location(name)
                old = self.storage.get(location, names.COMMIT_NAME, 1 << 20)
                self.storage.put(target, names.COMMIT_NAME, old, replace=True)
                msg = f"backup: {self.storage.describe(target, names.COMMIT_NAME)}"
            else:
                msg = "old marker overwritten (--no-backup)"
        self.policy.rewrite_marker(step)
        return f"wrote {self.storage.describe(location, names.COMMIT_NAME)}; {msg}"

    def _quarantine(self, name: str, step: int) -> str:
        target = self.policy.quarantine(step)
        if not self.is_root:
            self.result_url = f"{self.root_url}/{target}"
        return f"copied to {target} and removed under its own name (restore ignores it)"

    # ------------------------------------------------------------------ driver

    def run(self, dry_run: bool = False) -> int:
        try:
            release = self.policy.lock()
        except RootBusyError as e:
            self._say(f"fix: {e}; stop the training run first")
            return EXIT_CODES[CORRUPT]
        try:
            return self._run(dry_run)
        finally:
            if release is not None:
                release()

    def _run(self, dry_run: bool) -> int:
        from . import report as report_mod

        before = self.plan()
        if before.verdict == NOT_A_CHECKPOINT and not self.actions:
            for line in self.cannot or [getattr(before, "reason", "") or f"{self.url}: no checkpoints"]:
                self._say(f"fix: {line}")
            return EXIT_CODES[NOT_A_CHECKPOINT]
        self._say(f"fix {self.url}")
        if not self.actions:
            self._say("nothing to fix" + (" (what is left cannot be fixed, see below)" if self.cannot else ""))
        else:
            self._say("plan:")
            for i, (what, _) in enumerate(self.actions, 1):
                self._say(f"  {i}. {what}")
            if self.backup:
                self._say(f"  backups go to {self.root_url}/{BACKUP_DIR}")
        for line in self.cannot:
            self._say(f"  cannot fix: {line}")
        if dry_run or not self.actions:
            if dry_run and self.actions:
                self._say("dry run: nothing changed")
            return before.exit_code
        failed = 0
        for i, (_, act) in enumerate(self.actions, 1):
            try:
                self._say(f"  {i}. done: {act()}")
            except Exception as e:  # noqa: BLE001 - report every failure, keep going with the rest
                failed += 1
                self._say(f"  {i}. FAILED: {type(e).__name__}: {e}")
        self._say("")
        self._say("result:")
        after = verify.check_path(self.result_url, step=self.step if self.is_root else None)
        report_mod.render(after, self.out)
        return max(after.exit_code, 2) if failed else after.exit_code
