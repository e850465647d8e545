"""The numpy compute backend: LoRA merges and casts of 16/32-bit weights on the CPU, without torch.

Importing torch costs 2-3 s of CPU, during which nothing could be merged or written. This backend
merges the first units meanwhile (see :mod:`streammerge.execute`); torch's kernel, about twice as
fast per element here, takes over once it is loaded. Both give the same bytes: each chunk of rows
is widened to float64, ``(scale * B) @ A`` is added (BLAS, float64), and the sum is rounded into the
output as torch's ``Tensor.to`` rounds (:func:`round_into`). bfloat16 comes from ``ml_dtypes`` (the
numpy dtype JAX uses). :func:`streammerge.plan.torch_reason` says which units need torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# One BLAS thread: the products here are small (rank x columns), and OpenBLAS's idle threads spin,
# taking the core that imports torch or writes. Read once, when numpy first loads OpenBLAS (a
# program that imported numpy before streammerge keeps its own setting).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import ml_dtypes
import numpy as np

from streammerge.plan import LoraTerm, Source, WorkUnit
from streammerge.sources import Pages, SourceFiles, tiles
from streammerge.write import Sink, aligned_start

Array = np.ndarray[Any, np.dtype[Any]]

NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
"""numpy's dtype for each safetensors dtype of :data:`streammerge.plan.NUMPY_DTYPES`."""

ACCUMULATE = np.dtype(np.float64)
"""As :data:`streammerge.kernels.ACCUMULATE`: the float64 sum, rounded once, is within one ulp everywhere."""


@dataclass(frozen=True)
class Term:
    """One LoRA term ready for the merge: A (r, in) and B (out, r) in float64, B already times the scale."""

    a: Array
    b: Array
    transpose: bool


def combine_linear(terms: list[LoraTerm], factors: list[tuple[Array, Array]]) -> tuple[Array, Array]:
    """PEFT's ``linear`` combination of equal-rank terms as one (A, B) pair, scales folded in.

    ``A = sum sign(w_i) sqrt(|w_i|) A_i`` and ``B = sum sqrt(|w_i|) B_i`` with ``w_i`` the term's
    scale, as :func:`streammerge.kernels.combine_linear`.
    """
    a = sum((math.copysign(math.sqrt(abs(t.scale)), t.scale) * fa for t, (fa, _) in zip(terms, factors, strict=True)), np.zeros(()))
    b = sum((math.sqrt(abs(t.scale)) * fb for t, (_, fb) in zip(terms, factors, strict=True)), np.zeros(()))
    return a, b


def round_into(out: Array, values: Array, scratch: Array | None = None) -> None:
    """``values`` rounded into ``out``'s dtype as torch's ``Tensor.to`` rounds them.

    float64 goes to float16 through float32, as torch does (numpy alone rounds once, and would
    differ from torch in ~7 of 10^5 elements); every other pair is one cast. ``scratch``, a float64
    buffer at least half the size of ``values``, holds the float32 step (else it is allocated).

    >>> out = np.empty(1, dtype=np.float16)
    >>> round_into(out, np.array([1 + 2**-11 + 2**-40]))  # float32 rounds it onto a tie, which goes to even
    >>> float(out[0])
    1.0
    """
    if values.dtype == ACCUMULATE and out.dtype == np.float16:
        if scratch is None:
            step = np.empty(values.shape, np.float32)
        else:
            step = scratch.reshape(-1).view(np.float32)[: values.size].reshape(values.shape)
        np.copyto(step, values, casting="unsafe")
        values = step
    np.copyto(out, values, casting="unsafe")


def merge_rows(w_rows: Array, terms: list[Term], row0: int, acc: Array, tmp: Array, out: Array, magnitude: Array | None = None) -> Array:
    """Rows ``row0 : row0 + len(w_rows)`` of ``W + sum(B @ A)`` (B scaled), rounded once into ``out``.

    ``acc`` and ``tmp`` are float64 (chunk, cols) buffers: the tile is merged ``chunk`` rows at a
    time so they stay in the CPU cache. With ``transpose`` (fan_in_fan_out) the delta is
    ``(B @ A).T``, whose rows are the columns of A. With ``magnitude`` (DoRA) each merged row is
    scaled to that norm. The rounding is :func:`round_into`'s.

    >>> w = np.zeros((2, 3), dtype=np.float32)
    >>> t = Term(a=np.ones((1, 3)), b=np.array([[0.5], [1.0]]), transpose=False)
    >>> merge_rows(w, [t], 0, np.empty((1, 3)), np.empty((1, 3)), np.empty((2, 3), dtype=np.float32)).tolist()
    [[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]]
    """
    n, chunk = w_rows.shape[0], acc.shape[0]
    for c0 in range(0, n, chunk):
        m = min(chunk, n - c0)
        a, t = acc[:m], tmp[:m]
        np.copyto(a, w_rows[c0 : c0 + m])
        r0 = row0 + c0
        for term in terms:
            if term.transpose:
                np.matmul(term.a[:, r0 : r0 + m].T, term.b.T, out=t)
            else:
                np.matmul(term.b[r0 : r0 + m], term.a, out=t)
            np.add(a, t, out=a)
        if magnitude is not None:
            a *= (magnitude[r0 : r0 + m] / np.linalg.norm(a, axis=1))[:, None]
        round_into(out[c0 : c0 + m], a, t)
    return out


