"""Checks before any byte is written: disk space, write permission, memory against the plan.

Each failure says what is needed versus what is there, so a 70B merge fails in a second rather
than after an hour. Torch-free.
"""

from __future__ import annotations

import os

import psutil

from streammerge.errors import BudgetTooSmall, OutputError
from streammerge.journal import partial_path
from streammerge.plan.model import Plan
from streammerge.sizes import format_bytes


def _folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


def check(plan: Plan, shards: tuple[int, ...] | None = None) -> None:
    """Refuse a run that cannot finish here: no write permission, too little disk or RAM.

    ``shards``: only these shards are written (one part of a split plan, :mod:`streammerge.parts`)."""
    parent = os.path.dirname(os.path.abspath(plan.out)) or "."
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: no permission to write the output folder here")
    partial = partial_path(plan.out)
    if shards is None:
        already = _folder_bytes(partial) if os.path.isdir(partial) else 0  # a run being resumed reserved its shards
        need = max(0, plan.estimate.output_bytes - already)
    else:
        files = [os.path.join(partial, plan.shards[s].file) for s in shards]
        already = sum(os.stat(f).st_blocks * 512 for f in files if os.path.exists(f))
        need = max(0, sum(plan.shards[s].size for s in shards) - already)
    free = psutil.disk_usage(parent).free
    if need > free:
        raise OutputError(f"{parent}: the output needs {format_bytes(need)} of disk, only {format_bytes(free)} is free")
    available = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    if plan.estimate.peak_host_bytes > available:
        raise BudgetTooSmall(
            f"{plan.out}: the merge needs up to {format_bytes(plan.estimate.peak_host_bytes)} of RAM, "
            f"{format_bytes(available)} is available; plan with --max-ram {format_bytes(available)} (smaller tiles) or free memory"
        )
