"""streammerge: merge LoRA adapters into Hugging Face safetensors models out of core.

Three steps, each its own module, with plain data between them::

    import streammerge
    plan = streammerge.plan("./base", ["./my-lora"], out="./merged", dtype="bfloat16")
    print(plan.estimate)            # peak host/device bytes, output bytes, unit counts
    plan.save("plan.json")          # streammerge.Plan.load("plan.json") gives it back
    report = streammerge.run(plan)  # writes ./merged atomically; timings, bytes written
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

from streammerge.errors import (
    AdapterMismatch,
    BadAdapter,
    BadCheckpoint,
    BudgetTooSmall,
    OutputError,
    PlanMismatch,
    StreamMergeError,
    UnsupportedAdapter,
)
from streammerge.plan import Estimate, Plan, WorkUnit, plan

if TYPE_CHECKING:
    from streammerge.execute import Progress, Report

__version__ = "0.1.0"


def run(
    plan: Plan,
    *,
    progress: Progress | bool | None = None,
    device: str | None = None,
    resume: bool = False,
    vram_budget: int | None = None,
    reads: str = "auto",
    part: tuple[int, int] | None = None,
    engine: str = "local",
    address: str | None = None,
    parts: int | None = None,
    pack_to: str | None = None,
) -> Report:
    """Execute a plan and return its :class:`~streammerge.execute.Report` (timings, bytes, peak RSS).

    ``progress=True`` draws the CLI's progress bar on stderr; a callable gets
    ``(bytes_done, bytes_total, tensor_name)`` after every tile. ``resume=True`` continues an
    interrupted run of the same plan from its ``OUT.partial`` journal. ``reads`` is ``auto``
    (base tiles read with ``O_DIRECT`` unless they are mostly in the page cache already or the
    filesystem refuses it), ``direct`` or ``mmap``. ``part=(k, n)`` runs only part k of n of the
    plan (:mod:`streammerge.parts`: one of many processes or machines writing the same output). See
    :func:`streammerge.execute.run`. torch is imported here, not at ``import streammerge``, so
    planning stays fast and light.

    ``engine="ray"`` runs the plan's parts as Ray tasks instead (:func:`streammerge.rayrun.run`:
    ``parts`` of them, by default as many as the cluster fits; ``address`` for ``ray.init``), with the
    same bytes as a run on one machine. ``pack_to`` also writes the output packed there
    (:mod:`streammerge.pack`), compressed from the writer's stream on a whole run.
    """
    if engine not in ("local", "ray"):
        raise StreamMergeError(f"engine {engine!r}: expected 'local' or 'ray'")
    if engine == "ray":
        if part is not None:
            raise StreamMergeError("engine='ray' runs every part itself; part=(k, n) is for one part run by hand")
        from streammerge import rayrun

        def on_ray(progress: Progress | None) -> Report:
            report = rayrun.run(plan, address=address, parts=parts, progress=progress, device=device, vram_budget=vram_budget, reads=reads)
            if pack_to is None:
                return report
            from streammerge.pack import pack

            packed = pack(plan.out, pack_to, overwrite=plan.overwrite)  # parts: from the finished output
            note = f"packed {packed.dest} after the merge: {packed.raw_bytes} -> {packed.packed_bytes} bytes ({packed.ratio:.3f}x)"
            return dataclasses.replace(report, notes=(*report.notes, note))

        if progress is True:
            from streammerge.progress import ProgressBar

            ray_bar = ProgressBar()
            try:
                return on_ray(ray_bar)
            finally:
                ray_bar.close()
        return on_ray(progress or None)
    from streammerge.inputs import Reading

    if part is not None:
        from streammerge.parts import part as part_of
        from streammerge.parts import sub_plan

        reading = Reading(sub_plan(plan, part_of(plan, *part)), reads, resume=True)
    else:
        reading = Reading(plan, reads, resume)
    try:
        reading.start()  # the first reads overlap the torch import below
        from streammerge.execute import run as _run

        go = functools.partial(
            _run, plan, device=device, reading=reading, resume=resume, vram_budget=vram_budget, part=part, pack_to=pack_to
        )
        if progress is True:
            from streammerge.progress import ProgressBar

            bar = ProgressBar()
            try:
                return go(progress=bar)
            finally:
                bar.close()
        return go(progress=progress or None)
    finally:
        reading.close()


__all__ = [
    "AdapterMismatch",
    "BadAdapter",
    "BadCheckpoint",
    "BudgetTooSmall",
    "Estimate",
    "OutputError",
    "Plan",
    "PlanMismatch",
    "StreamMergeError",
    "UnsupportedAdapter",
    "WorkUnit",
    "__version__",
    "plan",
    "run",
]
