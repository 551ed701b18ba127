"""Reading and checking LoRA adapters in PEFT's on-disk format.

Adapter folders come from tenants, so everything here assumes hostile input: the
safetensors header is parsed and bounds-checked before any tensor is touched, pickle
files are refused without being opened, and every mismatch with the base model is an
error naming the offending field instead of a silent partial load.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loramux.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from loramux.server.adapter_targets import Busy, TargetError, plan_targets

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_CONFIG_BYTES = 1 << 20
# json.loads holds the GIL: a 68 MiB header of 500k entries took 9.6 s here (2 loaded
# cores), every thread of the server stalled; 2 MiB takes 0.13 s. The largest real adapter
# header (all linear layers of a 126-layer model, 1,764 tensors) is 233 KiB.
MAX_HEADER_BYTES = 2 << 20
# Largest weight or scaling accepted: float16's range, which no trained LoRA comes near.
# The bound is what keeps one tenant's adapter out of another's output: the dense LoRA
# path multiplies every row by every batched adapter's A and masks with zeros, and
# 0 * inf is NaN. Within it, x @ A cannot overflow float32 for any real activations.
MAX_ABS_VALUE = 65504.0
PEFT_PREFIX = "base_model.model."
_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_MAX_DIMS = 8  # LoRA weights have 2; the bound keeps math.prod of a crafted shape small
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
# DoRA's magnitude vector, as PEFT saves it (no adapter name, no ".weight": PEFT's loader
# adds both to exactly this suffix, and to nothing else)
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector$")
MAGNITUDE = "M"  # the part name of a magnitude vector beside "A" and "B"
# Trainable tokens' rows, as PEFT saves them on the input embedding (its tied output layer's
# copy is not saved: PEFT ties it back when loading)
_TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"
# The adapter name PeftModel.from_pretrained loads a key carrying one under; any other name
# leaves the layer as initialised (PEFT warns of missing keys), so such a key is refused.
_PEFT_ADAPTER_NAME = "default"


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ExpertShape:
    """One fused MoE experts parameter of the base model (transformers' 3-D layout), as
    PEFT's `ParamWrapper` sees it: one LoRA A/B per expert, mapping in -> out features."""

    num_experts: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class EmbeddingShape:
    """The base model's input embedding, for checking trainable tokens against it."""

    name: str  # its module name, e.g. "model.embed_tokens"
    vocab: int  # rows of the embedding matrix (token ids must be below it)
    hidden: int  # its width (each trainable token's row is [hidden])
    max_rows: int  # the server's max_trainable_tokens: most rows one adapter may bring


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter is, once checked against a base model."""

    rank: int  # largest rank over its modules (rank_pattern may vary it per module)
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # short names, e.g. ("q_proj", "v_proj")
    size_bytes: int  # weights file size on disk
    base_model_name_or_path: str | None
    scaling: float  # alpha / rank (or alpha / sqrt(rank) with rsLoRA) for the default rank
    modules: int  # number of base linear layers it adapts
    use_dora: bool = False  # DoRA (a magnitude vector per module); False where not known
    # expert parameters it adapts (PEFT's target_parameters, short names: "gate_up_proj")
    target_parameters: tuple[str, ...] = ()
    trainable_tokens: int = 0  # embedding rows it brings (trainable_token_indices)


@dataclass(frozen=True)
class ModuleWeights:
    """One adapted linear layer, ready to copy into a slot."""

    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank], column-major (its .t() is contiguous)
    scaling: float
    # [rank] float32 scaling per rank row, when they differ (composed adapters); else None
    row_scaling: torch.Tensor | None = None
    # [out_features] float32 DoRA magnitude as saved (use_dora adapters); else None
    magnitude: torch.Tensor | None = None
    # [out_features] float32 DoRA's g = magnitude / ||W + scaling B A|| per output channel,
    # computed once from the base weight when the adapter is loaded (lora/dora.py)
    dora_scale: torch.Tensor | None = None


@dataclass(frozen=True)
class ExpertWeights:
    """LoRA on one fused experts parameter (PEFT's `ParamWrapper`), per expert, ready to copy
    into a slot: expert e's delta to the parameter is `scaling * lora_b[e] @ lora_a[e]`."""

    lora_a: torch.Tensor  # [experts, rank, in_features]
    lora_b: torch.Tensor  # [experts, out_features, rank]
    scaling: float

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.lora_a, self.lora_b))


