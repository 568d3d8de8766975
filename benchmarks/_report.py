"""Rows, medians, ratios, and the three outputs: markdown table, JSON, PNG chart.

Every row has a *kind* that says what it is compared with:

- ``snapshot``: time the training thread is blocked. Ceiling: the memcpy floor. Best peer:
  the shortest blocking time of any peer (a synchronous save blocks for all of it).
- ``write``: time until the bytes are durable (fsync'd / committed). Ceiling: raw write.
- ``read``: time to load (page cache dropped first). Ceiling: raw read.

"vs ceiling" is ceiling seconds / row seconds (1.00 = at the ceiling, higher is impossible
except by compression); "vs best peer" is best-peer seconds / row seconds (> 1 = faster).
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class RowDef:
    id: str
    group: str      # ceiling | peer | ours
    label: str
    kind: str       # snapshot | write | read
    info: bool = False   # a variant shown for transparency (its best is the ceiling row)


ROWS: tuple[RowDef, ...] = (
    RowDef("memcpy", "ceiling", "memcpy into preallocated buffer (snapshot floor)", "snapshot"),
    RowDef("raw_write", "ceiling", "raw sequential write + fsync (best variant)", "write"),
    RowDef("raw_write_buffered", "ceiling", "  raw write, buffered, 1 thread", "write", True),
    RowDef("raw_write_direct", "ceiling", "  raw write, O_DIRECT, 1 thread", "write", True),
    RowDef("raw_write_direct_mt", "ceiling", "  raw write, O_DIRECT, io_threads threads", "write", True),
    RowDef("raw_write_direct_huge", "ceiling", "  raw write, O_DIRECT, 1 thread, from huge pages", "write", True),
    RowDef("raw_read", "ceiling", "raw sequential read, cold cache (best variant)", "read"),
    RowDef("raw_read_buffered", "ceiling", "  raw read, buffered", "read", True),
    RowDef("raw_read_direct", "ceiling", "  raw read, O_DIRECT", "read", True),
    RowDef("raw_read_buffered_huge", "ceiling", "  raw read, buffered, into huge pages", "read", True),
    RowDef("torch_save", "peer", "torch.save + fsync", "write"),
    RowDef("safetensors_save", "peer", "safetensors save_file + fsync", "write"),
    RowDef("dcp_save", "peer", "DCP save (+ dir fsync)", "write"),
    RowDef("dcp_async_blocking", "peer", "DCP async_save: blocking part", "snapshot"),
    RowDef("dcp_async_total", "peer", "DCP async_save: until done + fsync", "write"),
    RowDef("ts_save", "peer", "tensorstore zarr3 raw + fsync", "write"),
    RowDef("ts_zstd_save", "peer", "tensorstore zarr3 zstd + fsync", "write"),
    RowDef("ours_stall_none", "ours", "save_async stall (none)", "snapshot"),
    RowDef("ours_stall_zstd", "ours", "save_async stall (zstd)", "snapshot"),
    RowDef("ours_stall_auto", "ours", "save_async stall (auto)", "snapshot"),
    RowDef("ours_commit_none", "ours", "save_async to committed (none)", "write"),
    RowDef("ours_commit_zstd", "ours", "save_async to committed (zstd)", "write"),
    RowDef("ours_commit_auto", "ours", "save_async to committed (auto)", "write"),
    RowDef("ours_save_none", "ours", "save, blocking (none)", "write"),
    RowDef("ours_kv_save", "ours", "save via TensorStore kvstore, file driver (none)", "write"),
    RowDef("torch_load", "peer", "torch.load (weights_only) + copy in place", "read"),
    RowDef("safetensors_load", "peer", "safetensors load_file + copy in place", "read"),
    RowDef("dcp_load", "peer", "DCP load (in place)", "read"),
    RowDef("ts_load", "peer", "tensorstore zarr3 raw read + copy in place", "read"),
    RowDef("ts_zstd_load", "peer", "tensorstore zarr3 zstd read + copy in place", "read"),
    RowDef("ours_restore_none", "ours", "restore in place (none)", "read"),
    RowDef("ours_restore_direct_none", "ours", "restore, decoding into live tensors (atomic=False, none)", "read"),
    RowDef("ours_restore_new_none", "ours", "restore by a new manager (allocates its staging buffer, none)", "read"),
    RowDef("ours_restore_zstd", "ours", "restore in place (zstd)", "read"),
    RowDef("ours_restore_auto", "ours", "restore in place (auto)", "read"),
    RowDef("ours_kv_restore", "ours", "restore via TensorStore kvstore, file driver (none)", "read"),
    RowDef("ours_verify_none", "ours", "verify, every chunk's CRC (none)", "read"),
)
ROW_IDS = tuple(r.id for r in ROWS)
CEILING_OF = {"snapshot": "memcpy", "write": "raw_write", "read": "raw_read"}
_BY_ID = {r.id: r for r in ROWS}


@dataclass
class Row:
    state: str
    id: str
    group: str
    label: str
    kind: str
    info: bool
    seconds: float                 # median
    samples: list[float]
    gbps: float                    # raw state bytes / seconds / 1e9
    vs_ceiling: Optional[float] = None
    vs_best_peer: Optional[float] = None
    best_peer: Optional[str] = None
    stored_ratio: Optional[float] = None     # stored bytes / raw bytes
    # Per repetition k: ceiling[k] / samples[k] and best_peer[k] / samples[k] (the contenders
    # of one repetition ran back to back, so these ratios carry less of the machine's drift).
    ceiling_ratios: list[float] = field(default_factory=list)
    peer_ratios: list[float] = field(default_factory=list)

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else math.nan

    @property
    def max(self) -> float:
        return max(self.samples) if self.samples else math.nan


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _paired(baseline: list[float], xs: list[float]) -> list[float]:
    return [b / x for b, x in zip(baseline, xs) if x > 0]


def build_rows(state: str, nbytes: int, samples: dict[str, list[float]], stored: dict[str, list[int]]) -> list[Row]:
    """Medians and ratios for one state. ``samples``: row id → seconds per repetition."""
    s = dict(samples)
    # The ceilings are the best variant's median (as in benchmarks/bench_native.py).
    for best, variants in (("raw_write", ("raw_write_buffered", "raw_write_direct", "raw_write_direct_mt",
                                          "raw_write_direct_huge")),
                           ("raw_read", ("raw_read_buffered", "raw_read_direct", "raw_read_buffered_huge"))):
        have = [v for v in variants if s.get(v)]
        if have:
            s[best] = list(s[min(have, key=lambda v: _median(s[v]))])
    med = {k: _median(v) for k, v in s.items() if v}
    rows = []
    for d in ROWS:
        if d.id not in med:
            continue
        sec = med[d.id]
        row = Row(state, d.id, d.group, d.label, d.kind, d.info, sec, s[d.id], nbytes / sec / 1e9 if sec > 0 else math.inf)
        ceiling = med.get(CEILING_OF[d.kind])
        if ceiling is not None and sec > 0:
            row.vs_ceiling = ceiling / sec
            row.ceiling_ratios = _paired(s[CEILING_OF[d.kind]], s[d.id])
        if d.group != "ceiling":
            peer_kinds = ("snapshot", "write") if d.kind == "snapshot" else (d.kind,)
            peers = [(med[p.id], p.id) for p in ROWS if p.group == "peer" and p.kind in peer_kinds and p.id in med]
            if peers:
                best_s, best_id = min(peers)
                row.vs_best_peer = best_s / sec if sec > 0 else math.inf
                row.best_peer = best_id
                row.peer_ratios = _paired(s[best_id], s[d.id])
        if stored.get(d.id):
            row.stored_ratio = _median([float(x) for x in stored[d.id]]) / nbytes
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- bars

@dataclass
class Bar:
    name: str
    state: str
    value: Optional[float]
    target: str
    met: Optional[bool]
    detail: str


def _get(rows: list[Row], state: str, rid: str) -> Optional[Row]:
    return next((r for r in rows if r.state == state and r.id == rid), None)


def _ratio_bar(name: str, state: str, x: float, target: str, met: bool, detail: str, reps: list[float]) -> Bar:
    if reps:
        detail += "; per repetition " + " ".join(f"{r:.2f}" for r in reps)
    return Bar(name, state, x, target, met, detail)


# Targets per state: commit / raw write (transformer and 20k small tensors have their own).
COMMIT_TARGET = {"transformer_adamw": 0.80, "small_20k": 0.50}


def bars(rows: list[Row], bar_state: str, states: list[str]) -> list[Bar]:
    out: list[Bar] = []
    write = _get(rows, bar_state, "raw_write")
    commit = _get(rows, bar_state, "ours_commit_none")
    dtotal = _get(rows, bar_state, "dcp_async_total")
    if write and commit:
        x = commit.gbps / write.gbps
        detail = f"{commit.gbps:.2f} GB/s committed vs raw write {write.gbps:.2f} GB/s"
        if dtotal:
            detail += f"; DCP async_save total {dtotal.gbps:.2f} GB/s = {dtotal.gbps / write.gbps:.0%} of raw"
        out.append(_ratio_bar("save_async->committed / raw disk write", bar_state, x, ">= 90%", x >= 0.90,
                              detail, commit.ceiling_ratios))
    for st in states:
        c, s, r = (_get(rows, st, "ours_commit_none"), _get(rows, st, "ours_stall_none"),
                   _get(rows, st, "ours_restore_none"))
        w, m, rd = _get(rows, st, "raw_write"), _get(rows, st, "memcpy"), _get(rows, st, "raw_read")
        if s and m:
            x = s.seconds / m.seconds
            out.append(_ratio_bar("save_async stall / memcpy floor", st, x, "<= 1.3x", x <= 1.3,
                                  f"stall {s.seconds * 1e3:.1f} ms vs memcpy {m.seconds * 1e3:.1f} ms",
                                  [1 / q for q in s.ceiling_ratios]))
        if c and w and st != bar_state:
            x = c.gbps / w.gbps
            goal = COMMIT_TARGET.get(st, 0.90)
            out.append(_ratio_bar("uncompressed commit / raw disk write", st, x, f">= {goal:.0%}", x >= goal,
                                  f"{c.gbps:.2f} vs {w.gbps:.2f} GB/s", c.ceiling_ratios))
        if c and c.vs_best_peer is not None:
            out.append(_ratio_bar("save-to-committed vs best peer", st, c.vs_best_peer, "> 1 (ahead)",
                                  c.vs_best_peer > 1, f"ours {c.seconds:.3f} s vs {c.best_peer} "
                                  f"{c.seconds * c.vs_best_peer:.3f} s", c.peer_ratios))
        if s and s.vs_best_peer is not None:
            out.append(_ratio_bar("stall vs best peer", st, s.vs_best_peer, "> 1 (ahead)",
                                  s.vs_best_peer > 1, f"ours {s.seconds * 1e3:.1f} ms vs {s.best_peer} "
                                  f"{s.seconds * s.vs_best_peer * 1e3:.1f} ms", s.peer_ratios))
        if r and rd:
            x = rd.seconds / r.seconds
            out.append(_ratio_bar("restore / raw cold read", st, x, ">= 90%", x >= 0.90,
                                  f"{r.gbps:.2f} vs {rd.gbps:.2f} GB/s", r.ceiling_ratios))
        if r and r.vs_best_peer is not None:
            out.append(_ratio_bar("restore vs best peer", st, r.vs_best_peer, "> 1 (ahead)", r.vs_best_peer > 1,
                                  f"ours {r.seconds:.3f} s vs {r.best_peer} {r.seconds * r.vs_best_peer:.3f} s",
                                  r.peer_ratios))
    return out


# ----------------------------------------------------------------------------- rendering

def _fmt_ratio(x: Optional[float]) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _fmt_seconds(x: float) -> str:
    if x < 0.01:
        return f"{x * 1e3:.2f} ms"
    if x < 1:
        return f"{x * 1e3:.0f} ms"
    return f"{x:.2f} s"


def header_lines(meta: dict[str, Any]) -> list[str]:
    m = meta["machine"]
    c = meta["config"]
    lines = [
        f"- command: `{c['command']}`",
        f"- date: {meta['date']}, git {meta.get('git', '?')}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.1f} GiB RAM, {m['kernel']}",
        f"- disk: {m['disk']}",
        f"- software: python {m['python']}, " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        f"- async_ckpt: io_threads={c['io_threads']}, chunk {c['chunk_mib']} MiB, zstd level 1, "
        f"zstd library {m.get('zstd', '?')}",
        f"- repetitions: {c['repeat']} (interleaved round-robin; median, min - max and the ratio of each "
        f"repetition shown); page cache dropped before "
        f"every read ({c['cache_drop']}); every write fsync'd",
        "- states: " + "; ".join(f"**{s['name']}**: {s['title']}, {s['tensors']:,} tensors, "
                                 f"{s['nbytes'] / 2**20:,.1f} MiB" for s in meta["states"]),
    ]
    return lines


def markdown(rows: list[Row], meta: dict[str, Any], bar_list: list[Bar]) -> str:
    out = ["# async_ckpt IO benchmark", ""] + header_lines(meta) + [""]
    out.append("GB/s = raw tensor bytes of the state / seconds (1 GB = 1e9 B). *vs ceiling*: ceiling "
               "seconds / seconds (snapshot rows against the memcpy floor, writes against raw write, reads "
               "against raw read). *vs best peer*: best peer's seconds / seconds, > 1 is faster (a synchronous "
               "peer save counts as a stall of its full length). *stored*: bytes on disk / raw bytes.")
    out.append("")
    if bar_list:
        out += ["## Bars", "", "| bar | state | value | target | met | detail |", "| --- | --- | ---: | --- | --- | --- |"]
        for b in bar_list:
            v = "" if b.value is None else (f"{b.value:.0%}" if "%" in b.target else f"{b.value:.2f}x"
                                            if "x" in b.target else f"{b.value:.2f}")
            out.append(f"| {b.name} | {b.state} | {v} | {b.target} | {'yes' if b.met else 'NO'} | {b.detail} |")
        out.append("")
    for st in meta["states"]:
        name = st["name"]
        out += [f"## {name}: {st['title']} ({st['nbytes'] / 2**20:,.1f} MiB, {st['tensors']:,} tensors)", ""]
        for q in st.get("rss") or []:
            out += [f"Memory: {q['saves']} {q['snapshot']} `save_async` calls (max_inflight_saves=1): RSS above the "
                    f"process's baseline settles at {q['over_state']:.2f}x the state ({q['over_mib']:,.0f} MiB; "
                    "samples " + " ".join(f"{x:.2f}" for x in q["samples"]) + ").", ""]
        out += ["| group | method | kind | seconds (median) | min - max | GB/s | vs ceiling | per rep | "
                "vs best peer | per rep | stored |",
                "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |"]
        for r in rows:
            if r.state != name:
                continue
            stored = "" if r.stored_ratio is None else f"{r.stored_ratio:.2f}"
            label = r.label.strip() if not r.info else "&nbsp;&nbsp;" + r.label.strip()
            spread = f"{_fmt_seconds(r.min)} - {_fmt_seconds(r.max)}" if len(r.samples) > 1 else ""
            per_c = " ".join(f"{x:.2f}" for x in r.ceiling_ratios) if len(r.samples) > 1 else ""
            per_p = " ".join(f"{x:.2f}" for x in r.peer_ratios) if len(r.samples) > 1 else ""
            out.append(f"| {r.group} | {label} | {r.kind} | {_fmt_seconds(r.seconds)} | {spread} | {r.gbps:.2f} | "
                       f"{_fmt_ratio(r.vs_ceiling)} | {per_c} | {_fmt_ratio(r.vs_best_peer)} | {per_p} | {stored} |")
        out.append("")
    return "\n".join(out)


def to_json(rows: list[Row], meta: dict[str, Any], bar_list: list[Bar]) -> str:
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    doc = {"meta": meta, "rows": [dict(asdict(r), min=r.min, max=r.max) for r in rows],
           "bars": [asdict(b) for b in bar_list]}
    return json.dumps(clean(doc), indent=1)


def chart(rows: list[Row], meta: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = [s["name"] for s in meta["states"]]
    colors = {"ceiling": "#888888", "peer": "#4c72b0", "ours": "#dd8452"}
    kinds = ("snapshot", "write", "read")
    fig, axes = plt.subplots(len(states), len(kinds), figsize=(18, 4.2 * len(states)), squeeze=False)
    for i, st in enumerate(states):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            sel = [r for r in rows if r.state == st and r.kind == kind and not r.info]
            labels = [r.label.strip() for r in sel]
            if kind == "snapshot":
                vals = [r.seconds * 1e3 for r in sel]
                ax.set_xlabel("milliseconds the caller is blocked (lower is better)")
            else:
                vals = [r.gbps for r in sel]
                ax.set_xlabel("GB/s of raw state bytes (higher is better)")
            y = range(len(sel))
            ax.barh(list(y), vals, color=[colors[r.group] for r in sel])
            ax.set_yticks(list(y))
            ax.set_yticklabels(labels, fontsize=8)
            ax.invert_yaxis()
            for k, v in enumerate(vals):
                ax.text(v, k, f" {v:.2f}" if kind != "snapshot" else f" {v:.0f}", va="center", fontsize=7)
            ax.set_title(f"{st}: {kind}", fontsize=10)
    fig.suptitle(f"async_ckpt IO benchmark: {meta['machine']['cpu']}, {meta['machine']['disk']} "
                 f"(median of {meta['config']['repeat']}; grey ceiling, blue peers, orange ours)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)
