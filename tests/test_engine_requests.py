"""Request validation, streaming text and sampling, on a tiny random Llama (fast)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from loramux.core.config import Settings
from loramux.core.errors import InvalidArgument, NotFound
from loramux.core.models import ResolvedModel, load_base_model, load_tokenizer
from loramux.server.detokenize import IncrementalText
from loramux.server.engine import Engine
from loramux.server.requests import FinishReason, GenerationRequest, SamplingParams
from loramux.server.sampling import RowSampler, sample_next_tokens


@pytest.fixture(scope="module")
def engine(tiny_llama: ResolvedModel) -> Iterator[Engine]:
    engine = Engine(
        load_base_model(tiny_llama, "nf4", "cpu"),
        load_tokenizer(tiny_llama),
        Settings(max_new_tokens_limit=64, max_batch_size=4, max_queued_requests=8),
        tiny_llama,
        lora_kernel="eager",
    )
    yield engine
    engine.shutdown()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 65}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_sampling_parameters_name_the_field(
    engine: Engine, params: dict[str, object], field: str
) -> None:
    request = GenerationRequest("r", [1, 2, 3], SamplingParams(**params))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as info:
        engine.submit(request)
    assert info.value.field == field


def test_bad_prompts_are_refused(engine: Engine) -> None:
    with pytest.raises(InvalidArgument, match="empty") as info:
        engine.submit(GenerationRequest("r", [], SamplingParams()))
    assert info.value.field == "prompt"
    too_long = [5] * engine.context_length
    with pytest.raises(InvalidArgument, match="context window"):
        engine.submit(GenerationRequest("r", too_long, SamplingParams(max_new_tokens=1)))
    with pytest.raises(InvalidArgument, match="vocabulary"):
        engine.submit(GenerationRequest("r", [10**9], SamplingParams()))
    with pytest.raises(NotFound):
        engine.submit(GenerationRequest("r", [1], SamplingParams(), adapter_id="../etc/passwd"))


def test_chat_roles_are_checked(engine: Engine) -> None:
    with pytest.raises(InvalidArgument) as info:
        engine.render_chat([("user", "hi"), ("wizard", "boo")])
    assert info.value.field == "messages[1].role"
    with pytest.raises(InvalidArgument):
        engine.render_chat([])
    ids = engine.render_chat([("system", "be brief"), ("user", "hi")])
    assert engine.tokenizer.decode(ids).rstrip().endswith("assistant")


def test_streamed_text_equals_decoded_tokens(engine: Engine) -> None:
    prompt = engine.tokenize("The quick brown fox")
    events = list(engine.submit(GenerationRequest("r", prompt, SamplingParams(max_new_tokens=20))))
    tokens = [t for e in events for t in e.token_ids]
    final = events[-1]
    assert final.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
    assert final.completion_tokens == len(tokens) and final.prompt_tokens == len(prompt)
    expected = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    assert "".join(e.text for e in events) == expected


def test_incremental_text_holds_back_possible_stop_strings(engine: Engine) -> None:
    tokenizer = engine.tokenizer
    ids = tokenizer("Hello world, stop here please", add_special_tokens=False)["input_ids"]
    text = IncrementalText(tokenizer, stop=("stop here",))
    emitted = ""
    stopped = False
    for token in ids:
        delta, stopped = text.add(token)
        emitted += delta
        assert "stop" not in emitted  # never shows part of a stop string
        if stopped:
            break
    assert stopped and emitted == "Hello world, "


def test_sampling_is_seeded_and_respects_top_k() -> None:
    logits = torch.randn(3, 100)
    params = SamplingParams(temperature=1.0, top_k=1, seed=3)
    picked = sample_next_tokens(logits.clone(), [RowSampler(params, []) for _ in range(3)])
    assert picked == logits.argmax(-1).tolist()  # top_k=1 is greedy whatever the seed
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    first = [sample_next_tokens(logits[:1].clone(), [RowSampler(params, [])])[0] for _ in range(3)]
    assert len(set(first)) == 1
    greedy = SamplingParams(repetition_penalty=1e6)
    row = torch.zeros(1, 10)
    row[0, 4] = 5.0
    row[0, 7] = 4.0
    assert sample_next_tokens(row, [RowSampler(greedy, [4])]) == [7]  # 4 was seen: penalised


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 0.9), (0.7, 0, 0.5), (1.3, 0, 0.99), (1.0, 20, 0.8), (0.5, 5, 0.3), (1.0, 0, 0.05)],
)
def test_filtered_distribution_equals_transformers_warpers(
    temperature: float, top_k: int, top_p: float
) -> None:
    """Temperature, top-k and top-p give the distribution transformers' warpers give."""
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from loramux.server.sampling import filtered_logits

    torch.manual_seed(7)
    logits = torch.randn(64, 200) * 3  # no ties: the kept set is unambiguous
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    warpers.append(TopPLogitsWarper(top_p))
    expected = torch.softmax(warpers(torch.zeros(64, 1, dtype=torch.long), logits.clone()), -1)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    ours = torch.stack([torch.softmax(filtered_logits(row, params), -1) for row in logits])
    assert torch.equal(ours > 0, expected > 0)  # exactly the same tokens kept
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)


def test_queue_limit_is_resource_exhausted(tiny_llama: ResolvedModel) -> None:
    from loramux.core.errors import ResourceExhausted

    engine = Engine(
        load_base_model(tiny_llama, "nf4", "cpu"),
        load_tokenizer(tiny_llama),
        Settings(max_queued_requests=2, max_batch_size=1),
        tiny_llama,
        enable_lora=False,
    )
    try:
        engine.shutdown()  # the loop is stopped: nothing leaves the queue
        engine._stopping = False
        for i in range(2):
            engine.submit(GenerationRequest(f"r{i}", [1, 2], SamplingParams()))
        with pytest.raises(ResourceExhausted) as info:
            engine.submit(GenerationRequest("r3", [1, 2], SamplingParams()))
        assert info.value.field == "queue"
    finally:
        engine._stopping = True