@dataclass(frozen=True)
class TokenRows:
    """One adapter's trainable tokens, sorted by token id (lookups use searchsorted)."""

    ids: torch.Tensor  # [n] int64, sorted, distinct, each in [0, vocab)
    rows: torch.Tensor  # [n, hidden] in the embedding's dtype: the replacement rows

    @property
    def nbytes(self) -> int:
        return self.ids.numel() * self.ids.element_size() + (
            self.rows.numel() * self.rows.element_size()
        )

    @staticmethod
    def sorted(ids: list[int], rows: torch.Tensor) -> TokenRows:
        """From PEFT's order (`trainable_token_indices`, the delta's rows) to sorted ids."""
        order = sorted(range(len(ids)), key=ids.__getitem__)
        return TokenRows(
            ids=torch.tensor([ids[i] for i in order], dtype=torch.long),
            rows=rows[torch.tensor(order, dtype=torch.long)].contiguous(),
        )


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter held in CPU memory (the middle tier of the adapter store)."""

    spec: AdapterSpec
    modules: Mapping[str, ModuleWeights]  # full module name in the base model -> weights
    # full parameter name in the base model ("...mlp.experts.down_proj") -> expert LoRA
    experts: Mapping[str, ExpertWeights] = dataclass_field(default_factory=dict)
    tokens: TokenRows | None = None  # its trainable tokens' embedding rows, if any

    @property
    def uses_dora(self) -> bool:
        return any(w.magnitude is not None for w in self.modules.values())

    @property
    def nbytes(self) -> int:
        tensors = [
            t
            for w in self.modules.values()
            for t in (w.lora_a, w.lora_b, w.magnitude, w.dora_scale)
            if t is not None
        ]
        experts = sum(w.nbytes for w in self.experts.values())
        tokens = 0 if self.tokens is None else self.tokens.nbytes
        return sum(t.numel() * t.element_size() for t in tensors) + experts + tokens


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InvalidArgument(CONFIG_FILE, "missing: not a PEFT adapter folder")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidArgument(CONFIG_FILE, "larger than 1 MiB")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(CONFIG_FILE, f"not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise InvalidArgument(CONFIG_FILE, "must be a JSON object")
    return config


# Every field of PEFT's LoraConfig (0.22, the locked version; 0.21's are a subset), by what
# the server does with it. Each one that changes what an adapter computes is applied as PEFT
# applies it or refused (see _check_config); the rest describe how it was made or trained.
# tests/test_dependencies.py fails when the installed PEFT has a field that is in none of the
# three, so a new PEFT field is a decision, never a silent pass-through.
_METADATA_FIELDS = frozenset(
    {
        "auto_mapping",
        "base_model_name_or_path",
        "revision",
        "peft_version",
        "inference_mode",
        "lora_dropout",  # training only
        "megatron_core",  # a module name, read only with megatron_config (refused)
        "runtime_config",  # PEFT drops it when reading a file
        "qalora_group_size",  # read only with use_qalora (refused)
        "ensure_weight_tying",  # ties embedding/head adapters (refused: not linear layers)
        # Read only by their init_lora_weights method (refused where that changes the base):
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "astra_config",
    }
)
_APPLIED_FIELDS = frozenset(
    {
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "target_modules",
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "fan_in_fan_out",  # PEFT sets it to False on torch.nn.Linear and bnb 4-bit layers
        "init_lora_weights",
        "bias",
        "use_dora",  # served: a magnitude vector per module (lora/dora.py)
        "target_parameters",  # served on fused MoE experts only (lora/experts.py)
        "trainable_token_indices",  # served: embedding rows per adapter (lora/tokens.py)
    }
)
# Set to anything but their default, these change what the adapter computes in ways the
# server does not reproduce: refused, with what each one is.
_UNSUPPORTED_FIELDS = {
    "lora_bias": "LoRA with a bias on lora_B is not supported (train with lora_bias=False)",
    "modules_to_save": "adapters that replace whole modules (modules_to_save) are not "
    "supported (a whole embed_tokens or lm_head is a copy of the model's largest matrix per "
    "adapter); only LoRA matrices are. To train new or special tokens' embeddings, use "
    "trainable_token_indices (served: only those rows are saved)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported: "
    "PEFT applies it only after the invocation tokens",
    "layer_replication": "layer_replication duplicates base layers; not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA (kasa_config) changes the base weights; not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "megatron_config": "Megatron-sharded adapters are not supported",
}
_CONVERT = (
    "convert it to plain LoRA as PEFT documents: save it with "
    "save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved before "
    "training>), which writes init_lora_weights=true"
)
# init_lora_weights values that only choose the starting A/B: the saved weights are plain LoRA.
_PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
_DEFAULT_RANK = 8  # LoraConfig.r
_DEFAULT_ALPHA = 8  # LoraConfig.lora_alpha: not r (alpha = r would halve a rank-4 delta)


# PEFT tests these with `is not None`: even an empty object switches them on.
_ON_UNLESS_NULL = frozenset({"arrow_config", "kasa_config", "monteclora_config", "velora_config"})


def unclassified_config_fields(config_class: type) -> list[str]:
    """The fields of a PEFT config dataclass (LoraConfig) that the server neither applies,
    keeps as metadata, nor refuses: each one is a decision still to be made."""
    import dataclasses

    known = _METADATA_FIELDS | _APPLIED_FIELDS | _UNSUPPORTED_FIELDS.keys()
    return sorted(f.name for f in dataclasses.fields(config_class) if f.name not in known)


def _inert(value: Any, name: str = "") -> bool:
    """Unset, as a newer or older PEFT writes an option it does not use."""
    if name in _ON_UNLESS_NULL:
        return value is None
    return value is None or value is False or value in ("", [], {})


@dataclass(frozen=True)
class LoraSettings:
    """The fields of an adapter_config.json that decide what it computes, checked."""

    rank: int
    alpha: float
    use_rslora: bool
    targeting: dict[str, Any]  # the fields that choose modules and their ranks: see adapter_targets
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_dora: bool
    target_parameters: tuple[str, ...] = ()  # PEFT's parameter name suffixes
    # trainable_token_indices as written: a list of token ids, or {layer name: ids}
    token_indices: Any = None


def _check_config(config: dict[str, Any]) -> LoraSettings:
    if "peft_type" not in config:
        raise InvalidArgument("peft_type", "missing (PEFT reads no adapter_config.json without it)")
    peft_type = config["peft_type"]
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise InvalidArgument("peft_type", f"only LORA adapters are served, got {peft_type!r}")
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise InvalidArgument(
            "task_type", f"{task_type!r}: only CAUSAL_LM (text generation) adapters are served"
        )
    for name, value in config.items():
        if name in _UNSUPPORTED_FIELDS:
            if not _inert(value, name):
                raise InvalidArgument(name, _UNSUPPORTED_FIELDS[name])
        elif name not in _METADATA_FIELDS and name not in _APPLIED_FIELDS and not _inert(value):
            raise InvalidArgument(
                name,
                "not a LoraConfig field of PEFT 0.22, and set: what it would change is not "
                "guessed at (remove it if your PEFT version leaves it unused)",
            )
    _check_init(config.get("init_lora_weights", True))
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise InvalidArgument("bias", f"{bias!r}: adapters with bias terms are not supported")
    if not isinstance(config.get("fan_in_fan_out", False), bool):
        raise InvalidArgument("fan_in_fan_out", "must be true or false")

    rank = config.get("r", _DEFAULT_RANK)
    if not _positive_int(rank):
        raise InvalidArgument("r", f"must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha", _DEFAULT_ALPHA)
    if not _positive_number(alpha):
        raise InvalidArgument("lora_alpha", f"must be a positive number, got {alpha!r}")
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise InvalidArgument("use_rslora", f"must be true or false, got {use_rslora!r}")
    use_dora = config.get("use_dora", False)
    if not isinstance(use_dora, bool):
        raise InvalidArgument("use_dora", f"must be true or false, got {use_dora!r}")
    patterns: dict[str, dict[str, Any]] = {}
    for name, valid, kind in (
        ("rank_pattern", _positive_int, "integer"),
        ("alpha_pattern", _positive_number, "number"),
    ):
        value = config.get(name) or {}
        if not isinstance(value, dict):
            raise InvalidArgument(name, "must be an object (module name pattern -> value)")
        for key, item in value.items():
            if not valid(item):
                raise InvalidArgument(name, f"{key!r}: must be a positive {kind}, got {item!r}")
        patterns[name] = value
    target_parameters = _check_target_parameters(config, use_dora, patterns)
    return LoraSettings(
        rank=int(rank),
        alpha=float(alpha),
        use_rslora=use_rslora,
        targeting=_check_targeting(config),
        rank_pattern=patterns["rank_pattern"],
        alpha_pattern=patterns["alpha_pattern"],
        use_dora=use_dora,
        target_parameters=target_parameters,
        token_indices=config.get("trainable_token_indices"),
    )


def _check_target_parameters(
    config: dict[str, Any], use_dora: bool, patterns: dict[str, dict[str, Any]]
) -> tuple[str, ...]:
    """PEFT's `target_parameters`: names (suffixes) of bare parameters to put LoRA on. Served
    on fused MoE experts only (matched against the base model in `_expert_parts`)."""
    value = config.get("target_parameters")
    if value is None or value == []:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidArgument("target_parameters", "must be a list of parameter names")
    if use_dora:
        raise InvalidArgument("target_parameters", "PEFT has no DoRA on bare parameters")
    for name, pattern in patterns.items():
        if pattern:
            raise InvalidArgument(
                name, "not supported with target_parameters (one rank and alpha for all)"
            )
    return tuple(sorted(set(value)))


def _check_init(init: Any) -> None:
    if any(init is plain or (isinstance(plain, str) and init == plain) for plain in _PLAIN_INITS):
        return
    text = str(init).lower()
    if isinstance(init, str) and text.startswith(("pissa", "olora", "corda", "lora_ga", "astra")):
        raise InvalidArgument(
            "init_lora_weights",
            f"{init!r}: this adapter is only right on the base model its initialisation "
            f"changed; {_CONVERT}",
        )
    if init == "loftq":
        raise InvalidArgument(
            "init_lora_weights",
            "'loftq': this adapter is only right on LoftQ's replacement base weights; make it "
            "on the 4-bit base with plain LoRA and peft's replace_lora_weights_loftq instead",
        )
    raise InvalidArgument("init_lora_weights", f"{init!r} is not supported")


def _str_or_names(field: str, value: Any) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(field, "must be a string (a regular expression) or a list of strings")


def _check_targeting(config: dict[str, Any]) -> dict[str, Any]:
    """The fields PEFT matches module names with, type-checked as LoraConfig does."""
    target = config.get("target_modules")
    if target is None:
        raise InvalidArgument(
            "target_modules",
            "missing: list the modules the adapter wraps (PEFT would guess from the model type)",
        )
    _str_or_names("target_modules", target)
    exclude = config.get("exclude_modules")
    if exclude is not None:
        _str_or_names("exclude_modules", exclude)
    layers = config.get("layers_to_transform")
    if layers is not None:
        items = layers if isinstance(layers, list) else [layers]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise InvalidArgument("layers_to_transform", "must be an integer or a list of integers")
        if isinstance(target, str):
            raise InvalidArgument(
                "layers_to_transform",
                "cannot be used when target_modules is a string (PEFT refuses)",
            )
    pattern = config.get("layers_pattern")
    if pattern is not None:
        _str_or_names("layers_pattern", pattern)
        if isinstance(target, str):
            raise InvalidArgument(
                "layers_pattern", "cannot be used when target_modules is a string (PEFT refuses)"
            )
        if pattern and layers is None:
            raise InvalidArgument(
                "layers_pattern", "needs layers_to_transform as well (PEFT refuses)"
            )
    return {
        "target_modules": target,
        "exclude_modules": exclude,
        "layers_to_transform": layers,
        "layers_pattern": pattern,
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
    }


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value: Any) -> bool:
    """JSON numbers only (Python's json also reads NaN and Infinity): finite and above 0."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and bounds-check a safetensors header before safetensors maps the file.

    Every entry is checked for the exact types safetensors writes (a dtype string, a list of
    non-negative integers, two integer offsets), so no crafted value (1e400, a string, a
    list as dtype, a bool) reaches arithmetic that would fail with anything but this error.
    """
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidArgument(WEIGHTS_FILE, "truncated: no safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise InvalidArgument(WEIGHTS_FILE, "corrupt: header length exceeds the file")
        if header_len > MAX_HEADER_BYTES:
            raise InvalidArgument(
                WEIGHTS_FILE,
                f"header of {header_len} bytes is over the {MAX_HEADER_BYTES >> 20} MiB limit "
                "(a LoRA adapter's is a few hundred KiB at most)",
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, digits
        raise InvalidArgument(WEIGHTS_FILE, "corrupt: header is not JSON") from exc
    if not isinstance(header, dict):
        raise InvalidArgument(WEIGHTS_FILE, "corrupt: header is not an object")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise InvalidArgument(
                    WEIGHTS_FILE, "corrupt: __metadata__ must map strings to strings"
                )
            continue
        _check_entry(name[:200], info, data_len)
    return header


def _check_entry(shown: str, info: Any, data_len: int) -> None:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise InvalidArgument(
            WEIGHTS_FILE, f"corrupt: header entry {shown} must hold dtype, shape, data_offsets"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise InvalidArgument(WEIGHTS_FILE, f"corrupt: {shown}: dtype is not a string")
    width = _SAFETENSORS_DTYPE_BYTES.get(dtype)
    if width is None:
        raise InvalidArgument(WEIGHTS_FILE, f"{shown}: unsupported dtype {dtype[:40]}")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_DIMS
        or not all(_natural(d) and d < 1 << 63 for d in shape)
    ):
        raise InvalidArgument(
            WEIGHTS_FILE,
            f"corrupt: {shown}: shape must be a list of at most {_MAX_DIMS} integers in [0, 2^63)",
        )
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_natural, offsets)):
        raise InvalidArgument(
            WEIGHTS_FILE, f"corrupt: {shown}: data_offsets must be two non-negative integers"
        )
    start, end = offsets
    count = math.prod(shape)
    if not (start <= end <= data_len) or end - start != count * width:
        raise InvalidArgument(
            WEIGHTS_FILE,
            f"{shown}: header claims {count * width} bytes at [{start}, {end}) but the file "
            f"holds {data_len} data bytes (truncated or corrupt)",
        )


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _module_name(key: str) -> tuple[str, str]:
    match = _KEY.match(key) or _MAGNITUDE_KEY.match(key)
    if match is None:
        if "lora_embedding" in key:
            raise FailedPrecondition("target_modules", "LoRA on embeddings is not supported")
        if "lora_magnitude_vector" in key:
            raise InvalidArgument(
                WEIGHTS_FILE,
                f"{key[:200]!r}: a DoRA magnitude is saved as <module>.lora_magnitude_vector "
                "(PEFT loads no other name)",
            )
        raise InvalidArgument(WEIGHTS_FILE, f"unexpected tensor {key!r} (not a LoRA A/B weight)")
    if not key.startswith(PEFT_PREFIX):
        raise InvalidArgument(
            WEIGHTS_FILE,
            f"{key[:200]!r}: tensor names start with {PEFT_PREFIX!r} as PEFT saves them; "
            "PEFT would not load this one",
        )
    if "part" not in match.groupdict():
        return match["module"].removeprefix(PEFT_PREFIX), MAGNITUDE
    if match["adapter"] not in (None, _PEFT_ADAPTER_NAME):
        raise InvalidArgument(
            WEIGHTS_FILE,
            f"{key[:200]!r}: adapter name {match['adapter'][:40]!r} in the tensor name; PEFT "
            "loads only keys without one (or with 'default'): save with save_pretrained",
        )
    return match["module"].removeprefix(PEFT_PREFIX), match["part"]


def _read_experts(
    tensors: Mapping[str, torch.Tensor],
    parts: Mapping[str, ExpertParts],
    base_experts: Mapping[str, ExpertShape],
    scaling: float,
    dtype: torch.dtype,
) -> dict[str, ExpertWeights]:
    """Checked expert A/B pairs split per expert as PEFT's `ParamWrapper.get_delta_factors`
    does: A's rows are expert-major ([E * r, in] -> [E, r, in]), B's columns rank-major
    ([out, r * E] -> [out, r, E] -> [E, out, r])."""
    experts: dict[str, ExpertWeights] = {}
    for name, part in parts.items():
        shape = base_experts[name]
        a, b = tensors[part.a_key], tensors[part.b_key]
        _check_values(a, part.a_key)
        _check_values(b, part.b_key)
        a = a.reshape(shape.num_experts, part.rank, shape.in_features)
        b = b.reshape(shape.out_features, part.rank, shape.num_experts).permute(2, 0, 1)
        experts[name] = ExpertWeights(
            lora_a=a.to(dtype).contiguous(), lora_b=b.to(dtype).contiguous(), scaling=scaling
        )
    return experts


def _read_weights(
    tensors: Mapping[str, torch.Tensor],
    shapes: Mapping[str, Mapping[str, tuple[list[int], str]]],
    scalings: Mapping[str, float],
    dtype: torch.dtype,
) -> dict[str, ModuleWeights]:
    """Read checked A/B pairs from the file's tensors."""
    modules: dict[str, ModuleWeights] = {}
    for module, parts in shapes.items():
        a, b = tensors[parts["A"][1]], tensors[parts["B"][1]]
        checked = [(a, parts["A"][1]), (b, parts["B"][1])]
        magnitude = tensors[parts[MAGNITUDE][1]] if MAGNITUDE in parts else None
        if magnitude is not None:
            checked.append((magnitude, parts[MAGNITUDE][1]))
        for tensor, key in checked:
            _check_values(tensor, key)
        modules[module] = ModuleWeights(
            lora_a=a.to(dtype).contiguous(),
            # Laid out so that lora_b.t() ([rank, out], as the slots hold B) is contiguous:
            # the loader thread pays for the transpose, not the engine thread's slot copy.
            lora_b=b.to(dtype).t().contiguous().t(),
            scaling=scalings[module],
            # float32 as PEFT holds it (its DoRA layer's parameter), whatever the file's dtype
            magnitude=None if magnitude is None else magnitude.float().contiguous(),
        )
    return modules


def _read_tokens(
    tensors: Mapping[str, torch.Tensor], tokens: tuple[list[int], str] | None
) -> TokenRows | None:
    """Trainable tokens' checked rows (`tokens`: their ids and tensor key, from
    _check_tokens), or None."""
    if tokens is None:
        return None
    ids, key = tokens
    _check_values(tensors[key], key)
    # kept in float32 here; the token table casts to the embedding's dtype on the device,
    # as PEFT's index_copy casts the delta to the weight's
    return TokenRows.sorted(ids, tensors[key].float())


def _check_values(tensor: torch.Tensor, key: str) -> None:
    """Finite and within MAX_ABS_VALUE. min and max in one pass (NaN propagates into both):
    far cheaper than isfinite().all() or a float64 sum on bf16, and it bounds the values."""
    if tensor.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(tensor))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InvalidArgument(WEIGHTS_FILE, f"{key} holds NaN or Inf values")
    if max(-low, high) > MAX_ABS_VALUE:
        raise InvalidArgument(
            WEIGHTS_FILE,
            f"{key} holds values up to {max(-low, high):g}, beyond {MAX_ABS_VALUE:g}",
        )


