"""Headers in, plan out: every work unit, output shard and byte offset, decided before any data moves.

The planner reads safetensors headers and small JSON files only. It maps each adapter tensor onto
its base tensor (:mod:`.mapping`), checks shapes, chooses what quantized weights become
(:mod:`.quant`), picks an operation per output tensor and lays out the output shards with every
tensor's byte offset (:mod:`.layout`), then estimates peak memory, output size and time
(:mod:`.estimate`). The result, :class:`~.model.Plan`, is plain frozen data that round-trips
through JSON (:mod:`.model`); :func:`plan` (:mod:`.build`) runs the steps.
"""

from __future__ import annotations

from streammerge.formats.safetensors import Source
from streammerge.plan.build import COMBINATIONS, DEFAULT_MAX_SHARD_BYTES, DEFAULT_TILE_BYTES, MIN_TILE_BYTES, plan
from streammerge.plan.layout import check_inputs_unchanged, check_output, layout_shards
from streammerge.plan.model import (
    MODES,
    AddTerm,
    Change,
    CopyFile,
    Estimate,
    Fingerprint,
    LoraTerm,
    Plan,
    QuantSpec,
    RequantSpec,
    RowsTerm,
    Shard,
    WorkUnit,
    plan_from_dict,
    shard_header_bytes,
)

__all__ = [
    "COMBINATIONS",
    "DEFAULT_MAX_SHARD_BYTES",
    "DEFAULT_TILE_BYTES",
    "MIN_TILE_BYTES",
    "MODES",
    "AddTerm",
    "Change",
    "CopyFile",
    "Estimate",
    "Fingerprint",
    "LoraTerm",
    "Plan",
    "QuantSpec",
    "RequantSpec",
    "RowsTerm",
    "Shard",
    "Source",
    "WorkUnit",
    "check_inputs_unchanged",
    "check_output",
    "layout_shards",
    "plan",
    "plan_from_dict",
    "shard_header_bytes",
]
