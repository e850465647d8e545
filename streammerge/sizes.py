"""Human units at the edges: "5GB" / "512MiB" sizes and dtype names like "bf16"."""

from __future__ import annotations

import re

from streammerge.errors import StreamMergeError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_FACTORS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
DTYPES = {
    "auto": "auto",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
}


def parse_size(value: int | str, what: str = "size") -> int:
    """Bytes from an int or a string such as "5GB" (10^9), "512MiB" (2^20) or "1.5G".

    >>> parse_size("5GB"), parse_size("512MiB"), parse_size(4096)
    (5000000000, 536870912, 4096)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise StreamMergeError(f"{what} {value!r} is not a size; use e.g. 5GB, 512MiB or a number of bytes")
        unit = (m[2] or "").lower().removesuffix("b")
        n = int(float(m[1]) * _FACTORS[unit])
    if n <= 0:
        raise StreamMergeError(f"{what} must be positive, got {value!r}")
    return n


def parse_dtype(value: str) -> str:
    """The safetensors dtype name for a user's dtype ("bf16" -> "BF16"), or "auto"."""
    key = value.strip().lower().removeprefix("torch.")
    if key in DTYPES:
        return DTYPES[key]
    if value.upper() in ("BF16", "F16", "F32"):
        return value.upper()
    raise StreamMergeError(f"dtype {value!r} is not one of auto, bfloat16/bf16, float16/fp16, float32/fp32")


def format_bytes(n: int) -> str:
    """Bytes for humans, binary units: 1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_seconds(s: float) -> str:
    """Durations for humans: 0.04 -> 'under 0.1 s', 7.25 -> '7.2 s', 95 -> '1 min 35 s', 4000 -> '1 h 7 min'."""
    if s < 0.1:
        return "under 0.1 s"
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    minutes = round(s) // 60
    if minutes < 60:
        return f"{minutes} min {round(s) % 60} s"
    return f"{minutes // 60} h {minutes % 60} min"
