"""Attention for packed rows: each example's own causal attention, no masked blocks.

Packed (``loramux train --packing``), a row holds several examples laid end to end with
``position_ids`` restarting at 0 for each. Given such rows and no 2-D mask, transformers'
``sdpa`` path builds a block-diagonal 4-D mask per row and runs the general masked kernel over
the whole row: a row of 4 examples of 180 tokens computes 720×720 scores, 4× what the same
examples cost padded (4 × 180×180), and most of them masked out. Measured on this 2-core CPU
(SmolLM2-135M, NF4, LoRA r16, gradient checkpointing, batches of 8 short chats), that ate
the whole gain of dropping 27% of the positions: 1.06× tokens per CPU-second.

`VARLEN` is the attention that flash-attention's varlen kernels give on a GPU, for any
device: it splits each row at the restarts of its position ids (the segments transformers
itself detects, ``masking_utils.find_packed_sequence_indices``) and runs causal SDPA with
``is_causal=True`` and no mask on each segment, the dense kernel PyTorch has for exactly
that case (flash attention on the CPU too). No score outside an example is computed, so none
can leak across a boundary. Its mask function hands transformers' ordinary 4-D mask to the
ordinary sdpa path whenever a real 2-D attention mask is given (padding), so a padded batch
through a model set to it is computed exactly as with ``sdpa``.

The backend is chosen once, when the trainer builds the model (`AttentionBackend.for_packing`).
On CUDA, SDPA's causal kernels (flash, memory-efficient) serve the same per-example calls;
flash-attention's own varlen kernels (one call per layer) were not tried: no GPU here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

VARLEN = "loramux_varlen"


def segment_lengths(position_ids: Any) -> list[int]:
    """Lengths of the examples laid end to end in ``position_ids`` ([rows, width]; a new
    example wherever a position does not follow the previous one), row after row."""
    import torch

    flat = position_ids.reshape(-1)  # [rows * width]
    starts = torch.ones_like(flat, dtype=torch.bool)  # [rows * width]
    starts[1:] = flat[1:] != flat[:-1] + 1
    width = position_ids.shape[-1]
    starts[::width] = True  # an example never continues from one row into the next
    bounds = [*torch.nonzero(starts).view(-1).tolist(), flat.numel()]
    return [b - a for a, b in itertools.pairwise(bounds)]


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Causal attention per packed example (transformers' attention-function signature).

    query: [rows, heads, width, head_dim]; key, value: [rows, kv_heads, width, head_dim].
    Returns [rows, width, heads, head_dim], as transformers' other attention functions do.
    """
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    rows, heads, width, head_dim = query.shape
    if (
        attention_mask is not None
        or position_ids is None
        or key.shape[2] != width  # a KV cache (generation): not a training forward
        or not getattr(module, "is_causal", True)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key = repeat_kv(key, groups)  # [rows, heads, width, head_dim]
    value = repeat_kv(value, groups)  # [rows, heads, width, head_dim]
    lengths = segment_lengths(position_ids.expand(rows, -1))

    def flat(x: Any) -> Any:  # [rows, heads, width, d] -> [1, heads, rows * width, d]
        return x.transpose(0, 1).reshape(1, heads, rows * width, x.shape[-1])

    # 4-D inputs: PyTorch's CPU flash kernel takes no other shape (3-D ones fall back to the
    # math path: a bmm, a softmax and a materialised causal mask per example).
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=True
        )  # [1, heads, length, head_dim]
        for q, k, v in zip(
            flat(query).split(lengths, dim=2),
            flat(key).split(lengths, dim=2),
            flat(value).split(lengths, dim=2),
            strict=True,
        )
    ]
    out = torch.cat(outputs, dim=2).view(heads, rows, width, head_dim)
    return out.permute(1, 2, 0, 3).contiguous(), None  # [rows, width, heads, head_dim]


def varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """No mask for packed or unpadded rows (the segments come from the position ids);
    transformers' sdpa mask when a 2-D padding mask is given."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register_varlen() -> str:
    """Make `VARLEN` known to transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    return VARLEN


@dataclass(frozen=True)
class AttentionBackend:
    """The attention implementation a training run sets on its model, chosen once."""

    name: str
    reason: str

    @classmethod
    def for_packing(cls, packing: bool, device_type: str) -> AttentionBackend | None:
        """None keeps the model's own (sdpa) attention: padded batches need nothing else."""
        if not packing:
            return None
        return cls(register_varlen(), f"causal SDPA per packed example on {device_type}")

    def apply(self, model: Any) -> None:
        model.set_attn_implementation(self.name)
