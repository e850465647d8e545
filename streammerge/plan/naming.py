"""The checkpoint tensors behind the parameter names an adapter uses.

PEFT names parameters as the model holds them in memory after transformers has loaded it, and
transformers 5 renames and fuses checkpoint keys while loading: a Llava checkpoint's
``language_model.model.layers.0...`` is ``model.language_model.layers.0...`` in memory, and
Mixtral's per-expert ``block_sparse_moe.experts.3.w1.weight`` and ``...w3.weight`` become rows of
one 3-D ``mlp.experts.gate_up_proj``. A merge must write the checkpoint's own names and layout, so
for every in-memory parameter we need the checkpoint tensors that hold it and which slice each
one is.

Two sources give the same answer (the tests check that they agree):

- transformers' own conversion mapping (``transformers.conversion_mapping``), the source of truth,
  applied to the checkpoint's keys on a model built on the ``meta`` device (no weights);
- a built-in table of the common families, so that planning works where transformers is not installed.

Only renamings and expert fusion (stack experts, concatenate gate and up) are understood; a
parameter built by any other conversion is recorded with the operations' names, and an adapter
that touches it is refused with them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from streammerge.formats.safetensors import TensorInfo


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor of an in-memory parameter ``P``: the tensor equals ``P[expert]`` (``P``
    itself when ``expert`` is None) restricted to ``start:stop`` along ``axis`` of that matrix."""

    tensor: str
    expert: int | None
    axis: int
    start: int
    stop: int


