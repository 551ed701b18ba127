"""Tiny random models of every decoder family the support matrix covers (docs/models.md).

Each is built with transformers' own config class (4 layers, head size 32, a vocabulary
of SmolLM2's tokenizer), saved as a local Hugging Face folder in bf16, as a user's
fine-tuned base would be. The features that change what an engine must compute are set
small enough to matter in a short prompt: sliding windows of 16 tokens, soft-capping
close to the logits' range, partial rotary, parallel residuals, the Granite multipliers.

Families whose real tokenizer adds a BOS token (Llama 3, Gemma) get a copy of SmolLM2's
tokenizer that does, so the train/serve BOS rule (loramux.core.prompts) is exercised.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 128, 4, 2, 32, 4
WINDOW = 16  # sliding window of the families that have one: shorter than the test prompts


@dataclass(frozen=True)
class Family:
    """One architecture: how to build it tiny, and the modules its adapters target."""

    name: str  # as docs/models.md shows it
    model_type: str  # transformers' config.model_type
    config: Callable[[dict[str, Any]], Any]  # common fields -> a PretrainedConfig
    attention: tuple[str, ...]  # the attention-only adapter's targets
    bos: bool = False  # the family's tokenizer adds a BOS token
    moe: bool = False


def _common(vocab: int, bos: int, eos: int, pad: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 512,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }


def _llama(c: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**c, head_dim=HEAD_DIM)


def _mistral(c: dict[str, Any]) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**c, head_dim=HEAD_DIM, sliding_window=WINDOW)


def _mixtral(c: dict[str, Any]) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        **c, head_dim=HEAD_DIM, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
    )


def _qwen2(c: dict[str, Any]) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**c)


def _qwen2_moe(c: dict[str, Any]) -> Any:
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **c,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=HIDDEN,
        shared_expert_intermediate_size=HIDDEN,
    )


def _qwen3(c: dict[str, Any]) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**c, head_dim=HEAD_DIM)


def _qwen3_moe(c: dict[str, Any]) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **c, head_dim=HEAD_DIM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=HIDDEN
    )


def _gemma(c: dict[str, Any]) -> Any:
    from transformers import GemmaConfig

    return GemmaConfig(**c, head_dim=HEAD_DIM)


def _gemma2(c: dict[str, Any]) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(
        **c,
        head_dim=HEAD_DIM,
        sliding_window=WINDOW,
        attn_logit_softcapping=1.0,  # the scores' own range on a random model: it bites
        final_logit_softcapping=1.0,
        query_pre_attn_scalar=HEAD_DIM,
    )


def _gemma3(c: dict[str, Any]) -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **c, head_dim=HEAD_DIM, sliding_window=WINDOW, query_pre_attn_scalar=HEAD_DIM
    )


def _phi3(c: dict[str, Any]) -> Any:
    from transformers import Phi3Config

    return Phi3Config(**c)


def _olmo2(c: dict[str, Any]) -> Any:
    from transformers import Olmo2Config

    return Olmo2Config(**c)


def _granite(c: dict[str, Any]) -> Any:
    from transformers import GraniteConfig

    return GraniteConfig(
        **c,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=1 / 64,
        logits_scaling=8.0,
    )


def _cohere(c: dict[str, Any]) -> Any:
    from transformers import CohereConfig

    return CohereConfig(**c, logit_scale=0.0625)


def _starcoder2(c: dict[str, Any]) -> Any:
    from transformers import Starcoder2Config

    return Starcoder2Config(**c, sliding_window=WINDOW)


def _gpt_neox(c: dict[str, Any]) -> Any:
    from transformers import GPTNeoXConfig

    # `num_key_value_heads` stays: GPT-NeoX has no such field and keeps it as a stray
    # attribute (every head has its own keys), which the engine once took for its KV heads.
    return GPTNeoXConfig(**c, rotary_pct=0.25, use_parallel_residual=True)


def _falcon(c: dict[str, Any]) -> Any:
    from transformers import FalconConfig

    c = dict(c)
    del c["intermediate_size"], c["max_position_embeddings"], c["num_key_value_heads"]
    return FalconConfig(
        **c,
        num_kv_heads=KV_HEADS,
        new_decoder_architecture=True,
        parallel_attn=True,
        bias=False,
        alibi=False,
    )


def _gpt_oss(c: dict[str, Any]) -> Any:
    from transformers import GptOssConfig

    return GptOssConfig(
        **c,
        head_dim=HEAD_DIM,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def _deepseek_v3(c: dict[str, Any]) -> Any:
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        **c,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=HIDDEN,
        q_lora_rank=64,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=HEAD_DIM,
        v_head_dim=HEAD_DIM,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    )


QKV = ("q_proj", "v_proj")
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("Llama", "llama", _llama, QKV, bos=True),
        Family("Mistral", "mistral", _mistral, QKV),
        Family("Mixtral", "mixtral", _mixtral, QKV, moe=True),
        Family("Qwen2", "qwen2", _qwen2, QKV),
        Family("Qwen2-MoE", "qwen2_moe", _qwen2_moe, QKV, moe=True),
        Family("Qwen3", "qwen3", _qwen3, QKV),
        Family("Qwen3-MoE", "qwen3_moe", _qwen3_moe, QKV, moe=True),
        Family("Gemma", "gemma", _gemma, QKV, bos=True),
        Family("Gemma 2", "gemma2", _gemma2, QKV, bos=True),
        Family("Gemma 3", "gemma3_text", _gemma3, QKV, bos=True),
        Family("Phi-3", "phi3", _phi3, ("qkv_proj",)),
        Family("OLMo 2", "olmo2", _olmo2, QKV),
        Family("Granite", "granite", _granite, QKV),
        Family("Cohere", "cohere", _cohere, QKV),
        Family("StarCoder2", "starcoder2", _starcoder2, QKV),
        Family("GPT-NeoX", "gpt_neox", _gpt_neox, ("query_key_value",)),
        Family("Falcon", "falcon", _falcon, ("query_key_value",)),
        Family("GPT-OSS", "gpt_oss", _gpt_oss, QKV, moe=True),
        Family("DeepSeek-V3", "deepseek_v3", _deepseek_v3, ("q_b_proj", "kv_b_proj"), moe=True),
    ]
}


def bos_tokenizer(tokenizer: Any) -> Any:
    """A copy of `tokenizer` that puts its BOS token in front of every encoding, as Llama 3's
    and Gemma's do (SmolLM2's does not)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    bos, bos_id = tokenizer.bos_token, tokenizer.bos_token_id
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        chat_template=tokenizer.chat_template,
    )


def build(family: Family, folder: Path, tokenizer: Any, seed: int = 0) -> Path:
    """Save a randomly initialised bf16 `family` model and its tokenizer in `folder`."""
    from transformers import AutoModelForCausalLM

    if family.bos:
        tokenizer = bos_tokenizer(tokenizer)
    common = _common(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    config = family.config(common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert model.config.model_type == family.model_type, model.config.model_type
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "family.json").write_text(json.dumps({"family": family.name}))
    return folder
