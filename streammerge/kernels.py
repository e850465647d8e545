"""Tensor math, nothing else: the LoRA merge of one row tile, and dtype mapping.

Pure functions of tensors (no files, no plan). Merges accumulate in float64 and round once to
the output dtype: ``acc = W; acc += scale * (B @ A)`` with ``addmm_`` (no ``B @ A``
temporary of the full weight), then one cast into the output buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}


ACCUMULATE = torch.float64
"""Merges accumulate in float64: with float32, W + s*B@A loses the last bit when the sum nearly
cancels (seen in ~1 of 10^5 elements), while the float64 sum rounded once is within one ulp of
the exact result everywhere. With reused buffers it costs the same time as float32 here."""


@dataclass(frozen=True)
class Factors:
    """One LoRA term ready for the merge: A (r, in) and B (out, r) in the accumulation dtype."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool
    rows: tuple[int, int] | None = None
    """The delta covers only rows ``rows[0]:rows[1]`` of the weight (one expert of fused experts)."""


def merge_rows(
    w_rows: torch.Tensor, factors: list[Factors], row0: int, acc: torch.Tensor, out: torch.Tensor, magnitude: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows ``row0 : row0 + len(w_rows)`` of ``W + sum(scale * B @ A)``, rounded once into ``out``.

    ``w_rows`` is a (rows, cols) slice of the base weight in any float dtype and ``out`` a
    caller-owned buffer of that shape. A factor with ``rows`` adds only to that band of rows
    (its B or A^T then starts at the band's first row). ``acc`` is a float64 (chunk, cols) buffer: the tile is
    merged ``chunk`` rows at a time so the accumulator stays in the CPU cache and only the
    16-bit input and output travel through memory. With ``transpose`` (fan_in_fan_out bases
    store W as (in, out)) the delta is ``(B @ A).T``, whose rows are the columns of A.

    >>> w = torch.zeros(2, 3, dtype=torch.bfloat16)
    >>> f = Factors(a=torch.ones(1, 3, dtype=ACCUMULATE), b=torch.tensor([[1.0], [2.0]], dtype=ACCUMULATE), scale=0.5, transpose=False)
    >>> merge_rows(w, [f], 0, torch.empty(1, 3, dtype=ACCUMULATE), torch.empty(2, 3)).tolist()
    [[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]]
    """
    n, chunk = w_rows.shape[0], acc.shape[0]
    for c0 in range(0, n, chunk):
        m = min(chunk, n - c0)
        a = acc[:m]
        a.copy_(w_rows[c0 : c0 + m])
        r0 = row0 + c0
        for f in factors:
            lo, hi, first = r0, r0 + m, 0
            if f.rows is not None:
                first = f.rows[0]
                lo, hi = max(lo, first), min(hi, f.rows[1])
                if lo >= hi:
                    continue
            dst = a[lo - r0 : hi - r0]
            if f.transpose:
                dst.addmm_(f.a[:, lo - first : hi - first].T, f.b.T, alpha=f.scale)
            else:
                dst.addmm_(f.b[lo - first : hi - first], f.a, alpha=f.scale)
        if magnitude is not None:
            a.mul_((magnitude[r0 : r0 + m] / torch.linalg.vector_norm(a, dim=1))[:, None])
        out[c0 : c0 + m].copy_(a)
    return out


def combine_linear(factors: list[Factors]) -> list[Factors]:
    """PEFT's ``linear`` combination of several LoRA terms of equal rank: one term per band of rows
    (all rows, or one expert's).

    With ``w_i`` the term's scale (adapter weight x LoRA scaling): ``A = sum sign(w_i) sqrt(|w_i|) A_i``,
    ``B = sum sqrt(|w_i|) B_i``, and the delta is ``B @ A``: cross terms included, as in
    ``add_weighted_adapter(..., combination_type="linear")``.
    """
    bands: dict[tuple[int, int] | None, list[Factors]] = {}
    for f in factors:
        bands.setdefault(f.rows, []).append(f)
    out = []
    for rows, group in bands.items():
        a = sum(math.copysign(math.sqrt(abs(f.scale)), f.scale) * f.a for f in group)
        b = sum(math.sqrt(abs(f.scale)) * f.b for f in group)
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        out.append(Factors(a=a, b=b, scale=1.0, transpose=group[0].transpose, rows=rows))
    return out


def nibble_table(quant_map: torch.Tensor) -> torch.Tensor:
    """(65536, 4) float32: the four 4-bit codes of every pair of bytes decoded, indexed by the
    pair read as a little-endian 16-bit number; the high nibble of each byte is the earlier element.

    One gather then decodes four elements: against a byte table it halves the index work, and
    the table (1 MiB) stays in the L2 cache.
    """
    pair = torch.arange(65536, device=quant_map.device)
    first, second = pair & 0xFF, pair >> 8
    codes = [first >> 4, first & 0xF, second >> 4, second & 0xF]
    return torch.stack([quant_map[c] for c in codes], dim=1).contiguous()


def double_quant_scales(
    absmax_u8: torch.Tensor, nested_quant_map: torch.Tensor, nested_absmax: torch.Tensor, nested_blocksize: int, offset: float
) -> torch.Tensor:
    """Per-block float32 scales of a double-quantized 4-bit weight.

    ``nested_quant_map[absmax_u8[j]] * nested_absmax[j // nested_blocksize]``, then ``+ offset`` as a
    separate float32 step, exactly as bitsandbytes rebuilds them.
    """
    nested = nested_absmax.repeat_interleave(nested_blocksize)[: absmax_u8.numel()]
    scales = nested_quant_map[absmax_u8.long()] * nested
    return scales.add_(torch.tensor(offset, dtype=torch.float32, device=scales.device))


def dequant_4bit(
    packed: torch.Tensor,
    table: torch.Tensor,
    scales: torch.Tensor,
    blocksize: int,
    out: torch.Tensor,
    work: Workspace | None = None,
    role: str = "",
) -> torch.Tensor:
    """Dequantize ``out.numel()`` consecutive 4-bit elements that start on a block boundary.

    ``packed`` holds their codes (uint8, two per byte), ``scales`` the float32 scale of each block
    they touch. ``value = code_value * scale`` in float32, then one cast into ``out`` (the weight's
    dtype). Blocks run over the flattened weight, whatever its row length. The index and float32
    temporaries (six bytes per element) come from ``work`` under ``role`` when given: allocated
    afresh for every tile they are new pages, which the kernel must fault in and zero each time.

    >>> table = nibble_table(torch.linspace(-1, 1, 16))
    >>> dequant_4bit(torch.tensor([0x0F, 0xF0], dtype=torch.uint8), table, torch.tensor([2.0, 0.5]), 2, torch.empty(4)).tolist()
    [-2.0, 2.0, 0.5, -0.5]
    >>> dequant_4bit(torch.tensor([0x0F, 0xF0, 0x0F], dtype=torch.uint8), table, torch.tensor([1.0, 1.0, 1.0]), 2, torch.empty(5)).tolist()
    [-1.0, 1.0, 1.0, -1.0, -1.0]
    """
    count, nbytes = out.numel(), packed.numel()
    even = nbytes - nbytes % 2
    work = work or Workspace(packed.device)
    pairs = work.get("pairs" + role, torch.int32, (even // 2,))
    pairs.copy_(packed[:even].view(torch.int16)).bitwise_and_(0xFFFF)  # little-endian byte pairs
    # Each table row (four float32) gathered as one 16-byte element: 1-D index_select copies the
    # bits as they are, ~13% faster than gathering rows of a 2-D table (measured on a Xeon).
    gathered = work.get("gathered" + role, torch.complex128, (even // 2,))
    values = torch.index_select(table.view(torch.complex128).view(-1), 0, pairs, out=gathered).view(torch.float32)
    if even < nbytes:  # an odd last byte: its pair index is the byte itself
        values = torch.cat([values, table[packed[even:].long(), :2].reshape(-1)])
    values = values[:count]
    full = count - count % blocksize
    values[:full].view(-1, blocksize).mul_(scales[: full // blocksize, None])
    if full < count:
        values[full:].mul_(scales[full // blocksize])
    return out.view(-1).copy_(values).view(out.shape)


def dequant_int8(rows: torch.Tensor, scb: torch.Tensor, out: torch.Tensor, work: Workspace | None = None, role: str = "") -> torch.Tensor:
    """LLM.int8 rows: ``(int8 * SCB[:, None]) * (1/127)`` in float32, one cast into ``out``
    (the float32 temporary from ``work`` under ``role`` when given).

    >>> dequant_int8(torch.tensor([[127, -127]], dtype=torch.int8), torch.tensor([2.0]), torch.empty(1, 2)).tolist()
    [[2.0, -2.0]]
    """
    values = (work or Workspace(rows.device)).get("int8" + role, torch.float32, tuple(rows.shape))
    values.copy_(rows).mul_(scb[:, None]).mul_(1 / 127)
    return out.copy_(values)


def fp8_scale_rows(scales: torch.Tensor, row0: int, rows: int, block_rows: int) -> torch.Tensor:
    """The (rows, grid columns) float32 scales of rows ``row0 : row0 + rows``: each row takes its block row's scales."""
    first, last = row0 // block_rows, (row0 + rows - 1) // block_rows
    expanded = scales[first : last + 1].repeat_interleave(block_rows, dim=0)
    start = row0 - first * block_rows
    return expanded[start : start + rows]


def dequant_fp8(
    codes: torch.Tensor,
    scales: torch.Tensor,
    row0: int,
    block_rows: int,
    block_cols: int,
    out: torch.Tensor,
    work: Workspace | None = None,
    role: str = "",
) -> torch.Tensor:
    """Rows ``row0 : row0 + len(out)`` of an FP8 weight: ``float32(code) * float32(scale of its block)``, one cast into ``out``.

    ``codes`` holds the rows' float8_e4m3fn bytes (uint8), ``scales`` all the weight's float32 block
    scales as a (ceil(rows / block_rows), ceil(cols / block_cols)) grid; edge blocks may be partial.
    This is transformers' ``Fp8Dequantize`` (float32 product, cast to the model dtype) and DeepSeek's
    ``weight_dequant``. The float32 temporary comes from ``work`` under ``role`` when given.

    >>> codes = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float8_e4m3fn).view(torch.uint8)
    >>> dequant_fp8(codes, torch.tensor([[2.0, 10.0]]), 0, 1, 2, torch.empty(1, 3)).tolist()
    [[2.0, -4.0, 5.0]]
    """
    n, cols = out.shape
    values = (work or Workspace(codes.device)).get("fp8" + role, torch.float32, (n, cols))
    values.copy_(codes.view(torch.float8_e4m3fn).view(n, cols))
    rows_scales = fp8_scale_rows(scales, row0, n, block_rows)
    full = cols // block_cols
    if full:
        values[:, : full * block_cols].view(n, full, block_cols).mul_(rows_scales[:, :full, None])
    if full * block_cols < cols:
        values[:, full * block_cols :].mul_(rows_scales[:, full : full + 1])
    return out.copy_(values)


FP8_MAX = 448.0
"""torch.finfo(torch.float8_e4m3fn).max."""


def quant_fp8(
    x: torch.Tensor, block_rows: int, block_cols: int, fmt: str, scale_dtype: torch.dtype, work: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float32 rows ``x`` (whole block rows, but for a last partial one) to float8_e4m3fn with a fresh
    scale per (block_rows, block_cols) block; returns (codes as uint8 (rows, cols), scales (grid) in ``scale_dtype``).

    ``fmt`` "inverse" is transformers' ``Fp8Quantize`` (DeepSeek's layout): ``s = 448 / amax`` in float32 (1 for an
    all-zero block), codes ``clamp(x * s)``, stored ``1 / s``; "pow2" rounds that stored value up to a power of two and
    quantizes with its reciprocal (``scale_fmt`` ue8m0); "divide" is compressed-tensors': ``scale = amax / 448`` rounded
    to ``scale_dtype``, codes ``clamp(x / scale)``. Edge blocks take the amax of the elements they hold.

    >>> codes, s = quant_fp8(torch.tensor([[1.0, -448.0, 3.0, 0.0]]), 1, 2, "inverse", torch.float32)
    >>> codes.view(torch.float8_e4m3fn).float().tolist(), s.tolist()
    ([[1.0, -448.0, 448.0, 0.0]], [[1.0, 0.006696428172290325]])
    """
    n, cols = x.shape
    gr, gc = -(-n // block_rows), -(-cols // block_cols)
    work = work or Workspace(x.device)
    tmp = work.get("fp8q", torch.float32, (gr * block_rows, gc * block_cols))
    if tmp.shape != x.shape:
        tmp.zero_()
    tmp[:n, :cols].copy_(x).abs_()
    amax = tmp.view(gr, block_rows, gc, block_cols).amax(dim=(1, 3))
    if fmt == "divide":
        stored = (amax / FP8_MAX).to(scale_dtype)
        stored = torch.where(stored > 0, stored, torch.ones_like(stored))
        divisor = stored.float()
        mul = None
    else:
        safe = torch.where(amax > 0, amax, torch.ones_like(amax))
        scale = torch.where(amax > 0, FP8_MAX / safe, torch.ones_like(amax))
        inverse = (1.0 / scale).to(torch.float32)
        if fmt == "pow2":
            inverse = torch.pow(2.0, torch.ceil(torch.log2(inverse.clamp(min=torch.finfo(torch.float32).tiny))))
            scale = 1.0 / inverse
        stored, divisor, mul = inverse.to(scale_dtype), None, scale
    view = tmp.view(gr, block_rows, gc, block_cols)
    tmp[:n, :cols].copy_(x)
    if mul is not None:
        view.mul_(mul[:, None, :, None])
    else:
        assert divisor is not None
        view.div_(divisor[:, None, :, None])
    view.clamp_(-FP8_MAX, FP8_MAX)
    codes = tmp[:n, :cols].to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, stored


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The FP4 e2m1 value of each 4-bit code."""


def fp4_pair_table(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two values a byte of MXFP4 codes holds, the low nibble's first."""
    values = torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    byte = torch.arange(256, device=device)
    return torch.stack([values[byte & 15], values[byte >> 4]], dim=1)


def dequant_mxfp4(
    codes: torch.Tensor, exponents: torch.Tensor, table: torch.Tensor, out: torch.Tensor, work: Workspace | None = None, role: str = ""
) -> torch.Tensor:
    """Whole experts of an MXFP4 parameter: ``FP4[code] * 2^(s - 127)`` in float32, transposed, one cast into ``out``.

    ``codes`` holds n experts' stored bytes (uint8, their (n, N, K / 32, 16) blocks), ``exponents`` their
    (n, N, K / 32) E8M0 bytes, ``table`` :func:`fp4_pair_table`; ``out`` is the (n * K, N) rows of the
    (E, K, N) parameter: transformers' ``convert_moe_packed_tensors`` (exact: an FP4 value times a power of two).

    >>> codes = torch.tensor([0x21] + [0] * 15, dtype=torch.uint8)  # codes 1 (0.5) and 2 (1.0), then zeros
    >>> out = dequant_mxfp4(codes, torch.tensor([[[128]]], dtype=torch.uint8), fp4_pair_table(torch.device("cpu")), torch.empty(32, 1))
    >>> out[:3, 0].tolist()
    [1.0, 2.0, 0.0]
    """
    n, rows, groups = exponents.shape
    cols = groups * 32
    work = work or Workspace(codes.device)
    index = work.get("mx_index" + role, torch.int32, (codes.numel(),))
    index.copy_(codes.reshape(-1))
    values = work.get("mx_values" + role, torch.float32, (codes.numel(), 2))
    torch.index_select(table, 0, index, out=values)
    grouped = values.view(n, rows, groups, 32)
    powers = exponents.to(torch.int32) - 127
    torch.ldexp(grouped, powers[..., None], out=grouped)
    out.view(n, cols, rows).copy_(grouped.view(n, rows, cols).transpose(1, 2))
    return out


FP4_MAX = 6.0
"""Largest e2m1 magnitude: a group's dequantization scale is amax / 6 rounded up to a power of two."""
FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
"""Halfway points between consecutive e2m1 magnitudes: a magnitude at or above the i-th rounds past it."""


def quant_mxfp4(x: torch.Tensor, k: int, work: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize whole experts of an (E, K, N) parameter, given as float32 rows ``x`` (n * K, N), to MXFP4; returns
    (blocks uint8 (n, N, K / 32, 16), exponents uint8 (n, N, K / 32)), the layout gpt-oss stores (see
    :func:`dequant_mxfp4`, its inverse on these codes).

    The rule is triton_kernels' ``downcast_to_mxfp_torch`` (what transformers' ``quantize_to_mxfp4`` calls), in its
    default ``ROUND_UP`` mode: per group of 32 consecutive k, ``d = amax / 6`` in float32 rounded *up* to a power of
    two 2^(s - 127) (so no value saturates; the E8M0 byte is s; an all-zero group gets s = 0 and zero codes),
    values multiplied by 1 / d, then each rounded to the nearest e2m1 value with ties away from zero (6 at most),
    the sign kept (-0.0 too). Non-finite values are refused by the caller (they have no E8M0 scale).

    >>> x = torch.zeros(32, 1); x[:4, 0] = torch.tensor([1.0, -2.5, 6.0, 0.74])
    >>> blocks, s = quant_mxfp4(x, 32)
    >>> hex(blocks[0, 0, 0, 0].item()), hex(blocks[0, 0, 0, 1].item()), s.tolist()  # 1.0, -3.0 (tie away), 6.0, 0.5
    ('0xd2', '0x17', [[[127]]])
    """
    rows, cols = x.shape
    n, groups = rows // k, k // 32
    work = work or Workspace(x.device)
    t = work.get("mxq", torch.float32, (n, cols, k))
    t.copy_(x.view(n, k, cols).transpose(1, 2))  # groups of 32 run along K: make K the last dimension
    g = t.view(n, cols, groups, 32)
    amax = torch.maximum(g.amax(dim=-1), g.amin(dim=-1).neg_())
    bits = (amax / FP4_MAX).view(torch.int32)
    exponents = (bits + 0x7FFFFF) >> 23  # round the float32 up to a power of two: its biased exponent (0 for amax 0)
    inverse = ((254 - exponents) << 23).view(torch.float32)  # 2^(127 - s), exact
    g.mul_(torch.where(exponents > 0, inverse, torch.zeros_like(inverse))[..., None])
    sign = torch.signbit(g, out=work.get("mxq_sign", torch.bool, tuple(g.shape)))
    index = work.get("mxq_index", torch.int32, tuple(g.shape))
    torch.bucketize(g.abs_(), torch.tensor(FP4_MIDPOINTS, device=x.device), right=True, out_int32=True, out=index)
    codes = work.get("mxq_codes", torch.uint8, tuple(g.shape))
    codes.copy_(index).add_(sign.view(torch.uint8), alpha=8)  # codes 8-15: negative
    pairs = codes.view(n, cols, groups, 16, 2)
    blocks = pairs[..., 1] << 4
    blocks.bitwise_or_(pairs[..., 0])  # the low nibble holds the even element
    return blocks, exponents.to(torch.uint8)


class Workspace:
    """Flat device buffers reused from tile to tile (grown, never shrunk), keyed by role and dtype."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, role: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        key = (role, dtype)
        buf = self._buffers.pop(key, None)
        if buf is None or buf.numel() < numel:
            del buf
            buf = torch.empty(numel, dtype=dtype, device=self.device)
        self._buffers[key] = buf
        return buf[:numel].view(shape)


def as_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = t.contiguous().reshape(-1)
    array = flat.view(torch.uint8).numpy()
    return memoryview(array.data).cast("B")


def replace_rows(out: torch.Tensor, row0: int, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write ``values[i]`` over row ``indices[i] - row0`` of ``out`` for the indices in this tile's rows
    ``row0 : row0 + len(out)`` (PEFT's trainable tokens: ``index_copy``, rounded once to ``out``'s dtype).

    >>> out = torch.zeros(3, 2)
    >>> replace_rows(out, 1, [(torch.tensor([0, 2]), torch.tensor([[1.0, 1.0], [2.0, 2.0]]))])
    >>> out.tolist()
    [[0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]
    """
    for indices, values in rows:
        inside = (indices >= row0) & (indices < row0 + out.shape[0])
        if bool(inside.any()):
            out[indices[inside] - row0] = values[inside].to(out.dtype)


def gguf_rows(merged: torch.Tensor, qtype: str, work_dtype: str = "F32", head_rows: int = 0, shift: float = 0.0) -> bytes:
    """Merged rows (the model dtype, on the CPU) as GGUF bytes, converted as llama.cpp's
    convert_hf_to_gguf.py converts a checkpoint tensor: to float32 (a float16 model stays float16),
    q/k rows of each head from HF's rotate-half halves back to interleaved pairs (Llama's
    ``permute``) when ``head_rows`` (rows per head) is set, ``shift`` added (Gemma norms), then
    ``gguf.quants.quantize`` to ``qtype`` (F32, F16, BF16, Q8_0).

    The rows must hold whole heads; each output row depends on its own input row only otherwise,
    so tiles convert independently.

    Example::

        >>> import numpy as np
        >>> x = torch.arange(8, dtype=torch.bfloat16).view(4, 2)
        >>> np.frombuffer(gguf_rows(x, "F32", head_rows=4), dtype=np.float32).reshape(4, 2)[:, 0].tolist()
        [0.0, 4.0, 2.0, 6.0]
    """
    import gguf

    if qtype == "BF16" and merged.dtype == torch.bfloat16 and not shift:
        return _bf16_rows(_unpermute(merged, head_rows))
    x = _unpermute(merged.to(torch.float16 if work_dtype == "F16" else torch.float32), head_rows)
    if shift:
        x = x + shift
    return bytes(gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[qtype]).tobytes())


def _unpermute(x: torch.Tensor, head_rows: int) -> torch.Tensor:
    if not head_rows:
        return x
    k = x.shape[0]
    return x.reshape(k // head_rows, 2, head_rows // 2, -1).transpose(1, 2).reshape(k, -1)


def _bf16_rows(x: torch.Tensor) -> bytes:
    """bfloat16 values as ``gguf.quants.quantize(x.float().numpy(), BF16)`` gives them, without the float32 round
    trip: the rounding is exact for them, and a NaN gets its quiet bit set (0x0040), as gguf's rounding does."""
    bits = x.contiguous().view(torch.int16)
    nan = torch.isnan(x)
    if bool(nan.any()):
        bits = torch.where(nan, bits | 0x0040, bits)
    return bytes(bits.numpy().tobytes())