def inspect_adapter(
    folder: Path,
    base_linears: Mapping[str, LinearShape],
    max_rank: int,
    *,
    module_names: Sequence[str] | None = None,
    load: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    base_experts: Mapping[str, ExpertShape] | None = None,
    embedding: EmbeddingShape | None = None,
) -> AdapterWeights:
    """Check a PEFT adapter folder against the base model and (optionally) read its weights.

    `module_names`: every module of the base model (`named_modules()` before wrapping), for
    matching target_modules as PEFT does; without it, the linear layers and their parents.
    `base_experts`: the base model's fused experts parameters (`lora.experts`), in each
    module's declaration order, which `target_parameters` may name.
    `embedding`: the base model's input embedding and the server's row cap, for adapters
    with trainable tokens (without it, they are refused).
    Raises InvalidArgument for malformed or unsupported files and FailedPrecondition for
    adapters that are well-formed but do not fit this base model or the server's limits.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidArgument("path", f"{folder} is not a folder")
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickles = [name for name in PICKLE_FILES if (folder / name).exists()]
        if pickles:
            raise InvalidArgument(
                WEIGHTS_FILE,
                f"only {pickles[0]} (a pickle) was given; pickles are never loaded, "
                "save the adapter with safe_serialization=True",
            )
        raise InvalidArgument(WEIGHTS_FILE, "missing")
    config = read_config(folder)
    settings = _check_config(config)
    header = _read_header(weights_path)
    tokens = _check_tokens(settings.token_indices, header, embedding)
    shapes = _weight_shapes(header)
    expert_parts = _expert_parts(settings, shapes, base_experts or {}, max_rank)
    ranks = _check_shapes(shapes, base_linears, max_rank, settings.use_dora)
    wrapped: dict[str, tuple[int | None, int | None]] = {}
    if shapes or not expert_parts or settings.targeting["target_modules"]:
        wrapped = _wrapped_modules(settings, shapes, base_linears, module_names)

    scalings: dict[str, float] = {}
    for module, rank in ranks.items():
        rank_key, alpha_key = wrapped[module]
        declared = (
            settings.rank
            if rank_key is None
            else settings.rank_pattern[list(settings.rank_pattern)[rank_key]]
        )
        if declared != rank:
            raise InvalidArgument(
                "r", f"{module}: adapter_config.json says rank {declared}, weights have rank {rank}"
            )
        alpha = (
            settings.alpha
            if alpha_key is None
            else float(settings.alpha_pattern[list(settings.alpha_pattern)[alpha_key]])
        )
        scaling = _scaling(alpha, rank, settings.use_rslora)
        if scaling > MAX_ABS_VALUE:
            raise InvalidArgument(
                "lora_alpha", f"{module}: scaling {scaling:g} is beyond {MAX_ABS_VALUE:g}"
            )
        scalings[module] = scaling

    expert_scaling = _scaling(settings.alpha, settings.rank, settings.use_rslora)
    if expert_parts and expert_scaling > MAX_ABS_VALUE:
        raise InvalidArgument(
            "lora_alpha", f"scaling {expert_scaling:g} is beyond {MAX_ABS_VALUE:g}"
        )
    modules: dict[str, ModuleWeights] = {}
    experts: dict[str, ExpertWeights] = {}
    token_rows = None
    if load:
        try:
            # The whole file through `safetensors.torch.load`, not `safe_open(...)
            # .get_tensor`: the latter leaks a few small objects per tensor (safetensors
            # 0.8), which a server that loads adapters all day turns into memory that
            # never comes back.
            tensors = load_safetensors(weights_path.read_bytes())
        except SafetensorError as exc:  # what safetensors checks beyond _read_header
            raise InvalidArgument(WEIGHTS_FILE, f"corrupt: {exc}") from exc
        modules = _read_weights(tensors, shapes, scalings, dtype)
        experts = _read_experts(tensors, expert_parts, base_experts or {}, expert_scaling, dtype)
        token_rows = _read_tokens(tensors, tokens)

    all_ranks = [*ranks.values(), *(part.rank for part in expert_parts.values())]
    spec = AdapterSpec(
        rank=max(all_ranks),
        alpha=settings.alpha,
        use_rslora=settings.use_rslora,
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in shapes})),
        size_bytes=weights_path.stat().st_size,
        base_model_name_or_path=_text_or_none(config.get("base_model_name_or_path")),
        scaling=_scaling(settings.alpha, settings.rank, settings.use_rslora),
        modules=len(shapes) + len(expert_parts),
        use_dora=settings.use_dora,
        target_parameters=tuple(sorted({n.rsplit(".", 1)[-1] for n in expert_parts})),
        trainable_tokens=0 if tokens is None else len(tokens[0]),
    )
    return AdapterWeights(spec=spec, modules=modules, experts=experts, tokens=token_rows)


def _check_tokens(
    indices: Any, header: Mapping[str, Any], embedding: EmbeddingShape | None
) -> tuple[list[int], str] | None:
    """trainable_token_indices and the rows the weights file holds for them, checked against
    the base model's embedding: (the ids in PEFT's order, the tensor's key), or None.

    A list is PEFT's form for the input embedding; a dict names layers, and only the input
    embedding's entry is served (PEFT ties the output layer to it where the model ties its
    weights; an untied lm_head of its own would be a second table, not served).
    """
    field = "trainable_token_indices"
    saved = [k for k in header if k != "__metadata__" and k.endswith(_TOKENS_SUFFIX)]
    if _inert(indices):
        if saved:
            raise InvalidArgument(
                field, f"the weights file holds {saved[0][:200]} but {CONFIG_FILE} sets no {field}"
            )
        return None
    if embedding is None or embedding.max_rows == 0:
        raise FailedPrecondition(
            field, "trainable tokens are not served here (this server's max_trainable_tokens is 0)"
        )
    if isinstance(indices, dict):
        if len(indices) != 1:
            raise InvalidArgument(
                field,
                f"names {len(indices)} layers: only the input embedding's trainable tokens are "
                "served (the output layer follows it where the model ties them)",
            )
        ((layer, ids),) = indices.items()
        if not isinstance(layer, str) or not (
            embedding.name == layer or embedding.name.endswith("." + layer)
        ):
            raise InvalidArgument(
                field,
                f"{str(layer)[:80]!r} is not the input embedding ({embedding.name}): only its "
                "trainable tokens are served",
            )
    else:
        ids = indices
    if not isinstance(ids, list) or not all(_natural(i) for i in ids):
        raise InvalidArgument(field, "must be a list of token ids (non-negative integers)")
    if len(ids) > embedding.max_rows:
        raise FailedPrecondition(
            field,
            f"{len(ids)} token rows, above this server's max_trainable_tokens "
            f"({embedding.max_rows})",
        )
    outside = [i for i in ids if i >= embedding.vocab]
    if outside:
        raise InvalidArgument(
            field,
            f"token id {outside[0]} is outside the base model's vocabulary of "
            f"{embedding.vocab} (adapter for another base model or a resized embedding?)",
        )
    if len(set(ids)) != len(ids):
        raise InvalidArgument(field, "lists a token id twice")
    key = PEFT_PREFIX + embedding.name + _TOKENS_SUFFIX
    others = [k for k in saved if k != key]
    if others:
        raise InvalidArgument(
            WEIGHTS_FILE,
            f"{others[0][:200]}: only {key} (the input embedding's rows) is served",
        )
    if key not in header:
        raise InvalidArgument(
            WEIGHTS_FILE, f"{key} is missing: {field} is set, and PEFT would start its rows anew"
        )
    info = header[key]
    if info["dtype"] not in _FLOAT_DTYPES:
        raise InvalidArgument(WEIGHTS_FILE, f"{key}: dtype {info['dtype']} is not a float")
    if info["shape"] != [len(ids), embedding.hidden]:
        raise InvalidArgument(
            WEIGHTS_FILE,
            f"{key}: shape {info['shape']}, expected [{len(ids)}, {embedding.hidden}] (one row "
            f"of the embedding's width per id in {field})",
        )
    return list(ids), key


def _scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """LoraLayer.update_layer: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


