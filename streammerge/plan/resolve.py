"""From an adapter's names to checkpoint tensors, and LoRA on raw parameters (fused experts).

:class:`Names` finds the checkpoint tensor of a module PEFT names: the name itself, a unique
suffix, or, when the checkpoint saves other names than the model holds in memory, through the
checkpoint's naming (:mod:`streammerge.plan.naming`), worked out only when first needed.

:func:`param_terms` turns one PEFT ParamWrapper (``target_parameters``) into LoRA terms on the
checkpoint tensors that hold the parameter. For a 3-D parameter of E experts PEFT keeps
``A`` as (E * r, in) and ``B`` as (out, r * E) and computes, per expert e,

    ``D_e = B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e]``   (out, in)

``P[e] += scale * D_e`` when the experts are (E, out, in), ``D_e.T`` when they are (E, in, out)
(``is_transposed``); PEFT's in/out are the parameter's last two dimensions swapped unless the
module is transposed. Expert e's rows of A are contiguous, so they become a smaller source; its
columns of B are every E-th one (``b_cols``). A checkpoint tensor that holds a slice of ``P[e]``
(the gate half of gate_up) gets the matching rows of B or columns of A; one that holds ``P``
itself (fused on disk: gpt-oss) gets one term per expert, each on its band of rows.
"""

from __future__ import annotations

import math

from streammerge.errors import AdapterMismatch
from streammerge.formats.checkpoint import Checkpoint
from streammerge.formats.peft import Adapter, LoraPair, param_rank_alpha, targeted_params
from streammerge.formats.safetensors import FLOAT_DTYPES, Source, TensorInfo
from streammerge.plan.model import LoraTerm
from streammerge.plan.naming import Naming, Param, table_naming, transformers_naming


def find_base_tensor(ckpt: Checkpoint, module: str, param: str = "weight") -> TensorInfo | None:
    """The base tensor of a module PEFT names: ``<module>.weight``, else the unique tensor ending so."""
    exact = ckpt.tensors.get(f"{module}.{param}")
    if exact is not None:
        return exact
    suffix = f".{module}.{param}"
    found = [t for name, t in ckpt.tensors.items() if name.endswith(suffix)]
    if len(found) == 1:
        return found[0]
    # The base may be saved without the wrapper prefix PEFT saw (e.g. "model."): try dropping it.
    head, _, rest = module.partition(".")
    return ckpt.tensors.get(f"{rest}.{param}") if head and rest else None


class Names:
    """Looks up checkpoint tensors by the names an adapter uses."""

    def __init__(self, ckpt: Checkpoint, naming: Naming | None = None) -> None:
        self.ckpt = ckpt
        self._naming = naming
        self._why = ""
        self.used: Naming | None = None
        """The naming, once a lookup needed it (for the plan's notes)."""
        self.asked_transformers = False
        """Whether working out the naming imported transformers (resident for the rest of the process)."""

    @property
    def naming(self) -> Naming | None:
        if self._naming is None and not self._why:
            self.asked_transformers = True
            found = transformers_naming(self.ckpt.tensors, self.ckpt.config, self.ckpt.root)
            if isinstance(found, str):
                self._why = found
                found = table_naming(self.ckpt.tensors, self.ckpt.config)  # type: ignore[assignment]
            self._naming = found if isinstance(found, Naming) else None
            if self._naming is None:
                self._why += "; the built-in table does not know model_type " + repr((self.ckpt.config or {}).get("model_type"))
        return self._naming

    def param(self, name: str) -> Param | None:
        naming = self.naming
        found = naming.params.get(name) if naming else None
        if found is not None:
            self.used = naming
        return found

    def tensor(self, module: str, param: str = "weight") -> TensorInfo | None:
        """The checkpoint tensor that is ``module.param`` in memory, as it is (not a slice)."""
        found = find_base_tensor(self.ckpt, module, param)
        if found is not None:
            return found
        mapped = self.param(f"{module}.{param}")
        direct = mapped.direct if mapped else None
        return self.ckpt.tensors.get(direct) if direct else None

    def looked_for(self, module: str, param: str = "weight") -> str:
        """What a failed lookup tried, for the error message."""
        tried = f"{module}.{param!s}, *.{module}.{param}"
        naming = self.naming
        if naming is None:
            return f"{tried}; no in-memory naming of this checkpoint: {self._why.lstrip('; ')}"
        return f"{tried} and the in-memory names of the checkpoint's keys by the {naming.source}"


