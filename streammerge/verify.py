"""``streammerge verify OUT``: is a merged folder complete and intact?

Re-reads every shard header and the index (offsets in range, total_size, every indexed tensor
present), compares file sizes and every tensor's CRC-32 with the manifest written at merge time,
and with ``against=(base, adapters)`` recomputes a sample of tensors from the inputs and compares
bytes. Problems are collected, not raised: a verification that finds damage is a result.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from streammerge.errors import BadCheckpoint, StreamMergeError
from streammerge.formats.checkpoint import INDEX_NAME, open_checkpoint
from streammerge.formats.safetensors import TensorInfo, read_header
from streammerge.manifest import MANIFEST_FILE
from streammerge.osio import file_crc32


@dataclass
class VerifyReport:
    out: str
    files: int = 0
    tensors: int = 0
    checksummed: int = 0
    recomputed: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _tensors(out: str) -> dict[str, TensorInfo]:
    adapter = os.path.join(out, "adapter_model.safetensors")
    if os.path.isfile(adapter) and not os.path.exists(os.path.join(out, "model.safetensors")):
        return read_header(adapter).by_name()
    ckpt = open_checkpoint(out)  # validates every header and the index
    index_path = os.path.join(out, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            total = json.load(f).get("metadata", {}).get("total_size")
        actual = sum(h.file_size - h.data_start for h in ckpt.headers)
        if total is not None and total != actual:
            raise BadCheckpoint(f"{index_path}: metadata.total_size is {total} but the shards hold {actual} bytes of tensors")
        unindexed = [t.name for h in ckpt.headers for t in h.tensors if t.name not in ckpt.tensors]
        if unindexed:
            raise BadCheckpoint(f"{index_path}: tensor {unindexed[0]!r} is in a shard but not in the index")
    return ckpt.tensors


def verify(out: str | os.PathLike[str], *, against: tuple[str, list[str]] | str | None = None, sample: int = 8) -> VerifyReport:
    """Check a merged output folder; see the module docstring.

    ``against`` is ``(base, [adapters...])`` to recompute a sample of tensors from those inputs, or
    ``"manifest"`` to take them from the manifest; the options (dtype, mode, weights, combination)
    always come from the manifest.

    Example::

        report = verify("./merged", against=("./base", ["./my-lora"]))
        assert report.ok, report.problems
    """
    out = os.path.abspath(os.fspath(out))
    report = VerifyReport(out=out)
    if not os.path.isdir(out):
        raise StreamMergeError(f"{out}: no such output folder")
    try:
        tensors = _tensors(out)
    except BadCheckpoint as e:
        report.problems.append(str(e))
        return report
    report.tensors = len(tensors)
    report.files = len({t.path for t in tensors.values()})
    manifest_path = os.path.join(out, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        report.notes.append(f"no {MANIFEST_FILE} (not written by streammerge?): headers and index checked, checksums not")
        manifest: dict[str, Any] = {}
    else:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        _check_manifest(out, manifest, tensors, report)
    if against == "manifest":
        against = _manifest_inputs(manifest_path, manifest)
    if against is not None and not isinstance(against, str):
        _check_inputs(manifest_path, manifest, against)
        _recompute(out, manifest, tensors, against, sample, report)
    return report


def _manifest_inputs(path: str, manifest: dict[str, Any]) -> tuple[str, list[str]]:
    """The base and adapters a merge used, as its manifest records them."""
    inputs = manifest.get("inputs")
    if not isinstance(inputs, dict) or not isinstance(inputs.get("base"), str) or not isinstance(inputs.get("adapters"), list):
        raise StreamMergeError(f"{path}: the manifest does not name the merge's inputs (older streammerge?); use --against BASE ADAPTER")
    return inputs["base"], [str(a) for a in inputs["adapters"]]


def _check_inputs(path: str, manifest: dict[str, Any], against: tuple[str, list[str]]) -> None:
    """Refuse a recomputation with another number of adapters than the merge used."""
    weights = manifest.get("options", {}).get("weights")
    if isinstance(weights, list) and len(weights) != len(against[1]):
        used = manifest.get("inputs", {}).get("adapters") or f"{len(weights)} adapters"
        raise StreamMergeError(
            f"{path}: the merge used {len(weights)} adapter(s) ({used}), {len(against[1])} given; "
            "give them all (--against BASE A1 --adapter A2 ...) or use --recompute"
        )


def _check_manifest(out: str, manifest: dict[str, Any], tensors: dict[str, TensorInfo], report: VerifyReport) -> None:
    for name, size in manifest.get("files", {}).items():
        path = os.path.join(out, name)
        actual = os.path.getsize(path) if os.path.isfile(path) else None
        if actual != size:
            report.problems.append(f"{path}: {actual} bytes, the manifest says {size}")
    for name, entry in manifest.get("tensors", {}).items():
        t = tensors.get(name)
        where = f"{os.path.join(out, entry['file'])}: tensor {name!r}"
        if t is None or os.path.basename(t.path) != entry["file"] or t.offset != entry["offset"] or t.nbytes != entry["bytes"]:
            report.problems.append(f"{where}: not where the manifest says (offset {entry['offset']}, {entry['bytes']} bytes)")
            continue
        if file_crc32(t.path, t.offset, t.nbytes) != entry["crc32"]:
            report.problems.append(f"{where}: CRC-32 differs from the one recorded when it was written (corrupted?)")
        report.checksummed += 1


def _recompute(
    out: str, manifest: dict[str, Any], tensors: dict[str, TensorInfo], against: tuple[str, list[str]], sample: int, report: VerifyReport
) -> None:
    from streammerge.execute import compute_unit
    from streammerge.plan import plan as make_plan

    options = manifest.get("options", {})
    base, adapters = against
    with tempfile.TemporaryDirectory() as scratch:
        p = make_plan(
            base,
            adapters,
            os.path.join(scratch, "out"),
            dtype=options.get("dtype", "auto"),
            mode=options.get("mode", "merged_16bit"),
            weights=options.get("weights"),
            combination=options.get("combination", "cat"),
        )
    merged = [i for i, u in enumerate(p.units) if u.op != "copy"]
    step = max(1, len(merged) // max(1, sample))
    chosen = merged[::step][:sample] + [i for i, u in enumerate(p.units) if u.op == "copy"][:1]
    for i in chosen:
        unit = p.units[i]
        t = tensors.get(unit.name)
        if t is None or t.nbytes != unit.nbytes:
            report.problems.append(
                f"{out}: tensor {unit.name!r} is missing or has another size than merging {base} with the adapters gives"
            )
            continue
        with open(t.path, "rb") as f:
            stored = os.pread(f.fileno(), t.nbytes, t.offset)
        if stored != compute_unit(p, i):
            report.problems.append(f"{t.path}: tensor {unit.name!r} differs from a fresh merge of {base} with the adapters")
        report.recomputed += 1
