# ruff: noqa: F401, F811  (the fixtures of test_http_api.py, imported by name)
"""Issue 25 over HTTP and gRPC: logprobs, echo, prompt lists, n, vLLM's extensions.

The real server on 127.0.0.1 with the tiny random Llama (NF4) and an uploaded adapter, as
test_http_api.py (whose fixtures these are). Numbers are checked against log_softmax of
PEFT's logits on the same NF4 base (tests/test_logprobs.py does so on the real SmolLM2);
shapes against OpenAI's documented objects and what lm-eval and vLLM's clients read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from test_http_api import (
    BASE,
    adapter_folder,
    client,
    grpc_client,
    keys,
    server,
    url,
)

from loramux.client import InvalidArgument
from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer

pytestmark = pytest.mark.peft_reference

TOLERANCE = 0.04  # x the position's logit range, as tests/test_logprobs.py


@pytest.fixture(scope="module")
def reference(tiny_llama: ResolvedModel, adapter_folder: Path) -> Any:
    """PEFT on the NF4 tiny Llama with the uploaded adapter's files as `alpha`."""
    from api_helpers import peft_with_adapters

    return peft_with_adapters(tiny_llama, {"alpha": adapter_folder})


def _logprobs(reference: Any, ids: list[int], adapter: str | None) -> torch.Tensor:
    """log_softmax of PEFT's logits [len(ids), vocab], and the logits' range per row."""
    with torch.inference_mode():
        if adapter is None:
            with reference.disable_adapter():
                logits = reference(input_ids=torch.tensor([ids])).logits[0].float()
        else:
            reference.set_adapter(adapter)
            logits = reference(input_ids=torch.tensor([ids])).logits[0].float()
    span = logits.max(-1).values - logits.min(-1).values
    return torch.log_softmax(logits, -1), span


def _post(url: str, key: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        f"{url}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _close(value: float, reference: float, span: float, where: object) -> None:
    assert abs(value - reference) <= TOLERANCE * span, (where, value, reference)


def test_echo_scores_token_id_prompts_as_lm_eval_sends_them(
    url: str,
    keys: dict[str, str],
    reference: Any,
) -> None:
    """lm-eval's loglikelihood request: a batch of token-id prompts, echo, logprobs 1,
    max_tokens 1 (and 0): every prompt token but the first scored, PEFT's numbers."""
    prompts = [list(range(40, 75)), [7, 300, 12, 900, 45, 46]]
    for max_tokens in (0, 1):
        body = {
            "model": "alpha",
            "prompt": prompts,
            "echo": True,
            "logprobs": 1,
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        done = _post(url, keys["acme"], "/v1/completions", body)
        assert [c["index"] for c in done["choices"]] == [0, 1]
        assert done["usage"]["prompt_tokens"] == sum(map(len, prompts))
        assert done["usage"]["completion_tokens"] == max_tokens * 2
        for ids, choice in zip(prompts, done["choices"], strict=True):
            logprobs = choice["logprobs"]
            assert len(logprobs["tokens"]) == len(ids) + max_tokens
            assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
            offsets = logprobs["text_offset"]
            assert offsets[0] == 0 and offsets == sorted(offsets)
            want, span = _logprobs(reference, ids, "alpha")
            for q in range(1, len(ids)):
                value = logprobs["token_logprobs"][q]
                _close(value, float(want[q - 1, ids[q]]), float(span[q - 1]), (q, max_tokens))
                top = logprobs["top_logprobs"][q]
                assert value in top.values() and len(top) <= 2
            if max_tokens:  # what lm-eval's is_greedy reads: the greedy token is the top one
                value, top = logprobs["token_logprobs"][-1], logprobs["top_logprobs"][-1]
                assert value == max(top.values())


def test_token_logprobs_in_both_shapes_whole_and_streamed(
    url: str,
    keys: dict[str, str],
    reference: Any,
) -> None:
    acme = client(url, keys["acme"])
    done = acme.completions.create(
        model="alpha", prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=3
    )
    logprobs = done.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens is not None
    assert len(logprobs.tokens) == done.usage.completion_tokens  # type: ignore[union-attr]
    ids = _post(url, keys["acme"], "/v1/completions", {"model": BASE, "prompt": "x"})  # warm
    del ids
    streamed = list(
        acme.completions.create(
            model="alpha",
            prompt="Once upon a time",
            max_tokens=6,
            temperature=0,
            logprobs=3,
            stream=True,
        )
    )
    tokens = [
        t
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.tokens or []
    ]
    assert tokens == logprobs.tokens
    assert all(len(top) >= 3 for top in logprobs.top_logprobs or [])
    chat = acme.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == chat.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob <= entry.top_logprobs[0].logprob
        assert bytes(entry.bytes or []) == entry.token.encode()


def test_grpc_logprobs_match_peft(
    server: RunningServer,
    keys: dict[str, str],
    reference: Any,
) -> None:
    with grpc_client(server, keys["acme"]) as rpc:
        ids = list(range(200, 230))
        done = rpc.generate(
            token_ids=ids, adapter="alpha", max_new_tokens=5, logprobs=2, prompt_logprobs=1
        )
    generated = list(done.token_ids)
    want, span = _logprobs(reference, ids + generated, "alpha")
    assert len(done.prompt_logprobs) == len(ids) - 1
    for q, scored in enumerate(done.prompt_logprobs, start=1):
        assert scored.token_id == ids[q] and len(scored.top) == 1
        _close(scored.logprob, float(want[q - 1, ids[q]]), float(span[q - 1]), q)
    assert [s.token_id for s in done.logprobs] == generated
    for i, scored in enumerate(done.logprobs):
        position = len(ids) + i - 1
        _close(scored.logprob, float(want[position, generated[i]]), float(span[position]), i)
        assert len(scored.top) == 2


def test_n_samples_share_one_prefill(
    server: RunningServer,
    url: str,
    keys: dict[str, str],
) -> None:
    """n=4 at temperature 0.8 with a seed: four samples, reproducible, the prompt's full
    blocks prefilled once (the other three take them from the prefix cache)."""
    engine = server.state.engine
    prompt = list(range(1000, 1050))  # 50 tokens: 3 full blocks of 16 before the last token
    body = {"model": "alpha", "prompt": prompt, "n": 4, "temperature": 0.8, "seed": 7}
    body["max_tokens"] = 8
    before = engine.stats()
    done = _post(url, keys["acme"], "/v1/completions", body)
    after = engine.stats()
    assert [c["index"] for c in done["choices"]] == [0, 1, 2, 3]
    assert len({c["text"] for c in done["choices"]}) > 1, "seed + i: the samples differ"
    assert done["usage"]["prompt_tokens"] == len(prompt)
    assert after.prefix_hit_tokens - before.prefix_hit_tokens == 3 * 48
    assert after.prefill_tokens_total - before.prefill_tokens_total == len(prompt) + 3 * 2
    again = _post(url, keys["acme"], "/v1/completions", body)
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in done["choices"]]


def test_vllm_extensions_are_honoured(url: str, keys: dict[str, str]) -> None:
    """What vLLM's clients send: accepted, and doing what vLLM documents."""
    headers = {"Authorization": f"Bearer {keys['acme']}"}
    common = {"model": BASE, "prompt": "Hello there", "temperature": 0}
    # logit_bias makes token 42 the greedy choice; min_tokens keeps it (a stop token) out
    # of the first three; ignore_eos, top_k, penalties, seed, skip_special_tokens along.
    body = {
        **common,
        "max_tokens": 6,
        "logit_bias": {"42": 100},
        "stop_token_ids": [42],
        "min_tokens": 3,
        "ignore_eos": True,
        "top_k": 5,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "seed": 3,
        "skip_special_tokens": False,
        "include_stop_str_in_output": True,
        "logprobs": 0,
    }
    done = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60).json()
    tokens = done["choices"][0]["logprobs"]["tokens"]
    assert done["usage"]["completion_tokens"] == 4, done
    assert done["choices"][0]["finish_reason"] == "stop"
    assert len(tokens) == 4
    # continuous_usage_stats: usage in every chunk, the count so far
    stream = {
        **common,
        "max_tokens": 5,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    usages = []
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=stream, headers=headers, timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                import json

                usages.append(json.loads(line[6:])["usage"])
    assert all(u is not None for u in usages)
    counts = [u["completion_tokens"] for u in usages]
    assert counts == sorted(counts) and counts[-1] == 5
    # max_completion_tokens on chat
    chat = {
        "model": BASE,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 3,
        "ignore_eos": True,
    }
    done = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=headers, timeout=60).json()
    assert done["usage"]["completion_tokens"] == 3


