"""The same engine on CUDA (skipped cleanly on machines without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramux.core.config import Settings
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer
from loramux.server.engine import Engine
from loramux.server.lora import base_linear_shapes
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams, TokenEvent
from loramux.server.synthetic import write_random_adapter

pytestmark = pytest.mark.gpu


# (LoRA kernel, paged attention): the Triton pair CUDA's auto picks, and the alternatives.
KERNELS = [("triton", "triton"), ("compiled", "torch")]


@pytest.mark.parametrize(("lora_kernel", "attention_kernel"), KERNELS)
def test_cuda_engine_matches_peft(
    smollm2: ResolvedModel, tmp_path: Path, lora_kernel: str, attention_kernel: str
) -> None:
    from peft import PeftModel

    model = load_base_model(smollm2, "nf4", "cuda")
    assert next(model.parameters()).device.type == "cuda"
    settings = Settings(device="cuda", lora_kernel=lora_kernel, attention_kernel=attention_kernel)
    engine = Engine(model, load_tokenizer(smollm2), settings, smollm2)
    assert engine._lora is not None and engine._lora.backend.kernel_mode == lora_kernel
    try:
        engine.warm_up()
        folders = [
            write_random_adapter(
                tmp_path / f"a{i}", base_linear_shapes(model), rank=8 * (i + 1), seed=i, scale=0.06
            )
            for i in range(3)
        ]
        for i, folder in enumerate(folders):
            engine.adapters.register(f"a{i}", folder)
        prompt = engine.render_chat([("user", "What is the capital of France?")])
        names = ["a0", "a1", "a2", None]
        streams = [
            engine.submit(GenerationRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=8), n))
            for i, n in enumerate(names)
        ]
        events: list[list[TokenEvent]] = [list(s) for s in streams]
        outputs = [[t for e in row for t in e.token_ids] for row in events]
        reference = PeftModel.from_pretrained(
            load_base_model(smollm2, "nf4", "cuda"), str(folders[0]), adapter_name="a0"
        )
        for i in (1, 2):
            reference.load_adapter(str(folders[i]), adapter_name=f"a{i}")
        ids = torch.tensor([prompt], device="cuda")
        eos = set(engine.eos_token_ids)
        for name, tokens, row in zip(names, outputs, events, strict=True):
            with torch.inference_mode():
                if name is None:
                    with reference.disable_adapter():
                        out = reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
                else:
                    reference.set_adapter(name)
                    out = reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
            expected = out[0, len(prompt) :].tolist()
            # The whole output and why it ended: at the EOS where PEFT's generate stopped
            # too (the EOS is the last token of both), or after all 8 tokens. A prefix
            # check would pass an engine that stopped early.
            assert tokens == expected, name
            want = FinishReason.EOS if expected[-1] in eos else FinishReason.LENGTH
            assert row[-1].finish_reason is want, name
    finally:
        engine.shutdown()