Shapes = dict[str, dict[str, tuple[list[int], str]]]  # module -> "A"/"B" -> (shape, tensor key)
_NESTED = ".base_layer"  # PEFT nests one ParamWrapper per parameter of a module


@dataclass(frozen=True)
class ExpertParts:
    """Where one expert parameter's LoRA is in the weights file, checked against the base."""

    a_key: str  # [experts * rank, in_features]
    b_key: str  # [out_features, rank * experts]
    rank: int


def _expert_parts(
    settings: LoraSettings,
    shapes: Shapes,
    base_experts: Mapping[str, ExpertShape],
    max_rank: int,
) -> dict[str, ExpertParts]:
    """The expert parameters `target_parameters` names, their A/B keys taken out of `shapes`.

    PEFT matches a target against `<module>.<parameter>` (equal, or a suffix after a dot),
    and wraps a module once per matched parameter in declaration order, each wrapper around
    the last: the last parameter's LoRA is saved as `<module>.lora_A`, the one before as
    `<module>.base_layer.lora_A`, and so on. Only fused MoE experts are served: a target
    that names no expert parameter of the base model is refused, as is any pair whose
    shape, expert count or rank does not fit, naming the tensor.
    """
    targets = settings.target_parameters
    if not targets:
        return {}
    matched: dict[str, list[str]] = {}  # module -> its matched parameter names, in order
    used: set[str] = set()
    for name in base_experts:
        hits = [t for t in targets if name == t or name.endswith(f".{t}")]
        if hits:
            used.update(hits)
            module, _, _ = name.rpartition(".")
            matched.setdefault(module, []).append(name)
    unused = [t for t in targets if t not in used]
    if unused:
        raise InvalidArgument(
            "target_parameters",
            f"{_listed(unused)} names no fused MoE expert parameter of the base model "
            "(LoRA on other bare parameters is not supported)",
        )
    parts: dict[str, ExpertParts] = {}
    for module, names in matched.items():
        for depth, name in enumerate(reversed(names)):
            key_module = module + _NESTED * depth
            found = shapes.pop(key_module, None)
            if found is None or "A" not in found or "B" not in found or len(found) != 2:
                raise InvalidArgument(
                    WEIGHTS_FILE,
                    f"{PEFT_PREFIX}{key_module}.lora_A/lora_B: the pair PEFT saves for {name} "
                    "(target_parameters) is missing or incomplete",
                )
            parts[name] = _expert_pair(name, found, base_experts[name], settings, max_rank)
    return parts


