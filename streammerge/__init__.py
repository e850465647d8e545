"""streammerge: merge LoRA adapters into Hugging Face safetensors models out of core.

Three steps, each its own module, with plain data between them::

    import streammerge
    plan = streammerge.plan("./base", ["./my-lora"], out="./merged", dtype="bfloat16")
    print(plan.estimate)            # peak host/device bytes, output bytes, unit counts
    plan.save("plan.json")          # streammerge.Plan.load("plan.json") gives it back
    report = streammerge.run(plan)  # writes ./merged atomically; timings, bytes written
"""

from __future__ import annotations

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


def run(plan: Plan, *, progress: Progress | None = None, device: str | None = None) -> Report:
    """Execute a plan and return its :class:`~streammerge.execute.Report`.

    See :func:`streammerge.execute.run`. torch is imported here, not at ``import streammerge``,
    so planning stays fast and light.
    """
    from streammerge.execute import run as _run

    return _run(plan, progress=progress, device=device)


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
