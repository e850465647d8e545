"""Error types. Every message names the file (and tensor) and says what was expected versus found.

The CLI prints ``str(error)`` on one line and exits with code 2; nothing else in the package
raises bare exceptions for bad input.
"""

from __future__ import annotations


class StreamMergeError(Exception):
    """Base class: bad input or an impossible request. The message is one line for the user."""


class BadCheckpoint(StreamMergeError):
    """A base checkpoint (folder, index or safetensors file) is missing, malformed or lying."""


class BadAdapter(StreamMergeError):
    """An adapter folder or its config/weights are missing or malformed."""


class AdapterMismatch(StreamMergeError):
    """The adapter is well formed but does not fit the base (missing tensor, wrong shape)."""


class UnsupportedAdapter(StreamMergeError):
    """The adapter holds something streammerge cannot merge exactly; refused rather than dropped."""


class OutputError(StreamMergeError):
    """The output folder exists, lies inside an input, or cannot be written."""


class PlanMismatch(StreamMergeError):
    """A saved plan no longer matches its inputs (a file changed since planning) or is malformed."""


class BudgetTooSmall(StreamMergeError):
    """The memory budget asked for cannot hold even one tile."""