def _expert_pair(
    name: str,
    found: Mapping[str, tuple[list[int], str]],
    base: ExpertShape,
    settings: LoraSettings,
    max_rank: int,
) -> ExpertParts:
    (a_shape, a_key), (b_shape, b_key) = found["A"], found["B"]
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise InvalidArgument(WEIGHTS_FILE, f"{a_key} {a_shape} / {b_key} {b_shape}: not a pair")
    rows, experts = a_shape[0], base.num_experts
    if rows % experts:
        raise FailedPrecondition(
            WEIGHTS_FILE,
            f"{a_key}: {rows} rows are not a rank per expert for the base model's {experts} "
            f"experts of {name} (adapter for another base model?)",
        )
    rank = rows // experts
    if a_shape[1] != base.in_features or b_shape[0] != base.out_features:
        raise FailedPrecondition(
            WEIGHTS_FILE,
            f"{a_key}: the adapter maps {a_shape[1]}->{b_shape[0]} but {name} maps "
            f"{base.in_features}->{base.out_features} (adapter for another base model?)",
        )
    if rank != settings.rank:
        raise InvalidArgument(
            "r",
            f"{a_key}: adapter_config.json says rank {settings.rank}, the weights have rank "
            f"{rank} for {experts} experts",
        )
    if rank > max_rank:
        raise FailedPrecondition("r", f"rank {rank} exceeds this server's max_rank {max_rank}")
    return ExpertParts(a_key=a_key, b_key=b_key, rank=rank)


