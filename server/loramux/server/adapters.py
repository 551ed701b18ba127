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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loramux.core.errors import FailedPrecondition, InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 64 << 20
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
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LinearShape:
    in_features: int
    out_features: int


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


@dataclass(frozen=True)
class ModuleWeights:
    """One adapted linear layer, ready to copy into a slot."""

    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank], column-major (its .t() is contiguous)
    scaling: float
    # [rank] float32 scaling per rank row, when they differ (composed adapters); else None
    row_scaling: torch.Tensor | None = None


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter held in CPU memory (the middle tier of the adapter store)."""

    spec: AdapterSpec
    modules: Mapping[str, ModuleWeights]  # full module name in the base model -> weights

    @property
    def nbytes(self) -> int:
        return sum(
            w.lora_a.numel() * w.lora_a.element_size() + w.lora_b.numel() * w.lora_b.element_size()
            for w in self.modules.values()
        )


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


def _check_config(config: dict[str, Any]) -> None:
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise InvalidArgument("peft_type", f"only LORA adapters are served, got {peft_type!r}")
    if config.get("use_dora"):
        raise InvalidArgument("use_dora", "DoRA adapters are not supported")
    if config.get("modules_to_save"):
        raise InvalidArgument(
            "modules_to_save",
            f"adapters that replace whole modules ({config['modules_to_save']}) are not supported; "
            "only LoRA matrices are",
        )
    if config.get("trainable_token_indices"):
        raise InvalidArgument("trainable_token_indices", "trainable tokens are not supported")
    bias = config.get("bias", "none")
    if bias not in (None, "none") or config.get("lora_bias"):
        raise InvalidArgument("bias", "adapters with bias terms are not supported")
    if config.get("fan_in_fan_out"):
        raise InvalidArgument("fan_in_fan_out", "Conv1D-style (fan_in_fan_out) weights unsupported")
    if config.get("megatron_config"):
        raise InvalidArgument("megatron_config", "Megatron-sharded adapters are not supported")
    for name in ("r", "lora_alpha"):
        value = config.get(name)
        if value is not None and not _positive_number(value):
            raise InvalidArgument(name, f"must be a positive number, got {value!r}")
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise InvalidArgument(name, "must be an object")
        for key, value in patterns.items():
            if not _positive_number(value):
                raise InvalidArgument(name, f"{key!r}: must be a positive number, got {value!r}")
            try:
                re.compile(key)
            except re.error as exc:
                raise InvalidArgument(name, f"{key!r} is not a regular expression ({exc})") from exc


def _positive_number(value: Any) -> bool:
    """JSON numbers only (Python's json also reads NaN and Infinity): finite and above 0."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _read_header(path: Path) -> dict[str, Any]:
    """Parse and bounds-check a safetensors header before safetensors maps the file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidArgument(WEIGHTS_FILE, "truncated: no safetensors header")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise InvalidArgument(WEIGHTS_FILE, "corrupt: header length exceeds the file")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidArgument(WEIGHTS_FILE, "corrupt: header is not JSON") from exc
    if not isinstance(header, dict):
        raise InvalidArgument(WEIGHTS_FILE, "corrupt: header is not an object")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(WEIGHTS_FILE, f"corrupt: bad header entry for {name}") from exc
        width = _SAFETENSORS_DTYPE_BYTES.get(dtype)
        if width is None:
            raise InvalidArgument(WEIGHTS_FILE, f"{name}: unsupported dtype {dtype}")
        if not (0 <= start <= end <= data_len) or end - start != count * width:
            raise InvalidArgument(
                WEIGHTS_FILE,
                f"{name}: header claims {count * width} bytes at [{start}, {end}) but the file "
                f"holds {data_len} data bytes (truncated or corrupt)",
            )
    return header


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_name(key: str) -> tuple[str, str]:
    match = _KEY.match(key)
    if match is None:
        if "lora_embedding" in key:
            raise FailedPrecondition("target_modules", "LoRA on embeddings is not supported")
        if "lora_magnitude_vector" in key:
            raise InvalidArgument("use_dora", "DoRA magnitude vectors are not supported")
        raise InvalidArgument(WEIGHTS_FILE, f"unexpected tensor {key!r} (not a LoRA A/B weight)")
    module = match["module"]
    module = module.removeprefix(PEFT_PREFIX)
    return module, match["part"]


def _read_weights(
    path: Path,
    shapes: Mapping[str, Mapping[str, tuple[list[int], str]]],
    scaling_for: Callable[[str, int], float],
    dtype: torch.dtype,
) -> dict[str, ModuleWeights]:
    """Read checked A/B pairs; safetensors itself may still refuse the file (SafetensorError).

    The whole file through `safetensors.torch.load`, not `safe_open(...).get_tensor`: the
    latter leaks a few small objects per tensor (safetensors 0.8), which a server that
    loads adapters all day turns into memory that never comes back.
    """
    tensors = load_safetensors(path.read_bytes())
    modules: dict[str, ModuleWeights] = {}
    for module, parts in shapes.items():
        a, b = tensors[parts["A"][1]], tensors[parts["B"][1]]
        for tensor, key in ((a, parts["A"][1]), (b, parts["B"][1])):
            # min and max in one pass (NaN propagates into both): far cheaper than
            # isfinite().all() or a float64 sum on bf16, and it bounds the values too.
            low, high = (float(v) for v in torch.aminmax(tensor))
            if not (math.isfinite(low) and math.isfinite(high)):
                raise InvalidArgument(WEIGHTS_FILE, f"{key} holds NaN or Inf values")
            if max(-low, high) > MAX_ABS_VALUE:
                raise InvalidArgument(
                    WEIGHTS_FILE,
                    f"{key} holds values up to {max(-low, high):g}, beyond {MAX_ABS_VALUE:g}",
                )
        modules[module] = ModuleWeights(
            lora_a=a.to(dtype).contiguous(),
            # Laid out so that lora_b.t() ([rank, out], as the slots hold B) is contiguous:
            # the loader thread pays for the transpose, not the engine thread's slot copy.
            lora_b=b.to(dtype).t().contiguous().t(),
            scaling=scaling_for(module, a.shape[0]),
        )
    return modules


def inspect_adapter(
    folder: Path,
    base_linears: Mapping[str, LinearShape],
    max_rank: int,
    *,
    load: bool = True,
    dtype: torch.dtype = torch.bfloat16,
) -> AdapterWeights:
    """Check a PEFT adapter folder against the base model and (optionally) read its weights.

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
    _check_config(config)
    header = _read_header(weights_path)

    default_rank = int(config.get("r") or 8)
    default_alpha = float(config.get("lora_alpha") or default_rank)
    use_rslora = bool(config.get("use_rslora"))
    rank_pattern: dict[str, Any] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, Any] = config.get("alpha_pattern") or {}

    def scaling_for(module: str, rank: int) -> float:
        alpha = float(_pattern_value(alpha_pattern, module, default_alpha))
        return alpha / math.sqrt(rank) if use_rslora else alpha / rank

    shapes: dict[str, dict[str, tuple[list[int], str]]] = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        module, part = _module_name(key)
        if info["dtype"] not in _FLOAT_DTYPES:
            raise InvalidArgument(WEIGHTS_FILE, f"{key}: dtype {info['dtype']} is not a float")
        if part in shapes.setdefault(module, {}):
            raise InvalidArgument(WEIGHTS_FILE, f"{module}: two lora_{part} tensors")
        shapes[module][part] = (list(info["shape"]), key)
    if not shapes:
        raise InvalidArgument(WEIGHTS_FILE, "holds no LoRA weights")

    max_seen = 0
    for module, parts in shapes.items():
        if "A" not in parts or "B" not in parts:
            raise InvalidArgument(WEIGHTS_FILE, f"{module}: lora_A and lora_B must come in pairs")
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
        declared = int(_pattern_value(rank_pattern, module, default_rank))
        if declared != rank:
            raise InvalidArgument(
                "r", f"{module}: adapter_config.json says rank {declared}, weights have rank {rank}"
            )
        scaling = scaling_for(module, rank)
        if scaling > MAX_ABS_VALUE:
            raise InvalidArgument(
                "lora_alpha", f"{module}: scaling {scaling:g} is beyond {MAX_ABS_VALUE:g}"
            )
        max_seen = max(max_seen, rank)

    modules: dict[str, ModuleWeights] = {}
    if load:
        try:
            modules = _read_weights(weights_path, shapes, scaling_for, dtype)
        except SafetensorError as exc:  # what safetensors checks beyond _read_header
            raise InvalidArgument(WEIGHTS_FILE, f"corrupt: {exc}") from exc

    spec = AdapterSpec(
        rank=max_seen,
        alpha=default_alpha,
        use_rslora=use_rslora,
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in shapes})),
        size_bytes=weights_path.stat().st_size,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        scaling=scaling_for("", default_rank),
        modules=len(shapes),
    )
    return AdapterWeights(spec=spec, modules=modules)
