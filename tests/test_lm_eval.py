"""Issue 25: lm-evaluation-harness as the client, against its own HF backend.

lm-eval's `local-completions` model (token-id requests, prompts in lists) against the real
server with an uploaded adapter on the real 4-bit SmolLM2, and lm-eval's `hf` model over
the same NF4 base with the same adapter in PEFT, on two small local tasks this test writes:
a multiple-choice one (loglikelihoods: `echo`, `logprobs`, `max_tokens` 1) and a
generate_until one. The choices, the metric and the loglikelihoods (within bf16 tolerance)
must agree; generated answers too, except where PEFT's own top logits were nearly tied at
the token where the two part (the near-tie rule of the engine's PEFT tests).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from api_helpers import free_port, linear_shapes, near_tie, peft_with_adapters

from loramux.client import LoramuxClient
from loramux.core.config import Settings
from loramux.core.models import ResolvedModel, load_tokenizer
from loramux.server.app import RunningServer, start_server
from loramux.server.synthetic import write_random_adapter

# Three evaluations of a 135M model on two CPUs, one through the server: minutes each.
pytestmark = [pytest.mark.slow, pytest.mark.peft_reference, pytest.mark.timeout(3600)]

ADMIN_KEY = "admin-lm-eval-key"
QUESTIONS = [  # (question, choices, answer index)
    ("What is the capital of France?", [" Paris", " London", " Rome"], 0),
    ("How many legs does a spider have?", [" six", " eight", " four"], 1),
    ("What colour is the sky on a clear day?", [" green", " red", " blue"], 2),
    ("Which animal says moo?", [" a cow", " a cat", " a dog"], 0),
    ("What is two plus two?", [" five", " four", " three"], 1),
    ("Which planet do we live on?", [" Mars", " Venus", " Earth"], 2),
]
GENERATE = [
    ("The capital of Italy is", "Rome"),
    ("Water boils at a temperature of", "100"),
    ("The opposite of hot is", "cold"),
    ("One, two, three,", "four"),
    ("The first month of the year is", "January"),
]
# A loglikelihood is a sum over its continuation's tokens; each token's logprob is within
# 4% of its position's logit range of PEFT's (tests/test_logprobs.py; measured <= 1.1%).
LOGPROB_SHARE = 0.04


@pytest.fixture(scope="module")
def adapter_folder(smollm2: ResolvedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lm-eval-adapter") / "adapter"
    return write_random_adapter(
        folder, linear_shapes(smollm2.path), rank=8, alpha=16, seed=5, scale=0.06
    )


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, default_models_dir: Path
) -> Iterator[RunningServer]:
    home = tmp_path_factory.mktemp("lm-eval-home")
    (home / "models").symlink_to(default_models_dir, target_is_directory=True)
    running = start_server(
        Settings(
            home=home,
            port=0,
            metrics_port=0,
            http_port=free_port(),
            admin_keys=[ADMIN_KEY],
            lora_kernel="eager",  # no compilation at start or per new shape: minutes here
        )
    )
    yield running
    running.close()


@pytest.fixture(scope="module")
def key(server: RunningServer, adapter_folder: Path) -> str:
    with LoramuxClient(f"127.0.0.1:{server.port}", ADMIN_KEY) as admin:
        admin.create_tenant("evals")
        secret = admin.create_key("evals")[1]
    with LoramuxClient(f"127.0.0.1:{server.port}", secret) as client:
        client.upload_adapter(adapter_folder, "tuned")
    return secret


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two lm-eval tasks over local JSON files (`dataset_path: json`)."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    mc, gen = folder / "mc.jsonl", folder / "gen.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS
        )
    )
    gen.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in GENERATE))
    (folder / "loramux_mc.yaml").write_text(
        f"""task: loramux_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
    )
    (folder / "loramux_gen.yaml").write_text(
        f"""task: loramux_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""
    )
    return folder


def _evaluate(model: Any, tasks: Path, **options: Any) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(  # type: ignore[no-any-return]
        model=model,
        tasks=["loramux_mc", "loramux_gen"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        verbosity="WARNING",
        **options,
    )


@pytest.fixture(scope="module")
def served(server: RunningServer, key: str, tasks: Path, smollm2: ResolvedModel) -> dict[str, Any]:
    """lm-eval's local-completions against the server, its default settings but batches
    of 4 prompts per request (lists of token-id lists)."""
    import os

    assert server.http is not None
    args = (
        f"model=tuned,base_url=http://127.0.0.1:{server.http.port}/v1/completions,"
        f"tokenizer={smollm2.path},tokenizer_backend=huggingface,max_retries=1,timeout=3000"
    )
    os.environ["OPENAI_API_KEY"] = key  # what local-completions sends as its bearer key
    try:
        return _evaluate("local-completions", tasks, model_args=args, batch_size=4)
    finally:
        del os.environ["OPENAI_API_KEY"]


@pytest.fixture(scope="module")
def peft_model(smollm2: ResolvedModel, adapter_folder: Path) -> Any:
    return peft_with_adapters(smollm2, {"tuned": adapter_folder})


@pytest.fixture(scope="module")
def reference(peft_model: Any, tasks: Path, smollm2: ResolvedModel) -> dict[str, Any]:
    """lm-eval's own `hf` model over the NF4 base with the adapter in PEFT."""
    from lm_eval.models.huggingface import HFLM

    model = HFLM(pretrained=peft_model, tokenizer=load_tokenizer(smollm2), batch_size=1)
    return _evaluate(model, tasks)


def _samples(results: dict[str, Any], task: str) -> list[dict[str, Any]]:
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def test_multiple_choice_matches_lm_evals_hf_backend(
    served: dict[str, Any], reference: dict[str, Any], peft_model: Any, smollm2: ResolvedModel
) -> None:
    tokenizer = load_tokenizer(smollm2)
    got, want = _samples(served, "loramux_mc"), _samples(reference, "loramux_mc")
    assert len(got) == len(want) == len(QUESTIONS)
    for mine, theirs in zip(got, want, strict=True):
        ours = [float(r[0]) for r in mine["filtered_resps"]]
        hf = [float(r[0]) for r in theirs["filtered_resps"]]
        question = QUESTIONS[mine["doc_id"]]
        context = tokenizer.encode(f"Question: {question[0]}\nAnswer:")
        for value, expected, choice in zip(ours, hf, question[1], strict=True):
            ids = tokenizer.encode(f"Question: {question[0]}\nAnswer:{choice}")
            with torch.inference_mode():
                logits = peft_model(input_ids=torch.tensor([ids])).logits[0].float()
            spans = logits.max(-1).values - logits.min(-1).values
            bound = LOGPROB_SHARE * float(spans[len(context) - 1 : len(ids) - 1].sum())
            assert abs(value - expected) <= bound, (question, choice, value, expected)
        assert ours.index(max(ours)) == hf.index(max(hf)), (question, ours, hf)
    assert (
        served["results"]["loramux_mc"]["acc,none"]
        == reference["results"]["loramux_mc"]["acc,none"]
    )


def test_generate_until_matches_except_at_peft_ties(
    served: dict[str, Any], reference: dict[str, Any], peft_model: Any, smollm2: ResolvedModel
) -> None:
    tokenizer = load_tokenizer(smollm2)
    got, want = _samples(served, "loramux_gen"), _samples(reference, "loramux_gen")
    assert len(got) == len(want) == len(GENERATE)
    same = 0
    for mine, theirs in zip(got, want, strict=True):
        ours, hf = mine["filtered_resps"][0], theirs["filtered_resps"][0]
        if ours == hf:
            same += 1
            continue
        prompt = GENERATE[mine["doc_id"]][0]
        a, b = tokenizer.encode(prompt + ours), tokenizer.encode(prompt + hf)
        part = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        with torch.inference_mode():
            logits = peft_model(input_ids=torch.tensor([a[:part]])).logits[0, -1].float()
        tie = near_tie(logits)
        assert tie is not None and a[part] in tie and b[part] in tie, (prompt, ours, hf)
    assert same >= len(GENERATE) // 2, (got, want)
