"""The compute device of a run: which one (``auto``/``cpu``/``cuda``), and the GPU memory budget it keeps to."""

from __future__ import annotations

import torch

from streammerge.errors import BudgetTooSmall, StreamMergeError
from streammerge.plan.model import Plan
from streammerge.probe import nvidia_device_node

VRAM_FRACTION = 0.8
"""Without --vram-budget, a run may use this fraction of the GPU memory free when it starts."""


def resolve_device(requested: str) -> tuple[torch.device, str | None]:
    """The device to merge on, and a note when ``auto`` had to fall back to the CPU.

    ``auto`` means CUDA when torch can start it, else the CPU; the note says why when a GPU seemed
    to be there (torch sees one, torch is a CUDA build, or there is an NVIDIA device node) but
    could not be used. ``cuda`` without a usable GPU is an error.
    """
    if requested == "cpu":
        return torch.device("cpu"), None
    problem = _cuda_problem()
    if problem is None:
        return torch.device("cuda"), None
    if requested == "cuda":
        raise StreamMergeError(f"device 'cuda' was asked for but {problem}; use --device cpu or auto")
    expected = torch.cuda.is_available() or torch.version.cuda is not None or nvidia_device_node()
    return torch.device("cpu"), (f"no usable GPU ({problem}): merged on the CPU" if expected else None)


def _cuda_problem() -> str | None:
    """Why torch cannot merge on a GPU here, or None when it can (the CUDA context starts)."""
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    try:
        torch.cuda.mem_get_info()  # starts the context: a driver or architecture mismatch shows here
    except RuntimeError as e:
        return f"CUDA does not start: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    return None


class VramCap:
    """The GPU memory budget of a run, checked against the plan and enforced on torch's allocator.

    The budget is ``vram_budget`` or :data:`VRAM_FRACTION` of the memory free when the run starts.
    A plan whose estimate exceeds it is refused on construction, before anything is written.
    While :meth:`apply` holds, the caching allocator may reserve at most the budget on top of what
    the process already held (``set_per_process_memory_fraction``), so a wrong estimate fails with
    an error, never by taking more; :meth:`lift` restores the previous fraction. The allocator's
    peak statistics are reset, so :meth:`peak` measures this run.
    """

    def __init__(self, plan: Plan, vram_budget: int | None) -> None:
        free, self._total = torch.cuda.mem_get_info()
        self.budget = vram_budget if vram_budget is not None else int(free * VRAM_FRACTION)
        if plan.estimate.peak_device_bytes > self.budget:
            raise BudgetTooSmall(
                f"{plan.out}: the merge needs {plan.estimate.peak_device_bytes} bytes of GPU memory, the budget is {self.budget} "
                f"({free} free); plan with --vram-budget (smaller tiles) or use --device cpu"
            )
        self._before: float | None = None
        self._held = 0

    def apply(self) -> None:
        torch.backends.cuda.matmul.allow_tf32 = False  # no TF32 shortcuts: the CPU's exact arithmetic
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        self._before = float(getter()) if getter is not None else 1.0
        self._held = torch.cuda.memory_reserved()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (self._held + self.budget) / self._total))
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        """The most the allocator reserved beyond what the process held when the run started."""
        return max(0, torch.cuda.max_memory_reserved() - self._held)

    def lift(self) -> None:
        if self._before is not None:
            torch.cuda.set_per_process_memory_fraction(self._before)
            self._before = None