def _weight_shapes(header: Mapping[str, Any]) -> Shapes:
    shapes: Shapes = {}
    for key, info in header.items():
        if key == "__metadata__" or key.endswith(_TOKENS_SUFFIX):  # see _check_tokens
            continue
        module, part = _module_name(key)
        if info["dtype"] not in _FLOAT_DTYPES:
            raise InvalidArgument(WEIGHTS_FILE, f"{key}: dtype {info['dtype']} is not a float")
        if part in shapes.setdefault(module, {}):
            raise InvalidArgument(WEIGHTS_FILE, f"{module}: two lora_{part} tensors")
        shapes[module][part] = (list(info["shape"]), key)
    if not shapes:
        raise InvalidArgument(WEIGHTS_FILE, "holds no LoRA weights")
    return shapes


def _check_shapes(
    shapes: Shapes, base_linears: Mapping[str, LinearShape], max_rank: int, use_dora: bool
) -> dict[str, int]:
    """Each module's A/B pair (and DoRA magnitude) against the base layer; returns each
    module's rank."""
    ranks: dict[str, int] = {}
    for module, parts in shapes.items():
        if "A" not in parts or "B" not in parts:
            raise InvalidArgument(WEIGHTS_FILE, f"{module}: lora_A and lora_B must come in pairs")
        _check_magnitude(module, parts, base_linears.get(module), use_dora)
        short = module.rsplit(".", 1)[-1]
        if module not in base_linears:
            if short in ("lm_head", "embed_tokens", "wte", "embed_out"):
                raise FailedPrecondition(
                    "target_modules", f"LoRA on {short} is not supported (linear layers only)"
                )
            raise FailedPrecondition(
                "target_modules",
                f"{module} is not a linear layer of the base model "
                "(adapter made for another architecture?)",
            )
        (a_shape, _), (b_shape, _) = parts["A"], parts["B"]
        base = base_linears[module]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise InvalidArgument(WEIGHTS_FILE, f"{module}: lora_A {a_shape} / lora_B {b_shape}")
        rank = a_shape[0]
        if a_shape[1] != base.in_features or b_shape[0] != base.out_features:
            raise FailedPrecondition(
                "adapter_model.safetensors",
                f"{module}: adapter maps {a_shape[1]}->{b_shape[0]} but the base layer maps "
                f"{base.in_features}->{base.out_features} (adapter for another base model?)",
            )
        if rank < 1:
            raise InvalidArgument("r", f"{module}: rank 0")
        if rank > max_rank:
            raise FailedPrecondition("r", f"rank {rank} exceeds this server's max_rank {max_rank}")
        ranks[module] = rank
    return ranks


