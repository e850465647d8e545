"""The partial folder's bookkeeping: which plan it was started with, and which units are finished.

A run writes into ``OUT.partial`` (:func:`partial_path`). That folder appears with
``.streammerge-plan.json`` already inside (the plan minus the options that do not change the
output bytes), and ``.streammerge-journal`` gets one line per finished unit (its tensors'
CRC-32), appended only after that unit's bytes are fsynced. A resumed run compares the plan and
redoes only the units the journal does not list.
"""

from __future__ import annotations

import json
import os

from streammerge.errors import PlanMismatch
from streammerge.osio import CLOEXEC
from streammerge.plan.model import Plan

PLAN_FILE = ".streammerge-plan.json"
JOURNAL_FILE = ".streammerge-journal"

Finished = list[tuple[int, dict[str, int]]]
"""Finished units: (unit index, CRC-32 of each of its tensors by name)."""


def partial_path(out: str) -> str:
    """Where a run writes before the output is complete."""
    return out.rstrip(os.sep) + ".partial"


def plan_identity(plan: Plan) -> str:
    """The plan as JSON, without the options that do not change the output bytes."""
    obj = json.loads(plan.to_json())
    for key in ("overwrite", "device", "estimate"):
        obj.pop(key, None)
    return json.dumps(obj, sort_keys=True)


def read_journal(path: str) -> dict[int, dict[str, int]]:
    """Finished units (index -> tensor CRC-32s) of a journal; a torn last line is ignored."""
    done: dict[int, dict[str, int]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # the process died while writing this line: the unit is not done
                entry = json.loads(line)
                done[int(entry["unit"])] = {str(k): int(v) for k, v in entry["crc"].items()}
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as e:
        raise PlanMismatch(f"{path}: resume journal is damaged ({e}); remove the .partial folder and start again") from e
    return done


class Journal:
    """The append-only journal of one partial folder; opening it drops a torn last line."""

    def __init__(self, partial: str, name: str = JOURNAL_FILE) -> None:
        self.path = os.path.join(partial, name)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | CLOEXEC, 0o644)
        size = os.fstat(self._fd).st_size
        if size:  # the next entry must start on its own line
            with open(self.path, "rb") as f:
                keep = f.read().rfind(b"\n") + 1
            if keep != size:
                os.truncate(self.path, keep)

    def append(self, finished: Finished, names: list[str]) -> None:
        """Record units as finished (the caller has fsynced their bytes), durably."""
        lines = "".join(
            json.dumps({"unit": i, "name": name, "crc": crcs}, separators=(",", ":")) + "\n"
            for (i, crcs), name in zip(finished, names, strict=True)
        )
        data = memoryview(lines.encode("utf-8"))
        while data:
            data = data[os.write(self._fd, data) :]
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