class NumpyBackend:
    """Computes plain merges and casts on the CPU with numpy, reusing its buffers from tile to tile."""

    device = "cpu"

    def __init__(self) -> None:
        self._buffers: dict[str, Array] = {}

    def _buffer(self, role: str, shape: tuple[int, int]) -> Array:
        numel = shape[0] * shape[1]
        buf = self._buffers.get(role)
        if buf is None or buf.size < numel:
            buf = self._buffers[role] = np.empty(numel, dtype=ACCUMULATE)
        return buf[:numel].reshape(shape)

    def close(self) -> None:
        self._buffers.clear()

    def run_unit(self, unit: WorkUnit, files: SourceFiles, out: Sink, advance: Callable[[int], None], pages: Pages) -> None:
        """Compute one unit into ``out``, tile by tile; ``pages`` maps each tile's input in first."""
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range values become inf, as a torch cast makes them
            self._run_unit(unit, files, out, advance, pages)

    def _run_unit(self, unit: WorkUnit, files: SourceFiles, out: Sink, advance: Callable[[int], None], pages: Pages) -> None:
        src = unit.source
        factors = [(_load(files, t.a), _load(files, t.b)) for t in unit.lora]
        scales, transposes = [t.scale for t in unit.lora], [t.transpose for t in unit.lora]
        if unit.combination == "linear" and len(factors) > 1:
            factors, scales, transposes = [combine_linear(list(unit.lora), factors)], [1.0], transposes[:1]
        terms = [Term(a=a, b=b * s, transpose=tr) for (a, b), s, tr in zip(factors, scales, transposes, strict=True)]
        del factors
        magnitude = _load(files, unit.magnitude).reshape(-1) if unit.magnitude is not None else None
        adds = [(_load(files, a.source).reshape(-1), a.scale) for a in unit.adds]
        out_dtype = NUMPY_DTYPES[unit.out_dtype]
        chunk = (unit.chunk_rows, unit.row_elems)
        for row0, n, first, count, stored in tiles(unit):
            shape = (n, unit.row_elems)
            pages(*stored)
            tile = np.frombuffer(files.elements(src, first, count), dtype=NUMPY_DTYPES[src.dtype]).reshape(shape)
            if unit.base_dtype != src.dtype:  # a base weight saved with the adapter: as loaded into the base
                tile = tile.astype(NUMPY_DTYPES[unit.base_dtype])
            buffer = out.acquire()
            at = unit.offset + first * out_dtype.itemsize
            start = aligned_start(at, out_dtype.itemsize)
            result = np.frombuffer(buffer, dtype=out_dtype, count=count, offset=start).reshape(shape)
            if terms:
                merge_rows(tile, terms, row0, self._buffer("acc", chunk), self._buffer("tmp", chunk), result, magnitude)
            elif adds:  # small 1-D tensors (biases): float64 sum, one rounding
                total = tile.reshape(-1).astype(ACCUMULATE)
                for vector, scale in adds:
                    total += scale * vector[first : first + count]
                round_into(result.reshape(-1), total)
            else:
                round_into(result, tile)
            del tile, result
            out.write(unit.shard, at, unit.name, buffer, count * out_dtype.itemsize, start)
            files.release(*stored)
            advance(count * out_dtype.itemsize)


def _load(files: SourceFiles, src: Source) -> Array:
    """A small tensor (LoRA factor, DoRA magnitude, bias) in float64, its mapped pages released."""
    raw = np.frombuffer(files.view(src.file, src.offset, src.nbytes), dtype=NUMPY_DTYPES[src.dtype])
    out = raw.astype(ACCUMULATE).reshape(src.shape)
    del raw
    files.release(src.file, src.offset, src.nbytes)
    return out
