# ruff: noqa: F401, F811  (the fixtures of test_http_api.py, imported by name)
"""Issue 25: GuideLLM (vLLM's load generator) as the client, as a new user runs it.

A short concurrent run with synthetic prompts against /v1/completions and
/v1/chat/completions with an adapter, on the real server (tiny random Llama, NF4): every
request must succeed. GuideLLM streams with `stream_options.continuous_usage_stats` and
`ignore_eos`, vLLM's extensions, which the server once refused on every request.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_http_api import adapter_folder, keys, server, url

from loramux.core.models import ResolvedModel

pytestmark = pytest.mark.slow

REQUESTS = 6
OUTPUT_TOKENS = 8


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_a_short_guidellm_run_has_no_errors(
    url: str, keys: dict[str, str], tiny_llama: ResolvedModel, tmp_path: Path, route: str
) -> None:
    report = tmp_path / "report.json"
    guidellm = Path(sys.executable).parent / "guidellm"
    backend = (
        f"kind=openai_http,target={url},model=alpha,request_format={route},api_key={keys['acme']}"
    )
    run = subprocess.run(
        [
            str(guidellm),
            "run",
            "--backend",
            backend,
            "--profile",
            "kind=concurrent,streams=2",
            "--constraint",
            f"kind=max_requests,count={REQUESTS}",
            "--data",
            f"kind=synthetic_text,prompt_tokens=32,output_tokens={OUTPUT_TOKENS}",
            "--tokenizer",
            f"kind=huggingface_auto,model={tiny_llama.path}",
            "--output",
            f"kind=json,path={report}",
            "--disable-console-interactive",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    (benchmark,) = json.loads(report.read_text())["benchmarks"]
    totals = benchmark["metrics"]["request_totals"]
    assert totals == {"successful": REQUESTS, "errored": 0, "incomplete": 0, "total": REQUESTS}
    # ignore_eos honoured: every request generated all it asked for
    assert benchmark["metrics"]["output_token_count"]["successful"]["min"] == OUTPUT_TOKENS
