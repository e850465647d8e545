"""What this machine has, asked without importing torch: a GPU device node, a GPU build of torch.

The planner uses these to estimate a run's memory; importing torch to ask would cost the dry run
seconds and hundreds of megabytes.
"""

from __future__ import annotations

import glob
import importlib.util
import os


def torch_is_gpu_build() -> bool:
    """Whether the installed torch is a CUDA or ROCm build (its GPU libraries are on disk), without importing it."""
    spec = importlib.util.find_spec("torch")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    return any(
        glob.glob(os.path.join(folder, "lib", pattern)) for folder in folders for pattern in ("libtorch_cuda*.so*", "libtorch_hip*.so*")
    )


def nvidia_device_node() -> bool:
    """Whether this machine has an NVIDIA GPU device node (``/dev/nvidia0`` ...); no torch needed."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def merges_on_gpu(device: str) -> bool:
    """Whether a plan for ``device`` will run on a GPU here: ``cuda``, or ``auto`` where an NVIDIA
    device node exists (the planner does not import torch to ask)."""
    return device == "cuda" or (device == "auto" and nvidia_device_node())
