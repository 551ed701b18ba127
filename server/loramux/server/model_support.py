"""What the engine relies on in a base model, checked once at start (issue 23).

The engine runs the model's own decoder layers (its norms, rotary embedding, fused or
split projections, parallel residuals, multipliers: whatever the family's transformers
code does) and replaces three things around them: the KV cache (kv_cache.py: one pool of
[kv_heads, blocks, block_size, head_dim] per layer, written through the cache protocol's
`update`), the attention function (attention.py, called through transformers' attention
interface) and the step from the last hidden state to the logits (the output layer, then
the family's own logit transform, applied by the runner). A family is served only when
each of those is exactly what its forward does; a model that is not is refused here, when
the server starts, with a message naming the feature, never served differently.

The check is a probe, not a list of names: one forward of one token through the real
model, with a recording cache and a recording attention function, says

* the shape of every layer's keys and values (the pool's geometry comes from it, not from
  config fields a family may name differently: GPT-NeoX has no `num_key_value_heads`);
  layers must all call the cache once, with one shape (no KV sharing across layers, no
  per-layer head sizes);
* every argument each layer hands its attention function: the engine's attention
  implements causal softmax attention with `scaling`, a per-layer `sliding_window`,
  logit soft-capping (`softcap`) and attention sinks (`s_aux`); any other non-empty
  argument is refused by name; a layer that never calls the attention interface
  (attention the engine could not route through its cache) is refused too;
* the model's own logits for that token against the output layer's applied to its last
  hidden state followed by `LogitTransform` (the engine's step): they must be bit-equal.
  That covers Cohere's `logit_scale`, Granite's `logits_scaling` and Gemma's final
  soft-capping, and refuses any transform the engine does not know.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface

# The attention variants beyond plain causal softmax attention, as start-up messages name them
SOFTCAP = "attention logit soft-capping"
SINKS = "attention sinks"
SLIDING_WINDOW = "sliding-window attention"
# Arguments of transformers' attention interface the engine's attention implements
# (attention.py), and those that carry nothing the result depends on.
SUPPORTED_ATTENTION_ARGS = frozenset({"scaling", "sliding_window", "softcap", "s_aux"})
# (the decoder's own call arguments, which some families pass on to their attention).
IGNORED_ATTENTION_ARGS = frozenset(
    {"dropout", "is_causal", "position_ids", "cache_position", "use_cache", "output_attentions"}
)
_PROBE_ATTENTION = "loramux_probe"


class UnsupportedModel(ValueError):
    """The base model needs something the engine does not compute (refused at start)."""

    def __init__(self, feature: str, detail: str) -> None:
        super().__init__(
            f"this base model is not supported: {feature} ({detail}); see docs/models.md"
        )
        self.feature = feature


@dataclass(frozen=True)
class LogitTransform:
    """The family's own step from the output layer's logits to the model's, in the output
    layer's dtype, in the order the families apply them (each applies at most one)."""

    multiply: float | None = None  # Cohere: logits * logit_scale
    divide: float | None = None  # Granite: logits / logits_scaling
    softcap: float | None = None  # Gemma 2/3: tanh(logits / cap) * cap

    @classmethod
    def of(cls, config: Any) -> LogitTransform:
        scale = getattr(config, "logit_scale", None)
        scaling = getattr(config, "logits_scaling", None)
        cap = getattr(config, "final_logit_softcapping", None)
        return cls(
            multiply=float(scale) if scale not in (None, 1, 1.0) else None,
            divide=float(scaling) if scaling not in (None, 1, 1.0) else None,
            softcap=float(cap) if cap else None,
        )

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:  # [..., vocab]
        if self.multiply is not None:
            logits = logits * self.multiply
        if self.divide is not None:
            logits = logits / self.divide
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass(frozen=True)
class ModelShape:
    """What the probe found: the KV pool's geometry and the attention variants in use."""

    num_layers: int
    kv_heads: int
    head_dim: int
    sliding_windows: tuple[int | None, ...]  # per layer (None: full attention)
    softcaps: tuple[float | None, ...]  # per layer attention logit soft-capping
    sinks: bool = False  # attention sinks (GPT-OSS)
    logits: LogitTransform = field(default_factory=LogitTransform)

    @property
    def attention_variants(self) -> tuple[str, ...]:
        """Which of the attention variants beyond plain causal softmax attention the model
        uses (SOFTCAP, SINKS, SLIDING_WINDOW: the torch path computes them all; each
        paged-attention kernel names those it computes)."""
        used = {SOFTCAP: any(self.softcaps), SINKS: self.sinks}
        used[SLIDING_WINDOW] = any(self.sliding_windows)
        return tuple(name for name, present in used.items() if present)

    @property
    def geometry(self) -> dict[str, int]:  # what a KV block holds (PagedKVCache's fields)
        return {"num_layers": self.num_layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim}


