"""Names in a checkpoint root (docs/FORMAT.md section 1): step, tmp, quarantine and data files.

Pure functions of strings, no IO: the commit module, verify and fix all parse names here,
so that "what counts as a step directory" has one answer.
"""

from __future__ import annotations

import re
import secrets

MANIFEST_NAME = "manifest.json"
COMMIT_NAME = "COMMIT"
LOCK_NAME = ".async_ckpt.lock"
QUARANTINE_TAG = ".corrupt-"
MAX_STEP = (1 << 63) - 1      # steps fit a signed 64-bit integer (docs/FORMAT.md section 1)

_STEP = r"(0|[1-9][0-9]{0,18})"
_STEP_DIR = re.compile(rf"checkpoint-{_STEP}")
_TMP_DIR = re.compile(rf"\.checkpoint-{_STEP}\.tmp-[A-Za-z0-9_-]{{1,64}}")
_QUARANTINE_DIR = re.compile(rf"checkpoint-{_STEP}{re.escape(QUARANTINE_TAG)}[A-Za-z0-9_-]{{1,64}}")
_SAFE_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DATA_FILE = re.compile(r"data-r[0-9]{1,7}-[0-9]{1,7}\.bin")


def step_dir_name(step: int) -> str:
    return f"checkpoint-{step}"


def tmp_dir_name(step: int) -> str:
    return f".checkpoint-{step}.tmp-{secrets.token_hex(6)}"


def quarantine_dir_name(step: int) -> str:
    return f"checkpoint-{step}{QUARANTINE_TAG}{secrets.token_hex(4)}"


def _step_of(pattern: re.Pattern, name: str) -> int | None:
    # fullmatch: "$" would also accept a trailing newline ("checkpoint-99\n").
    m = pattern.fullmatch(name)
    if not m:
        return None
    step = int(m.group(1))
    return step if step <= MAX_STEP else None


def parse_step_dir(name: str) -> int | None:
    """The step of a final-named step directory (``checkpoint-N``), else None."""
    return _step_of(_STEP_DIR, name)


def parse_tmp_dir(name: str) -> int | None:
    """The step of an in-flight (or crashed) save's hidden directory, else None."""
    return _step_of(_TMP_DIR, name)


def parse_quarantine_dir(name: str) -> int | None:
    """The step of a directory that fix set aside (``checkpoint-N.corrupt-<id>``), else None."""
    return _step_of(_QUARANTINE_DIR, name)


def step_of_any(name: str) -> int | None:
    """The step of a final, tmp or quarantined name, else None."""
    for parse in (parse_step_dir, parse_tmp_dir, parse_quarantine_dir):
        step = parse(name)
        if step is not None:
            return step
    return None


def is_safe_file_name(name: str) -> bool:
    """A single file name a manifest may list: no separators, no dot files, not ours."""
    return bool(_SAFE_FILE.fullmatch(name)) and name not in (MANIFEST_NAME, COMMIT_NAME)


def data_file_name(rank: int, index: int) -> str:
    return f"data-r{rank}-{index}.bin"


def is_data_file_name(name: str) -> bool:
    return bool(_DATA_FILE.fullmatch(name))