def _check_magnitude(
    module: str,
    parts: Mapping[str, tuple[list[int], str]],
    base: LinearShape | None,
    use_dora: bool,
) -> None:
    """A DoRA adapter holds one magnitude per output channel of every module; a plain one none
    (PEFT would leave a missing magnitude at its initial column norms, and ignore one that
    use_dora does not ask for)."""
    if MAGNITUDE not in parts:
        if use_dora:
            raise InvalidArgument(
                WEIGHTS_FILE,
                f"{module}.lora_magnitude_vector is missing: use_dora is true in "
                f"{CONFIG_FILE}, and PEFT would start that module's magnitude from scratch",
            )
        return
    shape, key = parts[MAGNITUDE]
    if not use_dora:
        raise InvalidArgument(
            "use_dora",
            f"the weights file holds {key[:200]} but use_dora is not true in {CONFIG_FILE}",
        )
    if base is not None and shape != [base.out_features]:
        raise InvalidArgument(
            WEIGHTS_FILE,
            f"{key[:200]}: shape {shape}, the base layer has {base.out_features} output "
            f"channels (a magnitude is [{base.out_features}])",
        )


def _all_module_names(base_linears: Mapping[str, LinearShape]) -> list[str]:
    names = {""}
    for name in base_linears:
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(names)


