"""Parts: a plan split by output shard into N pieces that run independently (processes, machines, Slurm, Ray).

Part K of N owns some of the plan's output shards, balanced by bytes and always the same for the same
plan and N (:func:`split`), and the units written into them. Each part writes its own shards into the
shared ``OUT.partial/`` and journals its finished units in its own journal there
(``.streammerge-journal.part-K-of-N``), so a part killed at any point is continued by running it again,
and running a finished part again does nothing. ``OUT.partial/`` also says how many parts the run was
split into (``.streammerge-parts``); parts of another split, or a whole run, refuse it.

When every part's journal lists all its units, the output is assembled once (:func:`finish`): config,
index and manifest are written and the folder is renamed to ``OUT``. The part that completes the set
does it; ``streammerge finish plan.json`` does it too (and says which parts are missing). Torch-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass

from streammerge.errors import OutputError, PlanMismatch, StreamMergeError
from streammerge.journal import PLAN_FILE, partial_path, plan_identity, read_journal
from streammerge.manifest import manifest_options, read_manifest
from streammerge.osio import CLOEXEC
from streammerge.plan.model import Plan

PARTS_FILE = ".streammerge-parts"
"""In ``OUT.partial/`` of a split run: the number of parts, as text."""
FINISH_LOCK = ".streammerge-finish-lock"
"""In ``OUT.partial/``: held while the output is assembled, so only one process does it."""


def journal_file(index: int, count: int) -> str:
    """The journal of part ``index`` (1-based) of ``count``, inside ``OUT.partial/``."""
    return f".streammerge-journal.part-{index}-of-{count}"


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``count`` (1-based): the output shards it writes and the units in them, in plan order."""

    index: int
    count: int
    shards: tuple[int, ...]
    units: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def journal(self) -> str:
        return journal_file(self.index, self.count)

    def bytes(self, plan: Plan) -> int:
        """Bytes of the shard files this part writes."""
        return sum(plan.shards[s].size for s in self.shards)


def parse(text: str) -> tuple[int, int]:
    """``"3/8"`` -> (3, 8); StreamMergeError for anything else."""
    k, sep, n = text.partition("/")
    if sep and k.strip().isdigit() and n.strip().isdigit() and 1 <= int(k) <= int(n):
        return int(k), int(n)
    raise StreamMergeError(f"--part {text!r}: expected K/N with 1 <= K <= N, e.g. 3/8")


def split(plan: Plan, count: int) -> list[tuple[int, ...]]:
    """The shard indices of each of ``count`` parts: largest shards first, each to the part with the
    fewest bytes so far (ties to the lower part). Deterministic: the same plan and count always
    give the same parts, on every machine."""
    if not 1 <= count <= len(plan.shards):
        raise StreamMergeError(
            f"{plan.out}: cannot split {len(plan.shards)} output shard{'s' if len(plan.shards) != 1 else ''} into {count} parts; "
            f"use at most {len(plan.shards)} part{'s' if len(plan.shards) != 1 else ''}, or plan with a smaller --max-shard-size "
            "for more shards"
        )
    loads = [0] * count
    owned: list[list[int]] = [[] for _ in range(count)]
    for s in sorted(range(len(plan.shards)), key=lambda i: (-plan.shards[i].size, i)):
        k = min(range(count), key=lambda j: (loads[j], j))
        loads[k] += plan.shards[s].size
        owned[k].append(s)
    return [tuple(sorted(o)) for o in owned]


def part(plan: Plan, index: int, count: int) -> Part:
    """Part ``index`` (1-based) of ``count`` of ``plan``."""
    if not 1 <= index <= count:
        raise StreamMergeError(f"part {index}/{count}: expected 1 <= K <= N")
    shards = split(plan, count)[index - 1]
    mine = set(shards)
    return Part(index, count, shards, tuple(i for i, u in enumerate(plan.units) if u.shard in mine))


def parts(plan: Plan, count: int) -> list[Part]:
    return [part(plan, k, count) for k in range(1, count + 1)]


def sub_plan(plan: Plan, p: Part) -> Plan:
    """The plan restricted to ``p``'s units (for readers that walk ``plan.units``; indices are not kept)."""
    import dataclasses

    return dataclasses.replace(plan, units=tuple(plan.units[i] for i in p.units))


