"""Run a plan's parts as Ray tasks: one task per part, same bytes as one machine.

The plan is split by output shard (:mod:`streammerge.parts`); each part becomes a Ray task that asks
for what the plan's estimate says one part needs (CPUs for the merge threads, ``memory`` for the peak
host bytes, a GPU when the run is on one, with the plan's device estimate as the VRAM budget) and runs
``streammerge.run(plan, part=(k, n))`` on whichever node Ray picks. Every node must see the inputs and
the output folder at the same paths (a shared filesystem), as for any split run.

A part whose worker dies (killed, out of memory, node lost) is retried by Ray; the retry continues
that part from its own journal in ``OUT.partial``, so finished tensors are not merged again. Bad
input (a :class:`~streammerge.errors.StreamMergeError` on a worker) is not retried: it is raised here
as itself. The last part to finish assembles the output, as in any split run. Progress of all parts
goes to one small actor and is drawn as one bar.

Ray is an optional dependency (``pip install 'streammerge[ray]'``); nothing here imports it before a
run asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import Any

from streammerge.errors import OutputError, StreamMergeError
from streammerge.execute import MERGE_THREADS, Progress, Report
from streammerge.journal import partial_path
from streammerge.plan.model import Plan, plan_from_dict

RETRIES = 3
"""How many times a part whose worker died is started again (Ray's ``max_retries``)."""
POLL_SECONDS = 0.25
"""How often the driver redraws the progress bar from the parts' reports."""


def _ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise StreamMergeError("--ray needs Ray: pip install 'streammerge[ray]' (or pip install ray)") from e
    return ray


@dataclasses.dataclass(frozen=True)
class PartResources:
    """What one part asks Ray for, from the plan's estimate."""

    num_cpus: float
    memory: int
    num_gpus: float
    vram_budget: int | None
    """Bytes of GPU memory the part is held to (GPU runs), else None."""

    def options(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "memory": self.memory, "num_gpus": self.num_gpus}


def resources(plan: Plan, device: str, vram_budget: int | None = None) -> PartResources:
    """The Ray resources of one part of ``plan`` on ``device`` ("cpu" or "cuda").

    A CPU part runs :data:`~streammerge.execute.MERGE_THREADS` merging threads (the writer's thread
    mostly waits on the disk); a GPU part one feeding thread and one GPU, held to ``vram_budget`` or,
    without one, to the plan's own device estimate. ``memory`` is the plan's peak host bytes: a
    part's peak is the run's (tiles are the same size), not the model's."""
    e = plan.estimate
    if device == "cuda":
        budget = vram_budget if vram_budget is not None else max(e.peak_device_bytes, 1)
        return PartResources(num_cpus=1, memory=e.peak_host_bytes, num_gpus=1, vram_budget=budget)
    return PartResources(num_cpus=MERGE_THREADS, memory=e.peak_host_bytes, num_gpus=0, vram_budget=None)


def _part_task(
    plan_json: str,
    index: int,
    count: int,
    device: str,
    vram_budget: int | None,
    reads: str,
    board: Any,
    kill: tuple[int, float, str] | None,
) -> dict[str, Any]:
    """One part, on a Ray worker: ``streammerge.run(plan, part=(index, count))``; its report as a dict.

    ``kill`` is a test hook, ``(part, fraction, marker)``: that part's worker dies (``os._exit``) once
    ``fraction`` of its bytes are done and its journal lists a unit (waiting up to 10 s for one), if the
    file ``marker`` does not exist yet (it is created first, so the retry runs to the end)."""
    import json

    import streammerge
    from streammerge import parts

    plan = plan_from_dict(json.loads(plan_json), where="the plan sent to this Ray worker")
    last = [0.0]
    journal = os.path.join(partial_path(plan.out), parts.journal_file(index, count))

    def progress(done: int, total: int, name: str) -> None:
        now = time.monotonic()
        if now - last[0] >= POLL_SECONDS / 2 or done >= total:
            last[0] = now
            board.report.remote(index, done, total, name)
        if kill is not None and kill[0] == index and done >= kill[1] * total and not os.path.exists(kill[2]):
            from streammerge.journal import read_journal

            deadline = now + 10
            while not read_journal(journal) and time.monotonic() < deadline:
                time.sleep(0.02)  # the journal's thread fsyncs and records the units written so far
            open(kill[2], "w").close()
            os._exit(1)

    report = streammerge.run(plan, part=(index, count), device=device, vram_budget=vram_budget, reads=reads, progress=progress)
    return dataclasses.asdict(report)


class _Board:
    """A Ray actor that keeps each part's latest ``(done, total, tensor)``."""

    def __init__(self) -> None:
        self.parts: dict[int, tuple[int, int, str]] = {}

    def report(self, index: int, done: int, total: int, name: str) -> None:
        self.parts[index] = (done, total, name)

    def read(self) -> dict[int, tuple[int, int, str]]:
        return dict(self.parts)


def _check_feasible(plan: Plan, need: PartResources, nodes: list[dict[str, Any]]) -> None:
    """Refuse, before submitting, parts that no node of the cluster can run (Ray would wait for one forever)."""
    wanted = {"CPU": need.num_cpus, "memory": need.memory, "GPU": need.num_gpus}
    for node in nodes:
        have = node.get("Resources", {})
        if node.get("Alive") and all(have.get(k, 0) >= v for k, v in wanted.items() if v):
            return
    most = {k: max((n.get("Resources", {}).get(k, 0) for n in nodes if n.get("Alive")), default=0) for k in wanted}
    raise StreamMergeError(
        f"{plan.out}: no Ray node can run a part: one needs {need.num_cpus:g} CPU, {need.memory / 2**20:.0f} MiB of memory"
        + (f", {need.num_gpus:g} GPU" if need.num_gpus else "")
        + f"; the largest node has {most['CPU']:g} CPU, {most['memory'] / 2**20:.0f} MiB"
        + (f", {most['GPU']:g} GPU" if need.num_gpus else "")
        + " (plan with --max-ram for smaller tiles, or add nodes)"
    )


def _cause(e: BaseException) -> BaseException | None:
    """The StreamMergeError a Ray task raised, if that is what ``e`` wraps."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, StreamMergeError) else None


def run(
    plan: Plan,
    *,
    address: str | None = None,
    parts: int | None = None,
    progress: Progress | None = None,
    device: str | None = None,
    vram_budget: int | None = None,
    reads: str = "auto",
    retries: int = RETRIES,
    _kill: tuple[int, float, str] | None = None,
) -> Report:
    """Run ``plan`` as ``parts`` Ray tasks (default: as many as the cluster's CPUs or GPUs fit, at most
    one per output shard) and return one :class:`~streammerge.execute.Report` for the whole output.

    ``address`` is passed to ``ray.init`` when Ray is not started yet (None: ``RAY_ADDRESS``, or a
    local Ray on this machine; ``"auto"``: the cluster this node belongs to). ``progress`` gets
    ``(bytes_done, bytes_total, tensor)`` summed over all parts.

    Example::

        plan = streammerge.plan("/shared/base", ["/shared/lora"], out="/shared/merged", max_shard_bytes=2**30)
        report = streammerge.run(plan, engine="ray")   # or streammerge.rayrun.run(plan, address="auto", parts=8)
    """
    # Ray's own messages (a worker that died, a task retried) go to stderr: stdout carries --json's report
    with contextlib.redirect_stdout(sys.stderr):
        return _run(plan, address, parts, progress, device, vram_budget, reads, retries, _kill)


def _run(
    plan: Plan,
    address: str | None,
    parts: int | None,
    progress: Progress | None,
    device: str | None,
    vram_budget: int | None,
    reads: str,
    retries: int,
    _kill: tuple[int, float, str] | None,
) -> Report:
    from streammerge import parts as split
    from streammerge.lock import output_lock
    from streammerge.osio import remove

    ray = _ray()
    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    wanted = device or plan.device
    cluster = ray.cluster_resources()
    on_gpu = wanted == "cuda" or (wanted == "auto" and cluster.get("GPU", 0) >= 1)
    need = resources(plan, "cuda" if on_gpu else "cpu", vram_budget)
    if parts is None:
        slots = cluster.get("GPU", 0) if on_gpu else cluster.get("CPU", 1) // max(need.num_cpus, 1)
        parts = max(1, min(len(plan.shards), int(slots)))
    split.split(plan, parts)  # refuses a count the shards cannot make, before anything runs
    _check_feasible(plan, need, ray.nodes())
    if plan.overwrite:  # the parts never remove an output; do it once, here, as a whole run would
        with output_lock(plan.out):
            for path in (plan.out, partial_path(plan.out)):
                if os.path.lexists(path):
                    remove(path)
        plan = dataclasses.replace(plan, overwrite=False)
    elif os.path.lexists(plan.out):  # as a whole run refuses it (a part alone would call a finished OUT done)
        raise OutputError(f"{plan.out}: output folder already exists; pass --overwrite to replace it")
    board = ray.remote(num_cpus=0)(_Board).remote()
    task = ray.remote(max_retries=retries, retry_exceptions=False)(_part_task)
    text = plan.to_json()
    dev = "cuda" if on_gpu else "cpu"
    pending = {
        task.options(**need.options(), name=f"streammerge part {k}/{parts}").remote(
            text, k, parts, dev, need.vram_budget, reads, board, _kill
        ): k
        for k in range(1, parts + 1)
    }
    results: dict[int, dict[str, Any]] = {}
    total = sum(u.nbytes for u in plan.units)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                k = pending.pop(ref)
                try:
                    results[k] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = _cause(e)
                    if cause is not None:
                        raise type(cause)(str(cause)) from None
                    raise
                except ray.exceptions.RayError as e:
                    raise OutputError(
                        f"{plan.out}: part {k}/{parts} failed on Ray after {retries} retries ({type(e).__name__}); its finished "
                        f"tensors are kept in {partial_path(plan.out)}: run the same command again to continue"
                    ) from e
            if progress is not None:
                seen = ray.get(board.read.remote())
                done = sum(seen[k][0] if k in seen else 0 for k in range(1, parts + 1))
                done = total if not pending else min(done, total)
                name = next((seen[k][2] for k in sorted(seen) if k not in results), "")
                progress(done, total, name)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.kill(board)
    reports = [results[k] for k in sorted(results)]
    units: dict[str, int] = {}
    for r in reports:
        for op, n in r["units"].items():
            units[op] = units.get(op, 0) + n
    notes = list(plan.notes)
    for k, r in zip(sorted(results), reports, strict=True):
        notes += [f"part {k}/{parts}: {n}" if not n.startswith("part ") else n for n in r["notes"][len(plan.notes) :]]
    notes.append(
        f"ran as {parts} Ray task{'s' if parts != 1 else ''} of {need.num_cpus:g} CPU, {need.memory / 2**20:.0f} MiB"
        + (", 1 GPU" if on_gpu else "")
    )
    return Report(
        out=plan.out,
        device=", ".join(sorted({r["device"] for r in reports})),
        seconds=time.perf_counter() - start,
        bytes_written=sum(r["bytes_written"] for r in reports),
        units=units,
        peak_rss_bytes=max(r["peak_rss_bytes"] for r in reports),
        notes=tuple(notes),
        peak_device_bytes=max(r["peak_device_bytes"] for r in reports),
        device_budget_bytes=max(r["device_budget_bytes"] for r in reports),
        reads=", ".join(sorted({r["reads"] for r in reports if r["reads"]})),
    )


__all__ = ["RETRIES", "PartResources", "resources", "run"]
