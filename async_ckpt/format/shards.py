"""Sharded arrays across rank sections (docs/FORMAT.md section 6): paths and coverage.

Pure functions of a validated manifest (no IO, no torch), used by restore to find the
pieces of a logical array and by verify to check that the pieces tile it.
"""

from __future__ import annotations

from typing import Any, Iterator

from .manifest import ArrayEntry, Manifest

Path = tuple   # a tree path: item name, then keys / list indices


def array_references(tree: Any) -> Iterator[tuple[int, Path]]:
    """Every (array index, tree path) a validated tree holds; a path is the item name, then
    dict keys (as stored) and list indices (ints). Tied arrays come once per reference."""
    stack: list[tuple[Any, Path]] = [(tree, ())]
    while stack:
        node, path = stack.pop()
        if type(node) is not dict:
            continue
        tag = node.get("$")
        if tag == "dict":
            for k, v in zip(node["keys"], node["values"]):
                stack.append((v, path + (k,)))
        elif tag in ("list", "tuple"):
            for i, v in enumerate(node["v"]):
                stack.append((v, path + (("[]", i),)))
        elif tag in ("tensor", "ndarray"):
            yield node["array"], path
        elif isinstance(node.get("v"), (dict, list)):
            stack.append((node["v"], path))


def array_paths(tree: Any) -> dict[int, Path]:
    """Array index → the first tree path that references it (``("model", "0.weight")``)."""
    out: dict[int, Path] = {}
    for index, path in array_references(tree):
        out.setdefault(index, tuple(p[1] if type(p) is tuple else p for p in path))
    return out


def pieces_by_path(manifest: Manifest) -> dict[Path, list[tuple[int, int, ArrayEntry]]]:
    """Every stored piece of every sharded array, by tree path: (rank, index, entry).
    Replicas (``stored_by``) are the same bytes as the piece they name and are left out."""
    out: dict[Path, list[tuple[int, int, ArrayEntry]]] = {}
    for section in manifest.ranks:
        for j, path in array_paths(section.tree).items():
            entry = section.arrays[j]
            if entry.global_shape is not None and entry.stored_by is None:
                out.setdefault(path, []).append((section.rank, j, entry))
    return out


def _volume(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _overlap(a: ArrayEntry, b: ArrayEntry) -> bool:
    return all(max(ao, bo) < min(ao + an, bo + bn)
               for ao, an, bo, bn in zip(a.global_offset, a.shape, b.global_offset, b.shape))


def coverage_problems(manifest: Manifest) -> list[str]:
    """Why the pieces of some logical array do not tile it exactly once: pieces that
    disagree on the global shape or dtype, overlap, or leave elements uncovered."""
    problems = []
    for path, pieces in sorted(pieces_by_path(manifest).items(), key=lambda kv: str(kv[0])):
        name = ".".join(map(str, path))
        shapes = {(e.global_shape, e.dtype) for _, _, e in pieces}
        if len(shapes) > 1:
            problems.append(f"{name}: pieces disagree on the global shape or dtype: {sorted(shapes)}")
            continue
        live = [p for p in pieces if _volume(p[2].shape)]
        for i, (ra, _, a) in enumerate(live):
            for rb, _, b in live[i + 1:]:
                if _overlap(a, b):
                    problems.append(f"{name}: the pieces of rank {ra} and rank {rb} overlap")
        total = _volume(pieces[0][2].global_shape)
        covered = sum(_volume(e.shape) for _, _, e in live)
        if covered < total:
            problems.append(f"{name}: the pieces cover {covered} of {total} elements (a rank's shard is missing)")
    return problems