def recorded_count(partial: str) -> int | None:
    """How many parts ``partial`` was started with, or None when a whole run started it (or it does not exist)."""
    try:
        with open(os.path.join(partial, PARTS_FILE), encoding="ascii") as f:
            return int(f.read().strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PlanMismatch(f"{partial}: unreadable {PARTS_FILE} ({e}); remove the folder and start again") from e


def check_partial(plan: Plan, partial: str, count: int) -> None:
    """Refuse a partial folder started by another plan, a whole run, or a split into another number of parts."""
    try:
        with open(os.path.join(partial, PLAN_FILE), encoding="utf-8") as f:
            saved = f.read()
    except OSError as e:
        raise PlanMismatch(f"{partial}: no readable {PLAN_FILE} ({e.strerror or e}); remove the folder to start again") from e
    if saved != plan_identity(plan):
        raise PlanMismatch(
            f"{partial}: was started with another plan (other inputs or options, or a file changed); "
            "run the parts of that plan, or remove the folder to start again"
        )
    recorded = recorded_count(partial)
    if recorded != count:
        started = "as a whole run" if recorded is None else f"in {recorded} parts"
        fix = "(streammerge run PLAN --resume)" if recorded is None else f"(--part K/{recorded})"
        raise PlanMismatch(f"{partial}: was started {started}; continue it that way {fix}, or remove the folder to start again")


def done_units(partial: str, p: Part) -> dict[int, dict[str, int]]:
    """The units part ``p`` has journaled in ``partial`` (with their tensors' CRC-32)."""
    path = os.path.join(partial, p.journal)
    done = read_journal(path)
    stray = set(done) - set(p.units)
    if stray:
        raise PlanMismatch(f"{path}: lists unit {min(stray)}, which is not in part {p.label}; remove {partial} and start again")
    return done


def already_complete(plan: Plan) -> bool:
    """Whether ``plan.out`` is a finished output of this plan (and no partial folder is left): a part run then has nothing to do."""
    if os.path.lexists(partial_path(plan.out)) or not os.path.isdir(plan.out):
        return False
    try:
        manifest = read_manifest(plan.out)
    except StreamMergeError:
        return False
    if manifest is None:
        return False
    names = {name for u in plan.units for name in (u.name, *(x.name for x in u.extra))}
    return bool(
        manifest.get("files") == {s.file: s.size for s in plan.shards}
        and set(manifest.get("tensors", {})) == names
        and manifest.get("inputs") == {"base": plan.base, "adapters": list(plan.adapters)}
        and manifest.get("options") == manifest_options(plan)
    )


@contextlib.contextmanager
def _finish_lock(partial: str) -> Iterator[bool]:
    """Hold the partial folder's finish lock (waiting for another finisher); yields False when the
    folder was assembled and renamed meanwhile."""
    path = os.path.join(partial, FINISH_LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | CLOEXEC, 0o644)
    except FileNotFoundError:
        yield False  # the folder is gone: renamed into place by another finisher
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            alive = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            alive = False
        yield alive
    finally:
        os.close(fd)


def missing(plan: Plan, count: int, partial: str) -> list[tuple[Part, int]]:
    """The parts whose journals do not list all their units yet, with how many they list."""
    out = []
    for p in parts(plan, count):
        n = len(done_units(partial, p))
        if n < len(p.units):
            out.append((p, n))
    return out


def finish(plan: Plan, plan_file: str = "PLAN") -> str:
    """Assemble the output of a split run once every part is done: config, index, manifest, then the
    rename to ``OUT``. Returns what happened, for the user; OutputError naming the parts still missing.

    Safe to call from many processes at once, and again after it succeeded (then it says so).

    Example::

        streammerge.parts.finish(plan)   # after `streammerge run plan.json --part K/N` for every K
    """
    from streammerge.write import assemble

    partial = partial_path(plan.out)
    if not os.path.isdir(partial):
        if already_complete(plan):
            return f"{plan.out} is already complete"
        raise OutputError(f"{partial}: not found; run the parts first (streammerge run {plan_file} --part K/N)")
    count = recorded_count(partial)
    if count is None:
        raise OutputError(f"{partial}: was started as a whole run, not in parts; continue it with: streammerge run {plan_file} --resume")
    check_partial(plan, partial, count)
    with _finish_lock(partial) as alive:
        if not alive:
            return f"{plan.out} was completed by another part"
        left = missing(plan, count, partial)
        if left:
            said = ", ".join(f"{p.label} ({n} of {len(p.units)} units done)" for p, n in left)
            raise OutputError(
                f"{partial}: {len(left)} of {count} parts not finished: {said}; run each with: "
                f"streammerge run {plan_file} --part K/{count} (then this finishes on its own)"
            )
        crcs: dict[str, int] = {}
        for p in parts(plan, count):
            for unit_crcs in done_units(partial, p).values():
                crcs.update(unit_crcs)
        bookkeeping = [PLAN_FILE, PARTS_FILE, FINISH_LOCK, *(journal_file(k, count) for k in range(1, count + 1))]
        assemble(plan, partial, crcs, bookkeeping)
    return f"wrote {plan.out} (all {count} parts done)"
