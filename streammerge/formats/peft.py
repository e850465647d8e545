"""PEFT LoRA adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

We turn the saved keys into (module, lora_A, lora_B, scale) pairs exactly as PEFT's LoraModel
would build its layers: the scale is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) where r and
alpha come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module name.
Whatever the adapter holds that this version cannot merge exactly is refused, never dropped.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

from streammerge.errors import BadAdapter, BadCheckpoint, UnsupportedAdapter
from streammerge.formats.checkpoint import PICKLE_SUFFIXES, check_inside, load_json_object
from streammerge.formats.safetensors import FLOAT_DTYPES, TensorInfo, read_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
_LORA_BIAS_KEY = re.compile(r"^(?P<module>.+)\.lora_B(?:\.(?P<adapter>[^.]+))?\.bias$")
_REPLACEMENT_KEY = re.compile(r"^(?P<name>.+\.(?:weight|bias))$")
"""A full tensor saved with the adapter: a ``modules_to_save`` copy, a trained bias (``bias="all"`` /
``"lora_only"``) or the base weight of a targeted embedding/output layer (``<module>.base_layer.weight``,
``save_embedding_layers``). Loading the adapter puts it into the model in place of the base's tensor."""
_WRAPPER_PARTS = re.compile(r"\.(?:base_layer|original_module)(?=\.)|\.modules_to_save(?:\.[^.]+)?(?=\.(?:weight|bias)$)")
_TOKENS_KEY = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.(?P<adapter>[^.]+))?$")
"""PEFT's trainable tokens (``trainable_token_indices``): the rows the embedding's listed tokens take."""
_UNSUPPORTED_KEYS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"trainable_tokens|token_adapter"), "a trainable-tokens tensor streammerge does not know"),
    (re.compile(r"\.lora_[A-Za-z_]+"), "a LoRA variant tensor streammerge does not know"),
)
_UNSUPPORTED_CONFIG = (
    ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens), whose effect depends on the input and cannot be merged"),
    ("layer_replication", "layer_replication, which changes the architecture"),
    ("use_qalora", "QA-LoRA (use_qalora)"),
    ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
    ("kasa_config", "KaSA (kasa_config), which truncates the base weight by SVD before training"),
    ("arrow_config", "Arrow routing (arrow_config), which picks among adapters per input and cannot be merged"),
)


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: ``W[module.weight] += scale * (B @ A)``, transposed when ``transpose``
    (embedding LoRA, whose A is (r, vocab) and B (hidden, r); or a fan_in_fan_out base)."""

    module: str
    a: TensorInfo
    b: TensorInfo
    rank: int
    alpha: float
    scale: float
    embedding: bool = False
    magnitude: TensorInfo | None = None
    """DoRA: the learned magnitude of each output row (``lora_magnitude_vector``)."""
    bias: TensorInfo | None = None
    """lora_bias: ``lora_B.bias``, added to the base bias times ``scale``."""
    param_depth: int | None = None
    """LoRA on a raw parameter of ``module`` (PEFT's ParamWrapper, ``target_parameters``): how many
    ParamWrappers are nested inside this one (0: the outermost, keys without ``.base_layer``). Which
    parameter it is, its rank and its scale are known only against the base (see
    :func:`streammerge.plan.mapping.map_updates`); ``rank`` and ``scale`` here assume one expert."""

    @property
    def key_module(self) -> str:
        """The module as the adapter's keys spell it (ParamWrappers nested ``.base_layer`` deep)."""
        return self.module + ".base_layer" * (self.param_depth or 0)


@dataclass(frozen=True)
class Adapter:
    """A validated LoRA adapter folder."""

    root: str
    weights_path: str
    config: dict[str, Any]
    pairs: tuple[LoraPair, ...]
    replacements: dict[str, TensorInfo]
    """base tensor name -> a full tensor saved with the adapter that replaces it (modules_to_save,
    trained biases, the base layer of a targeted embedding)."""
    fan_in_fan_out: bool
    flavours: tuple[str, ...]
    """What kind of LoRA this is, for humans: e.g. ("lora", "rslora", "rank_pattern")."""
    tokens: tuple[TokenRows, ...] = ()
    """Trainable tokens: embedding rows the adapter replaces."""


@dataclass(frozen=True)
class TokenRows:
    """PEFT's trainable tokens on one embedding: merging writes row ``delta[i]`` over row ``indices[i]``
    of ``module.weight`` (PEFT's ``index_copy``: a replacement, not an addition)."""

    module: str
    delta: TensorInfo
    indices: tuple[int, ...]


def pattern_key(patterns: list[str], module: str) -> str | None:
    """The first pattern that matches ``module`` the way PEFT matches rank/alpha patterns."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue
    return None


def _config_value(path: str, config: dict[str, Any], key: str, kinds: tuple[type, ...], default: Any) -> Any:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise BadAdapter(f"{path}: {key!r} must be {names}, found {value!r}")
    return value


def _check_config(path: str, config: dict[str, Any]) -> tuple[int, float, bool, bool, dict[str, int], dict[str, float]]:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise UnsupportedAdapter(f"{path}: peft_type {peft_type!r} is not LoRA; streammerge merges LoRA adapters only")
    for key, what in _UNSUPPORTED_CONFIG:
        if config.get(key) not in (None, False, [], {}, ""):
            raise UnsupportedAdapter(f"{path}: adapter uses {what}, which streammerge cannot merge; refusing rather than dropping it")
    r = _config_value(path, config, "r", (int,), 8)
    alpha = _config_value(path, config, "lora_alpha", (int, float), 8)
    if r <= 0:
        raise BadAdapter(f"{path}: 'r' must be positive, found {r}")
    if not math.isfinite(alpha):
        raise BadAdapter(f"{path}: 'lora_alpha' must be a finite number, found {alpha!r}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "lora_ga")):
        raise UnsupportedAdapter(
            f"{path}: init_lora_weights={init!r}: this adapter belongs to a residual base, not the original one; "
            "save it with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA, then merge that"
        )
    rslora = _config_value(path, config, "use_rslora", (bool,), False)
    fifo = _config_value(path, config, "fan_in_fan_out", (bool,), False)
    targets = _config_value(path, config, "target_parameters", (list,), [])
    if not all(isinstance(t, str) and t for t in targets):
        raise BadAdapter(f"{path}: 'target_parameters' must be a list of parameter names, found {targets!r}")
    ranks = _config_value(path, config, "rank_pattern", (dict,), {})
    alphas = _config_value(path, config, "alpha_pattern", (dict,), {})
    for key, pattern in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        for k, v in pattern.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or (key == "rank_pattern" and not isinstance(v, int)):
                raise BadAdapter(f"{path}: {key}[{k!r}] must be a number, found {v!r}")
            if not math.isfinite(v) or (key == "rank_pattern" and v <= 0):
                raise BadAdapter(f"{path}: {key}[{k!r}] must be {'a positive integer' if key == 'rank_pattern' else 'finite'}, found {v!r}")
    return r, float(alpha), rslora, fifo, ranks, alphas


def open_adapter(root: str | os.PathLike[str]) -> Adapter:
    """Read and validate a PEFT LoRA adapter folder (headers and config only).

    Example::

        adapter = open_adapter("./my-lora")
        print([(p.module, p.rank, p.scale) for p in adapter.pairs][:3])
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        what = "is a file; give the adapter folder" if os.path.exists(root) else "does not exist"
        raise BadAdapter(f"{root}: adapter folder {what}")
    config_path = os.path.join(root, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise BadAdapter(f"{root}: no {CONFIG_NAME}; is this a PEFT adapter folder?")
    try:
        config = load_json_object(config_path, CONFIG_NAME)
    except BadCheckpoint as e:
        raise BadAdapter(str(e)) from e
    r, alpha, rslora, fifo, ranks, alphas = _check_config(config_path, config)

    weights_path = os.path.join(root, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        pickles = [n for n in sorted(os.listdir(root)) if n.startswith("adapter_model") and n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise BadAdapter(
                f"{os.path.join(root, pickles[0])}: pickle adapter weights are not read (no pickle); save the adapter with safe_serialization=True"
            )
        raise BadAdapter(f"{root}: no {WEIGHTS_NAME}")
    try:
        header = read_header(check_inside(root, weights_path))
        check_inside(root, config_path)
    except BadCheckpoint as e:
        raise BadAdapter(str(e)) from e

    factors: dict[str, dict[str, TensorInfo]] = {}
    extras: dict[str, dict[str, TensorInfo]] = {}
    replacements: dict[str, TensorInfo] = {}
    token_deltas: dict[str, TensorInfo] = {}
    for t in header.tensors:
        kind, module = _classify_key(weights_path, t.name)
        if kind == "tokens":
            if module in token_deltas:
                raise BadAdapter(f"{weights_path}: tensor {t.name!r}: module {module!r} has it twice (several adapter names in one file?)")
            token_deltas[module] = t
            continue
        if kind == "replacement":
            name = _WRAPPER_PARTS.sub("", module)
            if name in replacements:
                # A modules_to_save copy wins over the wrapped original (PEFT saves both when a
                # vocabulary was resized); two copies of the same rank are ambiguous.
                old, new = _replacement_rank(replacements[name].name), _replacement_rank(t.name)
                if old == new:
                    raise BadAdapter(f"{weights_path}: tensor {t.name!r} replaces {name!r}, as {replacements[name].name!r} already does")
                if new < old:
                    continue
            if t.dtype not in FLOAT_DTYPES:
                raise BadAdapter(f"{weights_path}: tensor {t.name!r} has dtype {t.dtype}; expected a float tensor")
            replacements[name] = t
            continue
        slot = factors if kind in ("A", "B", "eA", "eB") else extras
        if kind in slot.setdefault(module, {}):
            raise BadAdapter(f"{weights_path}: tensor {t.name!r}: module {module!r} has it twice (several adapter names in one file?)")
        slot[module][kind] = t
    tokens = _token_rows(weights_path, config, token_deltas)
    if not factors and not replacements and not tokens:
        raise BadAdapter(f"{weights_path}: holds no LoRA tensors (lora_A/lora_B) and no saved modules")
    for module, found in extras.items():
        if module not in factors:
            t = next(iter(found.values()))
            raise BadAdapter(f"{weights_path}: tensor {t.name!r} belongs to module {module!r}, which has no lora_A/lora_B")

    targets = list(config.get("target_parameters") or [])
    pairs = [
        _make_pair(weights_path, module, ab, extras.get(module, {}), r, alpha, rslora, ranks, alphas, targets, config.get("target_modules"))
        for module, ab in factors.items()
    ]
    flavours = ["rslora" if rslora else "lora"]
    flavours += [name for name, used in (("rank_pattern", ranks), ("alpha_pattern", alphas), ("fan_in_fan_out", fifo)) if used]
    flavours += [
        name
        for name, used in (
            ("target_parameters", any(p.param_depth is not None for p in pairs)),
            ("dora", any(p.magnitude is not None for p in pairs)),
            ("embedding lora", any(p.embedding for p in pairs)),
            ("lora_bias", any(p.bias is not None for p in pairs)),
            ("modules_to_save", any(".base_layer." not in t.name and t.name.endswith(".weight") for t in replacements.values())),
            ("saved base layers", any(".base_layer.weight" in t.name for t in replacements.values())),
            ("trained biases", any(t.name.endswith(".bias") for t in replacements.values())),
            ("trainable tokens", bool(tokens)),
        )
        if used
    ]
    return Adapter(
        root=root,
        weights_path=weights_path,
        config=config,
        pairs=tuple(pairs),
        replacements=replacements,
        fan_in_fan_out=fifo,
        flavours=tuple(flavours),
        tokens=tokens,
    )


def _token_rows(path: str, config: dict[str, Any], deltas: dict[str, TensorInfo]) -> tuple[TokenRows, ...]:
    """The trainable-tokens deltas with their token indices from ``trainable_token_indices`` (a list: the
    input embedding's; a dict: module name -> list, matched as PEFT matches it, by name or dotted suffix)."""
    spec = config.get("trainable_token_indices")
    if not deltas:
        if spec not in (None, [], {}):
            raise BadAdapter(f"{path}: adapter_config.json sets trainable_token_indices but the file holds no trainable_tokens_delta")
        return ()
    if not isinstance(spec, (list, dict)) or not spec:
        raise BadAdapter(f"{path}: holds trainable-tokens deltas but adapter_config.json gives no trainable_token_indices ({spec!r})")
    out = []
    for module, delta in deltas.items():
        if isinstance(spec, list):
            if len(deltas) > 1:
                raise BadAdapter(f"{path}: trainable_token_indices is one list but the file holds deltas for {sorted(deltas)}")
            indices: object = spec
        else:
            keys = [k for k in spec if module == k or module.endswith("." + k)]
            if len(keys) != 1:
                raise BadAdapter(f"{path}: tensor {delta.name!r}: trainable_token_indices names {keys or 'none'} of its module {module!r}")
            indices = spec[keys[0]]
        if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise BadAdapter(f"{path}: trainable_token_indices for {module!r} must be a list of token ids, found {indices!r}")
        if len(set(indices)) != len(indices):
            raise BadAdapter(f"{path}: trainable_token_indices for {module!r} lists a token twice: {indices}")
        if delta.dtype not in FLOAT_DTYPES or len(delta.shape) != 2 or delta.shape[0] != len(indices):
            raise BadAdapter(
                f"{path}: tensor {delta.name!r} is {delta.dtype} {list(delta.shape)}; expected a float matrix of {len(indices)} rows "
                "(one per token in trainable_token_indices)"
            )
        out.append(TokenRows(module, delta, tuple(indices)))
    return tuple(out)


def targets_module(targets: list[str], module: str, target_modules: object = None) -> bool:
    """Whether some ``target_parameters`` entry names a parameter of ``module`` (PEFT's matching:
    the full ``module.param`` key, or a suffix of it after a dot).

    A bare entry (``"gate_up_proj"``, as PEFT 0.21 writes when it turns ``all-linear`` on an MoE model
    into target_parameters) can name a parameter of any module; the module is taken as a
    ParamWrapper when ``target_modules`` is a list that does not name it (so its LoRA is not a layer's)."""
    for t in targets:
        t_module = t.rpartition(".")[0]
        if t_module and (module == t_module or module.endswith("." + t_module)):
            return True
    if not any("." not in t for t in targets) or not isinstance(target_modules, list):
        return False
    return not any(isinstance(m, str) and (module == m or module.endswith("." + m)) for m in target_modules)


def targeted_params(targets: list[str], module: str, params: tuple[str, ...]) -> list[str]:
    """The parameters of ``module`` (in registration order) that ``target_parameters`` names."""
    return [p for p in params if any(f"{module}.{p}" == t or f"{module}.{p}".endswith("." + t) for t in targets)]


def param_rank_alpha(adapter: Adapter, key: str) -> tuple[int, float]:
    """r and lora_alpha PEFT gives the ParamWrapper of parameter ``key`` (patterns match the parameter's name)."""
    cfg = adapter.config
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rank_key, alpha_key = pattern_key(list(ranks), key), pattern_key(list(alphas), key)
    rank = ranks[rank_key] if rank_key is not None else int(cfg.get("r", 8))
    alpha = alphas[alpha_key] if alpha_key is not None else cfg.get("lora_alpha", 8)
    return int(rank), float(alpha)


def _strip_prefix(module: str) -> str:
    return module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module


def _replacement_rank(key: str) -> int:
    """Which saved copy of a module's tensor the merged model gets: the trained one first."""
    if ".modules_to_save." in key:
        return 2
    if ".original_module." in key or ".base_layer." in key:
        return 0
    return 1


def _classify_key(path: str, key: str) -> tuple[str, str]:
    """(kind, module or tensor name) of an adapter key: A/B, eA/eB (embedding), magnitude, bias, replacement."""
    for pattern, prefix in ((_LORA_KEY, ""), (_EMBEDDING_KEY, "e")):
        m = pattern.match(key)
        if m:
            return prefix + m["ab"], _strip_prefix(m["module"])
    for pattern, kind in ((_MAGNITUDE_KEY, "magnitude"), (_LORA_BIAS_KEY, "bias"), (_TOKENS_KEY, "tokens")):
        m = pattern.match(key)
        if m:
            return kind, _strip_prefix(m["module"])
    for pattern, what in _UNSUPPORTED_KEYS:
        if pattern.search(key):
            raise UnsupportedAdapter(f"{path}: tensor {key!r} is {what}, which streammerge cannot merge; refusing rather than dropping it")
    if _REPLACEMENT_KEY.match(key):
        return "replacement", _strip_prefix(key)
    raise UnsupportedAdapter(
        f"{path}: tensor {key!r} is not a LoRA factor or a saved module streammerge knows; refusing rather than dropping it"
    )


def _make_pair(
    path: str,
    module: str,
    ab: dict[str, TensorInfo],
    extra: dict[str, TensorInfo],
    r: int,
    alpha: float,
    rslora: bool,
    ranks: dict[str, int],
    alphas: dict[str, float],
    targets: list[str],
    target_modules: object = None,
) -> LoraPair:
    depth = 0
    while module.endswith(".base_layer"):
        module, depth = module.removesuffix(".base_layer"), depth + 1
    param_depth = depth if depth or targets_module(targets, module, target_modules) else None
    embedding = "eA" in ab or "eB" in ab
    a, b = (ab.get("eA"), ab.get("eB")) if embedding else (ab.get("A"), ab.get("B"))
    if a is None or b is None or len(ab) != 2:
        t = next(iter(ab.values()))
        raise BadAdapter(f"{path}: tensor {t.name!r} has no matching partner (lora_A with lora_B, lora_embedding_A with lora_embedding_B)")
    for t in (a, b):
        if t.dtype not in FLOAT_DTYPES:
            raise BadAdapter(f"{path}: tensor {t.name!r} has dtype {t.dtype}; LoRA factors must be F16, BF16, F32 or F64")
        if len(t.shape) != 2:
            raise UnsupportedAdapter(
                f"{path}: tensor {t.name!r} has shape {list(t.shape)}; only LoRA on linear and embedding layers (2-D factors) is supported"
            )
    if a.shape[0] != b.shape[1]:
        raise BadAdapter(f"{path}: tensor {a.name!r} has rank {a.shape[0]} but {b.name!r} has rank {b.shape[1]}")
    if 0 in a.shape or 0 in b.shape:
        raise BadAdapter(
            f"{path}: tensors {a.name!r} {list(a.shape)} / {b.name!r} {list(b.shape)} are empty (a sharded save that was not gathered?)"
        )
    rank_key = pattern_key(list(ranks), module)
    alpha_key = pattern_key(list(alphas), module)
    rank = ranks[rank_key] if rank_key is not None else r
    lora_alpha = float(alphas[alpha_key]) if alpha_key is not None else alpha
    if param_depth is None and a.shape[0] != rank and a.shape[0] % rank == 0 and any("." not in t for t in targets):
        param_depth = 0  # target_modules as a regex and bare target_parameters: the rows (experts * r) tell
    if param_depth is not None:  # A is (experts * r, in): checked against the base's parameter
        if extra:
            t = next(iter(extra.values()))
            raise UnsupportedAdapter(
                f"{path}: tensor {t.name!r}: PEFT does not train DoRA or lora_bias on raw parameters (target_parameters)"
            )
        scale = lora_alpha / math.sqrt(rank) if rslora else lora_alpha / rank
        return LoraPair(module=module, a=a, b=b, rank=rank, alpha=lora_alpha, scale=scale, param_depth=param_depth)
    if a.shape[0] != rank:
        raise BadAdapter(f"{path}: tensor {a.name!r} has rank {a.shape[0]} but adapter_config.json gives r={rank} for {module!r}")
    scale = lora_alpha / math.sqrt(rank) if rslora else lora_alpha / rank
    magnitude, bias = extra.get("magnitude"), extra.get("bias")
    out_features = b.shape[0]
    for vec, what in ((magnitude, "DoRA magnitude"), (bias, "LoRA bias")):
        if vec is not None and (vec.shape != (out_features,) or vec.dtype not in FLOAT_DTYPES):
            raise BadAdapter(
                f"{path}: tensor {vec.name!r} ({what}) is {vec.dtype} {list(vec.shape)}, expected a float vector of {out_features}"
            )
    if magnitude is not None and embedding:
        raise UnsupportedAdapter(
            f"{path}: tensor {magnitude.name!r}: DoRA on an embedding layer is not supported; refusing rather than dropping it"
        )
    return LoraPair(module=module, a=a, b=b, rank=rank, alpha=lora_alpha, scale=scale, embedding=embedding, magnitude=magnitude, bias=bias)
