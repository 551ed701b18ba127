"""A tiny Gemma 2 (a sliding layer and a full one, attention logit soft-capping) served by
each paged-attention kernel that computes its attention: `--attention-kernel triton`
(through Triton's interpreter on the CPU) and `--attention-kernel native` (the build this
CPU runs: AVX-512 BF16 or AVX2). The kernel computes the windows and caps of every
decoding row, and every request's greedy tokens are PEFT's on the same NF4 base (the
near-tie rule of the other PEFT tests: tests/api_helpers.py), through transformers' own
eager Gemma 2 attention (measured: with the window or the cap left out of either kernel,
a sequence parts from PEFT where PEFT's logits were not tied).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from api_helpers import peft_generate, tokens_before_parting

from loramux.core.models import ResolvedModel
from loramux.server.engine import Engine
from loramux.server.requests import GenerationRequest, SamplingParams

pytestmark = [pytest.mark.peft_reference]

NEW_TOKENS = 8


# A tiny Gemma 2: layer 0 slides over WINDOW tokens, layer 1 attends to everything; both
# soft-cap their scores. Prompts are longer than the window, so the decoding rows (the
# Triton kernel's) see keys it must drop, and their scores reach the cap.
GEMMA_WINDOW = 8
GEMMA_SOFTCAP = 2.0
GEMMA_PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the fence",
    "Once upon a time in a small village by the sea there lived an old fisherman",
]


@pytest.fixture(scope="module")
def tiny_gemma2(tmp_path_factory: pytest.TempPathFactory, smollm2: ResolvedModel) -> ResolvedModel:
    """Weights drawn wide (std 0.2, as the decisive tiny Llama's), so that the greedy
    tokens follow what attention computes."""
    import torch
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny-gemma2")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2.path))
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # the native kernel takes multiples of 32
        query_pre_attn_scalar=32,
        sliding_window=GEMMA_WINDOW,
        attn_logit_softcapping=GEMMA_SOFTCAP,
        final_logit_softcapping=None,  # 30 in Gemma 2: it squashed these logits into ties
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
        # untied: with the input embedding scaled by sqrt(hidden) (Gemma's normalizer), a
        # tied head on these wide weights repeats the last token whatever attention says
        tie_word_embeddings=False,
    )
    assert config.layer_types == ["sliding_attention", "full_attention"]
    torch.manual_seed(1)
    Gemma2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return ResolvedModel(name=str(folder), path=folder, hub_id=None)


@pytest.mark.parametrize("kernel", ["triton", "native"])
def test_gemma2_windows_and_soft_capping_by_the_kernel_give_pefts_tokens(
    kernel: str, tiny_gemma2: ResolvedModel, tmp_path: Path
) -> None:
    """A paged kernel on a Gemma 2 (both refused it before they computed windows and
    soft-capping): the base model and an attention adapter, two prompts, in one batch whose
    prompts are prefilled in chunks beside decoding rows; every request's greedy tokens are
    PEFT's (near-tie rule) on the same NF4 base, through transformers' own eager Gemma 2
    attention."""
    from peft import PeftModel

    from loramux.core.config import Settings
    from loramux.core.models import load_base_model, load_tokenizer
    from loramux.server.lora import base_linear_shapes
    from loramux.server.native_build import NativeKernelUnavailable, compiler
    from loramux.server.paged_attention.native import cpu_isa
    from loramux.server.synthetic import write_random_adapter

    if kernel == "native":
        try:
            cpu_isa()
            compiler()
        except NativeKernelUnavailable as exc:
            pytest.skip(f"native paged attention unavailable here: {exc}")
    settings = Settings(
        attention_kernel=kernel, max_batch_tokens=24, max_batch_size=8, max_loaded_adapters=2
    )
    engine = Engine(
        load_base_model(tiny_gemma2, "nf4", "cpu"),
        load_tokenizer(tiny_gemma2),
        settings,
        tiny_gemma2,
    )
    try:
        assert engine.runner.kernel is not None and engine.runner.kernel.name == kernel
        reference = load_base_model(tiny_gemma2, "nf4", "cpu")
        adapter = write_random_adapter(
            tmp_path / "qv", base_linear_shapes(reference), rank=8, alpha=16,
            targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=5, scale=0.3,
        )  # fmt: skip
        engine.adapters.register("qv", adapter)
        model = PeftModel.from_pretrained(reference, str(adapter), "qv").eval()
        prompts = [engine.tokenize(p) for p in GEMMA_PROMPTS]
        assert all(len(ids) > GEMMA_WINDOW for ids in prompts)
        streams = {
            (name, i): engine.submit(
                GenerationRequest(
                    f"{name}-{i}", ids, SamplingParams(max_new_tokens=NEW_TOKENS), name
                )
            )
            for i, ids in enumerate(prompts)
            for name in (None, "qv")
        }
        got = {key: [t for e in stream for t in e.token_ids] for key, stream in streams.items()}
    finally:
        engine.shutdown()
    compared = 0
    outputs = set()
    for (name, i), tokens in got.items():
        expected, ties = peft_generate(model, prompts[i], name, NEW_TOKENS)
        outputs.add(tuple(expected))
        compared += tokens_before_parting(tokens, expected, ties, (name, i))
    assert len(outputs) == len(got)  # the adapter changes what the model says
    # Most of it was compared (measured 25 of 32 with either kernel: one sequence parts at
    # a near-tie of PEFT's at its second token).
    assert compared >= 0.75 * len(got) * NEW_TOKENS, compared