class _RecordingCache:
    """The cache protocol the engine's PagedKVCache speaks, recording each layer's call."""

    def __init__(self) -> None:
        self.shapes: dict[int, list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.shapes.setdefault(layer_idx, []).append((tuple(key.shape), tuple(value.shape)))
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    @property
    def is_compileable(self) -> bool:
        return False


def _recording_attention(calls: list[dict[str, Any]]) -> Any:
    def attend(
        module: Any,
        query: torch.Tensor,  # [rows, heads, T, head_dim]
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        calls.append({"layer": getattr(module, "layer_idx", None), **kwargs})
        rows, heads, length = query.shape[:3]  # [rows, T, heads, value head_dim]
        return query.new_zeros(rows, length, heads, value.shape[-1]), None

    return attend


def probe_model(model: Any, pad_token_id: int) -> ModelShape:
    """One token through `model` as the engine will run it; the shape it needs, or
    UnsupportedModel naming what the engine would compute differently."""
    config = model.config
    layers = int(config.num_hidden_layers)
    calls: list[dict[str, Any]] = []
    cache = _RecordingCache()
    previous = getattr(config, "_attn_implementation", None)
    AttentionInterface.register(_PROBE_ATTENTION, _recording_attention(calls))
    device = next(model.parameters()).device
    ids = torch.tensor([[pad_token_id]], device=device)
    hidden: list[torch.Tensor] = []
    decoder = model.get_decoder()
    hook = decoder.register_forward_hook(lambda _m, _a, out: hidden.append(out[0]))
    try:
        model.set_attn_implementation(_PROBE_ATTENTION)
        kwarg = "cache" if "cache" in _parameters(decoder) else "past_key_values"
        with torch.inference_mode():
            out = model(
                input_ids=ids,
                position_ids=torch.zeros_like(ids),
                attention_mask=torch.zeros((1, 1, 1, 1), dtype=torch.bfloat16, device=device),
                use_cache=True,
                **{kwarg: cache},
            )
    except UnsupportedModel:
        raise
    except Exception as exc:
        raise UnsupportedModel(
            "a forward with the engine's cache and attention",
            f"{type(exc).__name__}: {exc}",
        ) from exc
    finally:
        hook.remove()
        with contextlib.suppress(Exception):
            model.set_attn_implementation(previous or "sdpa")
    shape = _kv_shape(cache, layers)
    windows, softcaps = _attention_variants(calls, layers)
    sinks = any(call.get("s_aux") is not None for call in calls)
    transform = LogitTransform.of(config)
    _check_logits(model, hidden, out.logits, transform)
    return ModelShape(layers, shape[1], shape[3], windows, softcaps, sinks, transform)


def check_quantized(model: Any, linears: Collection[str]) -> None:
    """On a 4-bit base, every adaptable linear layer must be a 4-bit one.

    transformers' bitsandbytes integration replaces `nn.Linear` modules only: Falcon's
    `FalconLinear` (a subclass) stays bf16, so a Falcon "NF4" base would be served at four
    times the memory the server reports, silently. Refused instead, naming the layers.
    """
    if not getattr(model, "is_loaded_in_4bit", False):
        return
    import bitsandbytes as bnb

    if not linears:
        raise UnsupportedModel(
            "linear layers the 4-bit quantizer takes",
            "it has no nn.Linear layers, so bitsandbytes quantizes none",
        )
    modules = dict(model.named_modules())
    plain = sorted(
        {
            type(modules[n]).__name__
            for n in linears
            if not isinstance(modules[n], bnb.nn.Linear4bit)
        }
    )
    if plain:
        raise UnsupportedModel(
            "linear layers the 4-bit quantizer takes",
            f"bitsandbytes leaves its {', '.join(plain)} layers unquantized",
        )


def _parameters(module: Any) -> set[str]:
    import inspect

    return set(inspect.signature(module.forward).parameters)


def _kv_shape(cache: _RecordingCache, layers: int) -> tuple[int, ...]:
    missing = [i for i in range(layers) if i not in cache.shapes]
    if missing:
        raise UnsupportedModel(
            "layers without a KV cache of their own",
            f"layers {missing} never write keys and values through the cache "
            "(KV shared across layers, or attention outside the cache protocol)",
        )
    shapes = {s for calls in cache.shapes.values() for s in calls}
    twice = [i for i, c in cache.shapes.items() if len(c) != 1]
    if twice or len(shapes) != 1:
        raise UnsupportedModel(
            "keys and values of one shape in every layer",
            f"the layers write {sorted(shapes)}"
            + (f"; layers {twice} more than once" * bool(twice)),
        )
    ((key, value),) = shapes
    if len(key) == len(value) == 4 and key[-1] != value[-1]:
        raise UnsupportedModel(
            "keys and values of one head size",
            f"keys {list(key)}, values {list(value)} for one token "
            "(multi-head latent attention, as DeepSeek's)",
        )
    if key != value or len(key) != 4 or key[0] != 1 or key[2] != 1:
        raise UnsupportedModel(
            "keys and values as [rows, kv_heads, tokens, head_dim]",
            f"keys {list(key)}, values {list(value)} for one token",
        )
    return key


def _attention_variants(
    calls: list[dict[str, Any]], layers: int
) -> tuple[tuple[int | None, ...], tuple[float | None, ...]]:
    if len(calls) != layers:
        raise UnsupportedModel(
            "attention through transformers' attention interface",
            f"{len(calls)} attention calls for {layers} layers",
        )
    windows: list[int | None] = []
    softcaps: list[float | None] = []
    for call in calls:
        extra = sorted(
            name
            for name, value in call.items()
            if name != "layer"
            and name not in SUPPORTED_ATTENTION_ARGS | IGNORED_ATTENTION_ARGS
            and value is not None
            and value is not False
        )
        if extra:
            names = ", ".join(extra)
            raise UnsupportedModel("an attention variant", f"its attention takes {names}")
        windows.append(int(call["sliding_window"]) if call.get("sliding_window") else None)
        softcaps.append(float(call["softcap"]) if call.get("softcap") else None)
    return tuple(windows), tuple(softcaps)


def _check_logits(
    model: Any, hidden: list[torch.Tensor], logits: torch.Tensor, transform: LogitTransform
) -> None:
    if len(hidden) != 1:
        raise UnsupportedModel("one pass through the decoder", f"{len(hidden)} passes")
    with torch.inference_mode():
        ours = transform(model.get_output_embeddings()(hidden[0][:, -1:]))
    if ours.shape != logits.shape or not torch.equal(ours, logits):
        raise UnsupportedModel(
            "logits from the output layer and a known transform",
            "the model's own logits differ from the output layer's with "
            f"{transform} applied: it transforms them in a way the engine does not",
        )
