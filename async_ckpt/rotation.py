"""Preservation policy: which committed steps to delete after a commit.

A pure function of (steps, metrics, options) so it is tested without any files.
Called by the manager's background thread right after a commit succeeds.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from .options import CheckpointManagerOptions


def steps_to_delete(steps: Sequence[int], metrics: Mapping[int, Mapping[str, float]],
                    options: CheckpointManagerOptions) -> list[int]:
    """Committed steps the policy no longer keeps; never the newest one."""
    if not steps:
        return []
    ordered = sorted(steps)
    keep = {ordered[-1]}
    if options.keep_every_n_steps:
        keep.update(s for s in ordered if s % options.keep_every_n_steps == 0)
    if options.max_to_keep is None:
        return []
    if options.best_metric is None:
        keep.update(ordered[-options.max_to_keep:])
    else:
        sign = 1.0 if options.best_mode == "min" else -1.0

        def rank(step: int) -> tuple[float, int]:
            value = metrics.get(step, {}).get(options.best_metric)
            # Steps without the metric (or with nan) rank worst; ties keep the newer step.
            if value is None or math.isnan(value):
                return (math.inf, -step)
            return (sign * value, -step)

        keep.update(sorted(ordered, key=rank)[:options.max_to_keep])
    return [s for s in ordered if s not in keep]