def test_client_score_is_the_continuations_loglikelihood(
    server: RunningServer, keys: dict[str, str], reference: Any
) -> None:
    """LoramuxClient.score: the sum of each continuation's token logprobs after the prompt,
    PEFT's; bad scoring requests are INVALID_ARGUMENT naming the field, and the server
    goes on serving."""
    prompt, continuations = "The sky is", [" blue", " a green field"]
    with grpc_client(server, keys["acme"]) as rpc:
        scores = rpc.score(prompt, continuations, adapter="alpha")
        context = rpc.tokenize(prompt)
        for continuation, got in zip(continuations, scores, strict=True):
            ids = rpc.tokenize(prompt + continuation)
            assert ids[: len(context)] == context
            want, span = _logprobs(reference, ids, "alpha")
            expected = sum(float(want[q - 1, ids[q]]) for q in range(len(context), len(ids)))
            worst = float(span[len(context) - 1 :].max()) * (len(ids) - len(context))
            _close(got, expected, worst, continuation)
        bad = [
            ({"token_ids": [1, 10**6]}, "token_ids"),
            ({"token_ids": [1, 2], "logprobs": 21}, "logprobs"),
            ({"token_ids": [1, 2], "prompt_logprobs": 21}, "prompt_logprobs"),
            ({"token_ids": [1, 2], "max_new_tokens": 0}, "max_new_tokens"),
        ]
        for kwargs, field in bad:
            with pytest.raises(InvalidArgument) as info:
                rpc.generate(**kwargs)  # type: ignore[arg-type]
            assert info.value.field == field, kwargs
        assert rpc.generate("Hi", max_new_tokens=2).completion_tokens == 2


def test_cli_generate_prints_logprobs(
    server: RunningServer, keys: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from loramux.cli import main as loramux_main

    address = f"127.0.0.1:{server.port}"
    args = ["generate", "Hello", "--max-new-tokens", "3", "--logprobs", "2"]
    capsys.readouterr()
    assert loramux_main([*args, "--address", address, "--api-key", keys["acme"]]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("\t") for line in lines[-3:]]
    assert all(len(row) == 3 and float(row[1]) <= 0 for row in rows), lines
