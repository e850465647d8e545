"""``streammerge-manifest.json``: what a finished output holds, for ``streammerge verify``.

Written last into the output folder: every file's size, every tensor's shard, offset, length and
CRC-32, and the inputs and options the merge used (so a later check can recompute tensors from
the same inputs the same way).
"""

from __future__ import annotations

import json
import os
from typing import Any

from streammerge.errors import BadCheckpoint
from streammerge.plan.model import Plan

MANIFEST_FILE = "streammerge-manifest.json"
FORMAT = "streammerge-manifest/1"


def manifest_options(plan: Plan) -> dict[str, Any]:
    """The options of ``plan`` that its manifest records (what a finished output was made with)."""
    return {"dtype": plan.dtype, "mode": plan.mode, "weights": list(plan.weights), "combination": plan.combination}


def build_manifest(plan: Plan, crcs: dict[str, int]) -> dict[str, Any]:
    """The manifest of ``plan``'s output, given every tensor's CRC-32 by name."""
    tensors = {}
    for u in plan.units:
        for name, offset, nbytes in ((u.name, u.offset, u.nbytes), *((x.name, x.offset, x.nbytes) for x in u.extra)):
            tensors[name] = {"file": plan.shards[u.shard].file, "offset": offset, "bytes": nbytes, "crc32": crcs[name]}
    return {
        "format": FORMAT,
        "inputs": {"base": plan.base, "adapters": list(plan.adapters)},
        "options": manifest_options(plan),
        "files": {s.file: s.size for s in plan.shards},
        "tensors": tensors,
    }


def read_manifest(out: str) -> dict[str, Any] | None:
    """The manifest of the output folder ``out``, or None when it has none (not written by streammerge)."""
    path = os.path.join(out, MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise BadCheckpoint(f"{path}: cannot read the manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise BadCheckpoint(f"{path}: the manifest is not a JSON object")
    return manifest