def param_terms(names: Names, adapter: Adapter, pair: LoraPair, weight: float, index: int) -> tuple[str, list[tuple[TensorInfo, LoraTerm]]]:
    """The in-memory parameter one ParamWrapper pair adapts, and its LoRA terms on the checkpoint tensors it changes."""
    where = f"{adapter.weights_path}: tensor {pair.a.name!r}"
    naming = names.naming
    targets = list(adapter.config.get("target_parameters") or [])
    own = naming.module_params.get(pair.module) if naming else None
    if own is None:  # no naming: the checkpoint's own names are the parameters
        own = tuple(n.removeprefix(pair.module + ".") for n in names.ckpt.tensors if n.rpartition(".")[0] == pair.module)
    wrapped = targeted_params(targets, pair.module, own)
    depth = pair.param_depth or 0
    if depth >= len(wrapped):
        raise AdapterMismatch(
            f"{where} is LoRA on a parameter of {pair.module!r} (target_parameters={targets}), but the base {names.ckpt.root} "
            f"has {len(wrapped)} such parameter(s) there ({', '.join(own) or 'none'}; looked for {names.looked_for(pair.module, '*')})"
        )
    param = wrapped[len(wrapped) - 1 - depth]  # PEFT wraps in registration order: the first is innermost
    name = f"{pair.module}.{param}"
    rank, alpha = param_rank_alpha(adapter, name)
    scale = weight * (alpha / math.sqrt(rank) if adapter.config.get("use_rslora") else alpha / rank)
    mapped = names.param(name)
    tensor = None if mapped is not None else names.tensor(pair.module, param)
    if mapped is None and tensor is None:
        raise AdapterMismatch(
            f"{where} adapts parameter {name!r}, which the base {names.ckpt.root} does not have (looked for {names.looked_for(pair.module, param)})"
        )
    if mapped is not None and mapped.unsupported:
        raise AdapterMismatch(f"{where} adapts {name!r}, which streammerge cannot map onto the checkpoint: {mapped.unsupported}")
    shape = mapped.shape if mapped is not None else tensor.shape  # type: ignore[union-attr]
    a, b = pair.a, pair.b
    if len(shape) == 2:  # a plain matrix (a router): PEFT's Linear delta B @ A, (out, in)
        if a.shape[0] != rank or a.shape[1] != shape[1] or b.shape != (shape[0], rank):
            raise AdapterMismatch(
                f"{where}: LoRA {list(a.shape)} / {list(b.shape)} with r={rank} does not fit parameter {name!r} of {list(shape)}"
            )
        target = tensor if tensor is not None else names.ckpt.tensors[mapped.direct or ""]  # type: ignore[union-attr]
        _check_float(where, target)
        return name, [(target, LoraTerm(a=Source.of(a), b=Source.of(b), scale=scale, transpose=False, adapter=index))]
    if len(shape) != 3:
        raise AdapterMismatch(f"{where} adapts {name!r} of shape {list(shape)}; PEFT's ParamWrapper takes 2-D and 3-D parameters")
    experts, d1, d2 = shape
    transposed = naming is not None and pair.module in naming.transposed_experts
    in_f, out_f = (d1, d2) if transposed else (d2, d1)
    if a.shape != (experts * rank, in_f) or b.shape != (out_f, experts * rank):
        raise AdapterMismatch(
            f"{where}: LoRA {list(a.shape)} / {list(b.shape)} does not fit {name!r} of {list(shape)} "
            f"with {experts} experts and r={rank} (expected A {[experts * rank, in_f]}, B {[out_f, experts * rank]})"
        )
    out: list[tuple[TensorInfo, LoraTerm]] = []
    if mapped is None or mapped.direct or mapped.swapped:
        # the checkpoint stores P (perhaps renamed, or with each expert transposed): one term per expert, on its rows
        stored = tensor if mapped is None else names.ckpt.tensors[mapped.pieces[0].tensor]
        assert stored is not None
        _check_float(where, stored)
        flip, rows = (not transposed, d2) if mapped is not None and mapped.swapped else (transposed, d1)
        for e in range(experts):
            out.append((stored, LoraTerm(
                a=row_slice(a, e * rank, (e + 1) * rank), b=Source.of(b), scale=scale, transpose=flip, adapter=index,
                b_cols=(e, experts * rank, experts), rows=(e * rows, (e + 1) * rows),
            )))  # fmt: skip
        return name, out
    for piece in mapped.pieces:
        target = names.ckpt.tensors[piece.tensor]
        _check_float(where, target)
        e = piece.expert if piece.expert is not None else 0
        a_e = row_slice(a, e * rank, (e + 1) * rank)
        expect = (piece.stop - piece.start, d2) if piece.axis == 0 else (d1, piece.stop - piece.start)
        if target.shape != expect:
            raise AdapterMismatch(
                f"{where}: checkpoint tensor {piece.tensor!r} is {list(target.shape)}, expected {list(expect)} as part of {name!r}"
            )
        # Rows of P[e] are rows of D_e (B's rows) unless transposed (then A's columns); columns the other way.
        on_b = (piece.axis == 0) != transposed
        span = (piece.start, piece.stop)
        term = LoraTerm(
            a=a_e, b=row_slice(b, *span) if on_b else Source.of(b), scale=scale, transpose=transposed, adapter=index,
            a_cols=None if on_b else (*span, 1), b_cols=(e, experts * rank, experts),
        )  # fmt: skip
        out.append((target, term))
    return name, out


def row_slice(t: Source, start: int, stop: int) -> Source:
    """Rows ``start:stop`` of a row-major matrix, as a source of its own."""
    row = t.nbytes // t.shape[0]
    return Source(
        file=t.file, offset=t.offset + start * row, nbytes=(stop - start) * row, dtype=t.dtype, shape=(stop - start, *t.shape[1:])
    )


def _check_float(where: str, target: TensorInfo) -> None:
    if target.dtype not in FLOAT_DTYPES:
        raise AdapterMismatch(
            f"{where}: base tensor {target.name!r} has dtype {target.dtype}; only F16/BF16/F32/F64 weights can take a LoRA delta"
        )