@dataclass(frozen=True)
class Param:
    """An in-memory parameter and the checkpoint tensors it is made of."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    unsupported: str = ""
    """Set when transformers builds this parameter with conversions streammerge does not invert."""
    swapped: bool = False
    """The one checkpoint tensor is this 3-D parameter with its last two dimensions swapped (transformers'
    ``Transpose(1, 2)`` conversion, e.g. Qwen3-VL-MoE experts stored (experts, in, out))."""

    @property
    def direct(self) -> str | None:
        """The checkpoint tensor holding the whole parameter as it is, if one does."""
        if len(self.pieces) == 1 and self.pieces[0].expert is None and not self.unsupported and not self.swapped:
            p = self.pieces[0]
            if p.start == 0 and p.stop == self.shape[p.axis]:
                return p.tensor
        return None


@dataclass(frozen=True)
class Naming:
    """In-memory parameter names of a checkpoint (only those that differ from the checkpoint's are kept)."""

    params: dict[str, Param]
    module_params: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """In-memory module -> its parameters in registration order (the order PEFT nests ParamWrappers)."""
    transposed_experts: frozenset[str] = frozenset()
    """Expert modules whose 3-D parameters are (experts, in, out) (``is_transposed`` in transformers)."""
    source: str = ""
    """Where the mapping came from, for the plan's notes."""


@dataclass(frozen=True)
class Rename:
    """Checkpoint key -> in-memory key: ``re.sub(pattern, repl, key, count=1)``."""

    pattern: str
    repl: str


@dataclass(frozen=True)
class Fuse:
    """Per-expert checkpoint tensors stacked into one 3-D parameter (``*`` is the expert index), the
    sources concatenated in order along ``axis`` of each expert's matrix (gate then up)."""

    sources: tuple[str, ...]
    target: str
    axis: int = 0


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    rules: tuple[Rename | Fuse, ...]
    param_order: tuple[str, ...] = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    transposed_experts: bool = False


_LLAVA = (
    Rename(r"^language_model\.lm_head\.", "lm_head."),
    Rename(r"^language_model\.model\.", "model.language_model."),
    Rename(r"^language_model\.", "model.language_model."),
    Rename(r"^vision_tower\.", "model.vision_tower."),
    Rename(r"^multi_modal_projector\.", "model.multi_modal_projector."),
)
_QWEN2_MOE = (
    Fuse((r"mlp.experts.*.gate_proj.weight", r"mlp.experts.*.up_proj.weight"), "mlp.experts.gate_up_proj"),
    Fuse((r"mlp.experts.*.down_proj.weight",), "mlp.experts.down_proj"),
)
FAMILIES: tuple[Family, ...] = (
    Family(
        (
            "llava",
            "paligemma",
            "aya_vision",
            "mistral3",
            "gemma3",
            "vipllava",
            "got_ocr2",
            "internvl",
        ),
        _LLAVA,
    ),
    Family(("llava_next", "llava_next_video", "llava_onevision"), (*_LLAVA, Rename(r"^image_newline$", "model.image_newline"))),
    Family(
        ("qwen2_vl", "qwen2_5_vl"),
        (Rename(r"^visual\.", "model.visual."), Rename(r"^model\.(?!language_model\.|visual\.)", "model.language_model.")),
    ),
    Family(
        ("mixtral", "minimax"),
        (
            Rename(r"\.block_sparse_moe\.", ".mlp."),
            Fuse((r"mlp.experts.*.w1.weight", r"mlp.experts.*.w3.weight"), "mlp.experts.gate_up_proj"),
            Fuse((r"mlp.experts.*.w2.weight",), "mlp.experts.down_proj"),
        ),
    ),
    Family(
        (
            "qwen2_moe",
            "qwen3_moe",
            "deepseek_v2",
            "deepseek_v3",
            "olmoe",
            "glm4_moe",
            "dots1",
            "hunyuan_v1_moe",
            "flex_olmo",
            "qwen3_next",
        ),
        _QWEN2_MOE,
    ),
    Family(("ernie4_5_moe",), (Rename(r"\.mlp\.moe_statics\.", ".mlp.gate.moe_statics."), *_QWEN2_MOE)),
    Family(("gpt_oss",), (), transposed_experts=True),
)
"""The families planning knows without transformers. Each entry is checked against transformers'
conversion mapping on a tiny model in tests/test_architectures.py."""


def model_type(config: dict[str, Any] | None) -> str:
    return str((config or {}).get("model_type") or "")


def glob_regex(glob: str) -> re.Pattern[str]:
    """A fused source pattern as a regex: ``*`` is the expert index, the pattern ends on a name boundary."""
    return re.compile("(?:^|\\.)" + re.escape(glob.lstrip(".")).replace(r"\*", r"(\d+)") + r"$")


def table_naming(tensors: dict[str, TensorInfo], config: dict[str, Any] | None) -> Naming | None:
    """The built-in table's naming of a checkpoint, or None when its family is not in the table."""
    kind = model_type(config)
    family = next((f for f in FAMILIES if kind in f.model_types), None)
    if family is None:
        return None
    renames = [r for r in family.rules if isinstance(r, Rename)]
    fuses = [r for r in family.rules if isinstance(r, Fuse)]
    params: dict[str, Param] = {}
    groups: dict[str, list[tuple[int, int, TensorInfo]]] = {}
    for name, t in tensors.items():
        memory = name
        for r in renames:
            memory = re.sub(r.pattern, r.repl, memory, count=1)
        for fuse in fuses:
            hit = _fuse_match(fuse, memory)
            if hit is not None:
                target, k, expert = hit
                groups.setdefault(target, []).append((k, expert, t))
                break
        else:
            if memory != name:
                params[memory] = Param(memory, t.shape, (Piece(name, None, 0, 0, t.shape[0] if t.shape else 1),))
    for target, members in groups.items():
        params[target] = _stacked(target, members, axis=next(f.axis for f in fuses if target.endswith(f.target)))
    memory_names = set(params) | {n for n in tensors if n not in {p.tensor for q in params.values() for p in q.pieces}}
    return Naming(
        params=params,
        module_params=_module_params(memory_names, family.param_order),
        transposed_experts=frozenset(m for m in _modules(memory_names) if family.transposed_experts and m.endswith(".experts")),
        source=f"built-in table ({family.model_types[0]} family)",
    )


def _fuse_match(fuse: Fuse, key: str) -> tuple[str, int, int] | None:
    for k, glob in enumerate(fuse.sources):
        m = glob_regex(glob).search(key)
        if m:
            prefix = key[: m.start()] + ("." if m.group(0).startswith(".") else "")
            return prefix + fuse.target, k, int(m.group(1))
    return None


def _stacked(target: str, members: list[tuple[int, int, TensorInfo]], axis: int) -> Param:
    """A 3-D parameter stacked from per-expert tensors, the sources concatenated along ``axis``."""
    experts = sorted({e for _, e, _ in members})
    by = {(k, e): t for k, e, t in members}
    sources = sorted({k for k, _, _ in members})
    if experts != list(range(len(experts))) or len(by) != len(experts) * len(sources):
        have = ", ".join(sorted(t.name for _, _, t in members)[:4])
        return Param(target, (), (), unsupported=f"experts {experts} are not complete (have {have}, ...)")
    first = [by[(k, 0)] for k in sources]
    if any(len(t.shape) != 2 for t in first):
        return Param(target, (), (), unsupported="its per-expert tensors are not matrices")
    other = 1 - axis
    sizes = [t.shape[axis] for t in first]
    pieces = []
    for e in experts:
        start = 0
        for k, size in zip(sources, sizes, strict=True):
            t = by[(k, e)]
            if t.shape[axis] != size or t.shape[other] != first[0].shape[other]:
                return Param(target, (), (), unsupported=f"tensor {t.name!r} is {list(t.shape)}, unlike expert 0's")
            pieces.append(Piece(t.name, e, axis, start, start + size))
            start += size
    per_expert = [0, 0]
    per_expert[axis], per_expert[other] = sum(sizes), first[0].shape[other]
    return Param(target, (len(experts), *per_expert), tuple(pieces))


def _modules(names: Iterable[str]) -> set[str]:
    return {n.rpartition(".")[0] for n in names}


def _module_params(names: Iterable[str], order: Sequence[str]) -> dict[str, tuple[str, ...]]:
    rank = {p: i for i, p in enumerate(order)}
    out: dict[str, list[str]] = {}
    for n in names:
        module, _, param = n.rpartition(".")
        out.setdefault(module, []).append(param)
    return {m: tuple(sorted(ps, key=lambda p: (rank.get(p, len(rank)), p))) for m, ps in out.items()}


def transformers_naming(tensors: dict[str, TensorInfo], config: dict[str, Any] | None, root: str) -> Naming | str:
    """transformers' own naming of a checkpoint: its conversion mapping applied to the keys, on a
    model built on the meta device. A string says why it could not be used."""
    try:
        import torch
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError as e:
        return f"transformers is not usable here ({e})"
    arch = ((config or {}).get("architectures") or [None])[0]
    cls = getattr(transformers, str(arch), None) if arch else None
    if cls is None:
        return f"transformers {transformers.__version__} has no class {arch!r}"
    logger = transformers.utils.logging.get_logger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # config warnings (rope, token ids) are not the user's business while planning
    try:
        cfg = transformers.AutoConfig.from_pretrained(root, local_files_only=True)
        with torch.device("meta"):
            model = cls(cfg)
        conversions = get_model_conversion_mapping(model)
    except Exception as e:  # a model transformers cannot build here: the table decides
        return f"transformers could not build {arch} on the meta device ({type(e).__name__}: {e})"
    finally:
        logger.setLevel(level)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None) or None
    params: dict[str, Param] = {}
    groups: dict[str, list[tuple[int, int, TensorInfo]]] = {}
    converter_of: dict[str, Any] = {}
    for name, t in tensors.items():
        memory, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        if pattern is None:
            if memory != name:
                params[memory] = Param(memory, t.shape, (Piece(name, None, 0, 0, t.shape[0] if t.shape else 1),))
            continue
        conv = next(c for c in converters if pattern in c.source_patterns)
        converter_of[memory] = conv
        m = _star_regex(pattern).search(name)
        expert = int(m.group(1)) if m and m.re.groups else -1
        groups.setdefault(memory, []).append((list(conv.source_patterns).index(pattern), expert, t))
    for target, members in groups.items():
        ops = list(converter_of[target].operations)
        kinds = tuple(type(op).__name__ for op in ops)
        if kinds == ("Transpose",) and len(members) == 1:
            swapped = _transposed(target, members[0][2], ops[0], meta.get(target))
            if swapped is not None:
                params[target] = swapped
            elif target != members[0][2].name:
                t = members[0][2]
                params[target] = Param(target, t.shape, (Piece(t.name, None, 0, 0, t.shape[0] if t.shape else 1),))
        elif kinds == ("MergeModulelist",) and getattr(ops[0], "dim", 0) == 0:
            params[target] = _stacked(target, members, 0)
        elif kinds == ("MergeModulelist", "Concatenate") and getattr(ops[0], "dim", 0) == 0 and getattr(ops[1], "dim", 0) in (1, 2):
            params[target] = _stacked(target, members, getattr(ops[1], "dim", 1) - 1)
        else:
            params[target] = Param(target, (), (), unsupported=f"transformers builds it with {' + '.join(kinds)}")
    module_params: dict[str, tuple[str, ...]] = {}
    transposed: set[str] = set()
    for mname, module in model.named_modules():
        own = tuple(n for n, _ in module.named_parameters(recurse=False))
        if own:
            module_params[mname] = own
        if getattr(module, "is_transposed", False) and any(p.dim() == 3 for p in module.parameters(recurse=False)):
            transposed.add(mname)
    return Naming(params, module_params, frozenset(transposed), source=f"transformers {transformers.__version__} conversion mapping")


def _transposed(target: str, t: TensorInfo, op: Any, meta: Any) -> Param | None:
    """transformers' ``Transpose`` of one checkpoint tensor: None when the tensor is the parameter as it is
    (``check_dims`` and the shapes agree), else the swapped Param (or an unsupported one)."""
    shape = tuple(meta.shape) if meta is not None else None
    if getattr(op, "check_dims", False) and shape == t.shape:
        return None
    dims = sorted((getattr(op, "dim0", 0), getattr(op, "dim1", 1)))
    if len(t.shape) == 3 and dims == [1, 2] and (shape is None or shape == (t.shape[0], t.shape[2], t.shape[1])):
        return Param(target, (t.shape[0], t.shape[2], t.shape[1]), (Piece(t.name, None, 0, 0, t.shape[0]),), swapped=True)
    return Param(target, (), (), unsupported=f"transformers transposes {t.name!r} {list(t.shape)} along dimensions {dims}")


def _star_regex(pattern: str) -> re.Pattern[str]:
    """transformers' source pattern (``.experts.*.w1.weight``) as a regex capturing the expert index."""
    literal = pattern.lstrip("^").replace("\\.", ".")
    return re.compile(re.escape(literal).replace(r"\*", r"(\d+)"))
