"""Render verify/fix reports for humans (text) and machines (one JSON document).

Pure functions of the report objects in :mod:`async_ckpt.verify`; nothing here reads
checkpoints. Emoji are used only when the output stream can encode them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
from typing import Any, TextIO

from .progress import human_bytes


@dataclasses.dataclass(frozen=True)
class Symbols:
    ok: str
    missing: str
    dash: str
    arrow: str


EMOJI = Symbols("\u2705", "\u274c", "\u2014", "\u2192")
ASCII = Symbols("[ok]", "[missing]", "-", "->")

HEADLINES = {
    "COMPLETE": "ready for stable resume",
    "PARTIAL": "resumable, but not exactly",
    "CORRUPT": "do not resume from it",
    "UNCOMMITTED": "not a committed checkpoint; restore ignores it",
    "NOT A CHECKPOINT": "nothing to verify",
}


def symbols_for(stream: TextIO, plain: bool = False) -> Symbols:
    if plain:
        return ASCII
    enc = getattr(stream, "encoding", None) or "ascii"
    try:
        (EMOJI.ok + EMOJI.missing + EMOJI.dash + EMOJI.arrow).encode(enc)
    except (UnicodeEncodeError, LookupError):
        return ASCII
    return EMOJI


def _finite(node: Any) -> Any:
    """The document with every non-finite float as a string: RFC 8259 has no NaN/Infinity."""
    if isinstance(node, float) and not math.isfinite(node):
        return str(node)
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_finite(v) for v in node]
    return node


def to_json(result: Any) -> str:
    """One JSON document (strict RFC 8259): the report dataclass as a dict, plus ``exit_code``."""
    doc = dataclasses.asdict(result)
    doc["kind"] = "root" if "steps" in doc else "step"
    doc["exit_code"] = result.exit_code
    if doc["kind"] == "root":
        for d, r in zip(doc["steps"], result.steps):
            d["exit_code"] = r.exit_code
    return json.dumps(_finite(doc), indent=2, default=str, allow_nan=False)


def _when(ts: float | None) -> str:
    if ts is None:
        return "?"
    try:
        return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{ts!r} (not a representable date)"


def _component_line(c: Any, rep: Any, sym: Symbols) -> str:
    mark = sym.ok if c.present and not c.damaged else sym.missing
    if c.damaged:
        detail = f"damaged ({', '.join(c.items)})"
    elif c.present:
        detail = ", ".join(c.items)
        if c.reconstructed:
            detail += (" (reconstructed by fix: deterministic from a seed, not the original run's state)"
                       if c.kind == "rng" else " (reconstructed by fix)")
    elif c.required:
        detail = "missing"
    else:
        detail = "not saved (optional)"
    width = max(len(sym.ok), len(sym.missing))
    return f"  {mark:<{width}} {c.name:<16} {detail}"


def render_step(rep: Any, out: TextIO, *, verbose: bool = False, sym: Symbols = EMOJI,
                indent: str = "") -> None:
    w = lambda s="": out.write(indent + s + "\n")  # noqa: E731
    head = rep.name
    if rep.layout == "async_ckpt":
        bits = [f"{rep.files} file{'s' * (rep.files != 1)}", human_bytes(rep.total_bytes)]
        if rep.writer:
            bits.insert(0, rep.writer)
        head += f"  ({', '.join(bits)})"
    elif rep.layout not in ("leftover", "unknown"):
        head += f"  ({rep.layout}, {rep.files} file{'s' * (rep.files != 1)}, {human_bytes(rep.total_bytes)})"
    w(head)
    if rep.layout in ("leftover", "unknown") or rep.deleted:
        w(f"  {rep.verdict} {sym.dash} {rep.reason}")
        for f in rep.fixable:
            w(f"  fix would: {f}")
        return
    if rep.components:
        for c in rep.components:
            w(_component_line(c, rep, sym))
    if verbose:
        _render_verbose(rep, w, sym)
    if rep.layout == "async_ckpt":
        if rep.crc_checked:
            scan = rep.scan_seconds or rep.seconds
            rate = rep.bytes_checked / scan if scan > 0 else 0.0
            what = "decoded and crc-checked" if rep.deep else "crc-checked"
            w(f"  integrity: {rep.chunks} chunk{'s' * (rep.chunks != 1)} {what}, {human_bytes(rep.bytes_checked)} "
              f"read in {scan:.2f} s ({human_bytes(rate)}/s)")
        else:
            w("  integrity: marker, manifest and file sizes only (--quick: chunk crcs not checked)")
    for n in rep.notes:
        w(f"  note: {n}")
    headline = HEADLINES.get(rep.verdict, "")
    if rep.verdict == "UNCOMMITTED" and rep.reason:
        headline = f"{rep.reason}; restore ignores it"
    if rep.verdict == "COMPLETE" and any(c.reconstructed for c in rep.components if c.present):
        headline += " (with reconstructed state, see above)"
    w(f"  {rep.verdict} {sym.dash} {headline}")
    for m in rep.missing:
        w(f"    - {m}")
    for m in getattr(rep, "reconstructed", []):
        w(f"    - {m}")
    for p in rep.problems:
        w(f"    - {p}")
    if rep.bad_chunks:
        w(f"    {len(rep.bad_chunks)} bad chunk{'s' * (len(rep.bad_chunks) != 1)}:")
        for b in rep.bad_chunks:
            tensors = ", ".join(b.tensors) if b.tensors else "(no tensor data)"
            w(f"    - {b.file} offset {b.offset} ({b.length} bytes, chunk {b.chunk}): {b.error} "
              f"{sym.arrow} {tensors}")
    for f in rep.fixable:
        w(f"  fix would: {f}")


def _render_verbose(rep: Any, w: Any, sym: Symbols) -> None:
    if rep.layout == "async_ckpt":
        w(f"  writer {rep.writer or '?'}, created {_when(rep.created_unix)}, world size {rep.world_size}, "
          f"{rep.chunks} chunks in {rep.files} file{'s' * (rep.files != 1)}")
        if rep.metrics:
            w("  metrics: " + ", ".join(f"{k}={v:g}" for k, v in sorted(rep.metrics.items())))
        if len(rep.rank_bytes) > 1:
            w("  bytes per rank: " + ", ".join(f"rank {r} {human_bytes(n)}" for r, n in enumerate(rep.rank_bytes)))
    for d in rep.items:
        if d.type == "file":   # legacy layouts: one line per file
            w(f"    file {d.name}: {d.kind}, {human_bytes(d.raw_bytes)}")
            continue
        ratio = f"{d.stored_bytes / d.raw_bytes:.2f}" if d.raw_bytes else "-"
        dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(d.dtypes.items())) or "no tensors"
        flag = ", reconstructed" if d.reconstructed else ""
        w(f"    item {d.name!r}: {d.kind}{flag}, {d.type}; {d.tensors} tensors, "
          f"{human_bytes(d.raw_bytes)} raw {sym.arrow} {human_bytes(d.stored_bytes)} stored "
          f"(ratio {ratio}); {dtypes}")


ROOT_NAMES = {
    "hf_output_dir": "Hugging Face Trainer output dir",
    "accelerate_project": "Accelerate project dir",
    "lightning_dir": "folder of Lightning checkpoints",
    "legacy_dir": "folder of other tools' checkpoints",
}


def render_root(rep: Any, out: TextIO, *, verbose: bool = False, sym: Symbols = EMOJI) -> None:
    steps = [r for r in rep.steps if r.layout != "leftover"]
    leftovers = len(rep.steps) - len(steps)
    theirs = getattr(rep, "layout", "async_ckpt") != "async_ckpt"
    what = "checkpoint" if theirs else "step"
    head = f"{ROOT_NAMES.get(rep.layout, rep.layout)} {rep.path}" if theirs else f"root {rep.path}"
    out.write(f"{head}: {len(steps)} {what}{'s' * (len(steps) != 1)}"
              + (f", {leftovers} leftover{'s' * (leftovers != 1)}" if leftovers else "")
              + (f", {len(rep.quarantined)} quarantined" if rep.quarantined else "") + "\n")
    if rep.restore_step is not None:
        out.write(f"restore would pick step {rep.restore_step} (the newest committed step)\n")
    elif theirs:
        out.write("in their tool's own layout: fix converts them into a new root (see the notes)\n")
    else:
        out.write("restore would pick nothing: no committed step\n")
    for r in rep.steps:
        out.write("\n")
        render_step(r, out, verbose=verbose, sym=sym)
    for q in rep.quarantined:
        out.write(f"\n{q}\n  quarantined by fix: restore ignores it\n")
    out.write("\n")
    for n in rep.notes:
        out.write(f"note: {n}\n")
    for p in rep.passed_over:
        out.write(f"WARNING: restore passes over newer step {p.step} ({p.name}): {p.reason}\n")
    skipped = ""
    if rep.passed_over:
        listed = ", ".join(f"{p.step} ({p.verdict})" for p in rep.passed_over)
        skipped = f" (passes over newer step{'s' * (len(rep.passed_over) != 1)} {listed})"
    newest = next((r for r in rep.steps if r.layout not in ("leftover", "unknown", "async_ckpt")), None)
    if rep.restore_step is not None:
        what = f"step {rep.restore_step}: {HEADLINES.get(rep.verdict, '')}"
    elif theirs and newest is not None:
        what = f"newest, {newest.name} (step {newest.step}): {HEADLINES.get(rep.verdict, '')}"
    else:
        what = HEADLINES.get(rep.verdict, "")
    out.write(f"{rep.verdict} {sym.dash} {what}{skipped}\n")


def render(result: Any, out: TextIO, *, verbose: bool = False, plain: bool = False) -> None:
    sym = symbols_for(out, plain)
    if hasattr(result, "steps"):
        render_root(result, out, verbose=verbose, sym=sym)
    else:
        render_step(result, out, verbose=verbose, sym=sym)