def _listed(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _wrapped_modules(
    settings: LoraSettings,
    shapes: Shapes,
    base_linears: Mapping[str, LinearShape],
    module_names: Sequence[str] | None,
) -> dict[str, tuple[int | None, int | None]]:
    """The modules PEFT would wrap (-> their rank/alpha pattern key), which must be exactly
    the modules the weights file holds: PEFT ignores weights of modules it does not wrap,
    and wraps modules without weights with freshly initialised (maybe random) A and B."""
    names = list(module_names) if module_names is not None else _all_module_names(base_linears)
    try:
        plan = plan_targets(settings.targeting, names, list(base_linears))
    except TargetError as exc:
        raise InvalidArgument(exc.field, str(exc)) from exc
    except Busy as exc:
        raise ResourceExhausted(
            CONFIG_FILE, "too many adapter configs with patterns are being checked; retry"
        ) from exc
    wrapped: dict[str, tuple[int | None, int | None]] = {
        name: (keys[0], keys[1]) for name, keys in plan["wrapped"].items()
    }
    if not wrapped:
        raise InvalidArgument(
            "target_modules",
            f"{settings.targeting['target_modules']!r} matches no module of the base model "
            "(after exclude_modules and layers_to_transform); PEFT refuses such a config",
        )
    for name in wrapped:
        if name not in base_linears:
            short = name.rsplit(".", 1)[-1]
            if short in ("lm_head", "embed_tokens", "wte", "embed_out"):
                raise FailedPrecondition(
                    "target_modules",
                    f"matches {name}: LoRA on {short} is not supported (linear layers only)",
                )
            raise InvalidArgument(
                "target_modules",
                f"matches {name}, which is not a linear layer (PEFT refuses to wrap it)",
            )
    extra = [m for m in shapes if m not in wrapped]
    for field, names_of_field in (
        ("exclude_modules", set(plan["excluded"])),
        ("layers_to_transform", set(plan["other_layers"])),
    ):
        refused = [m for m in extra if m in names_of_field]
        if refused:
            raise InvalidArgument(
                field,
                f"the weights file holds {_listed(refused)}, which {field} leaves out: PEFT "
                "would not load them",
            )
    if extra:
        raise InvalidArgument(
            "target_modules",
            f"the weights file holds {_listed(extra)}, which target_modules does not match: "
            "PEFT would not load them",
        )
    missing = [m for m in wrapped if m not in shapes]
    if missing:
        raise InvalidArgument(
            WEIGHTS_FILE,
            f"holds no weights for {_listed(missing)}, which target_modules wraps (PEFT would "
            "give them freshly initialised A and B)",
        )
    return wrapped
