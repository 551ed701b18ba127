"""Issue 28 on a real server (the tiny Llama, raw gRPC stubs): versions serve their own
files, an alias moved while 32 streams run leaves them on their version, sticky keys,
download round trip through PEFT, and another tenant's private adapter by every route.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from api_helpers import peft_with_adapters
from hardening_helpers import (
    call,
    create_tenants,
    generate_request,
    read_folder,
    stream_call,
    stubs,
    tiny_server,
    token_ids,
    upload_requests,
)

from loramux.client import LoramuxClient
from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer
from loramux.server.lora import base_linear_shapes
from loramux.server.synthetic import write_random_adapter
from loramux.v1 import loramux_pb2 as pb

OK = grpc.StatusCode.OK
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: ResolvedModel) -> Iterator[Any]:
    running = tiny_server(tmp_path_factory.mktemp("versions") / "home", tiny_llama)
    yield running
    running.close()


@pytest.fixture(scope="module")
def api(server: RunningServer) -> Iterator[tuple[Any, Any, dict[str, str]]]:
    channel, inference, adapters, admin = stubs(f"127.0.0.1:{server.port}")
    keys = create_tenants(admin, ("alice", "mallory"))
    yield inference, adapters, keys
    channel.close()


@pytest.fixture(scope="module")
def folders(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    linears = base_linear_shapes(server.state.engine.model)
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: write_random_adapter(root / name, linears, rank=4, seed=seed, scale=0.5)
        for name, seed in (("a", 11), ("b", 12))
    }


@pytest.fixture(scope="module")
def stored(api: tuple[Any, Any, dict[str, str]], folders: dict[str, Path]) -> dict[str, list[int]]:
    """alice's `x` v1 (files a) and v2 (files b), and `only-a`/`only-b` holding the same
    files alone: the reference outputs each version must give."""
    inference, adapters, keys = api
    for name, folder in (("x", "a"), ("x", "b"), ("only-a", "a"), ("only-b", "b")):
        uploaded = call(
            adapters.UploadAdapter,
            iter(upload_requests(name, read_folder(folders[folder]))),
            keys["alice"],
        )
        assert uploaded.code == OK, uploaded.details
    reference = {
        name: token_ids(call(inference.Generate, generate_request(PROMPT, name, 12), keys["alice"]))
        for name in ("only-a", "only-b")
    }
    assert reference["only-a"] != reference["only-b"]
    return reference


def generate(inference: Any, adapter: str, key: str, route_key: str = "") -> list[int]:
    metadata = [("authorization", f"Bearer {key}")]
    if route_key:
        metadata.append(("loramux-route-key", route_key))
    return list(
        inference.Generate(generate_request(PROMPT, adapter, 12), metadata=metadata).token_ids
    )


def set_alias(adapters: Any, key: str, alias: str, targets: dict[str, int]) -> Any:
    request = pb.SetAliasRequest(
        name="x",
        alias=alias,
        targets=[pb.AliasTarget(version=v, weight=w) for v, w in targets.items()],
    )
    return call(adapters.SetAlias, request, key)


def test_each_version_serves_its_own_files(
    api: tuple[Any, Any, dict[str, str]], stored: dict[str, list[int]]
) -> None:
    inference, _adapters, keys = api
    alice = keys["alice"]
    assert generate(inference, "x", alice) == stored["only-a"]  # default alias: v1
    assert generate(inference, "x@v1", alice) == stored["only-a"]
    assert generate(inference, "x@v2", alice) == stored["only-b"]
    assert generate(inference, "x@latest", alice) == stored["only-b"]
    for ref, named in (("x@v7", "v7"), ("x@nope", "'nope'")):
        missing = call(inference.Generate, generate_request(PROMPT, ref), alice)
        assert missing.code == grpc.StatusCode.NOT_FOUND and named in missing.details
        assert missing.field == "adapter"


def test_an_alias_moved_while_32_streams_run_leaves_them_on_their_version(
    api: tuple[Any, Any, dict[str, str]], stored: dict[str, list[int]]
) -> None:
    inference, adapters, keys = api
    alice = keys["alice"]
    assert set_alias(adapters, alice, "prod", {"v1": 100}).code == OK
    metadata = [("authorization", f"Bearer {alice}")]
    streams = [
        inference.GenerateStream(generate_request(PROMPT, "x@prod", 12), metadata=metadata)
        for _ in range(32)
    ]
    firsts = [next(stream) for stream in streams]  # every one admitted, generating on v1
    moved = set_alias(adapters, alice, "prod", {"v2": 100})
    assert moved.code == OK, moved.details
    assert [t.version for t in moved.response.previous.targets] == ["v1"]
    assert generate(inference, "x@prod", alice) == stored["only-b"]  # new requests: v2
    for first, stream in zip(firsts, streams, strict=True):
        tokens = list(first.token_ids) + [t for m in stream for t in m.token_ids]
        assert tokens == stored["only-a"]
    # Rollback is one call.
    rolled = call(adapters.RollbackAlias, pb.AliasRef(name="x", alias="prod"), alice)
    assert rolled.code == OK, rolled.details
    assert generate(inference, "x@prod", alice) == stored["only-a"]


def test_a_caller_key_keeps_a_conversation_on_one_version(
    api: tuple[Any, Any, dict[str, str]], stored: dict[str, list[int]]
) -> None:
    inference, adapters, keys = api
    alice = keys["alice"]
    assert set_alias(adapters, alice, "canary", {"v1": 50, "v2": 50}).code == OK
    outputs = {stored["only-a"][0]: "v1", stored["only-b"][0]: "v2"}
    seen = set()
    for conversation in range(16):
        answers = {
            tuple(generate(inference, "x@canary", alice, f"conversation-{conversation}"))
            for _ in range(3)
        }
        assert len(answers) == 1
        (answer,) = answers
        assert list(answer) in (stored["only-a"], stored["only-b"])
        seen.add(outputs[answer[0]])
    assert seen == {"v1", "v2"}  # 16 keys all on one side: p = 2 * 0.5**16


def test_download_gives_the_stored_files_back_and_peft_loads_them(
    server: RunningServer,
    api: tuple[Any, Any, dict[str, str]],
    stored: dict[str, list[int]],
    folders: dict[str, Path],
    tiny_llama: ResolvedModel,
    tmp_path: Path,
) -> None:
    _, _, keys = api
    with LoramuxClient(f"127.0.0.1:{server.port}", keys["alice"]) as alice:
        info = alice.download_adapter("x@v2", tmp_path / "down")
    assert info.version == 2
    original = read_folder(folders["b"])
    downloaded = read_folder(tmp_path / "down")
    assert downloaded == original
    assert info.sha256 == hashlib.sha256(original["adapter_model.safetensors"]).hexdigest()
    model = peft_with_adapters(tiny_llama, {"original": folders["b"], "down": tmp_path / "down"})
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916]])
    logits = {}
    with torch.no_grad():
        for name in ("original", "down"):
            model.set_adapter(name)
            logits[name] = model(input_ids=ids).logits
    assert torch.equal(logits["original"], logits["down"])


def test_another_tenants_private_adapter_is_not_found_by_any_route(
    api: tuple[Any, Any, dict[str, str]], stored: dict[str, list[int]]
) -> None:
    inference, adapters, keys = api
    mallory = keys["mallory"]
    for ref in ("alice/x", "alice/x@v1", "alice/x@prod", "alice/x@latest"):
        answers = [
            call(inference.Generate, generate_request(PROMPT, ref), mallory),
            call(adapters.GetAdapter, pb.AdapterRef(name=ref), mallory),
            call(adapters.DeleteAdapter, pb.AdapterRef(name=ref), mallory),
            stream_call(adapters.DownloadAdapter, pb.AdapterRef(name=ref), mallory),
            call(
                adapters.AddEvaluations,
                pb.AddEvaluationsRequest(name=ref, evaluations=[pb.Evaluation(name="m", value=1)]),
                mallory,
            ),
        ]
        expected = [grpc.StatusCode.NOT_FOUND] * 5
        if ref.endswith(("@prod", "@latest")):  # not a name or a version: refused for anyone
            expected[2] = grpc.StatusCode.INVALID_ARGUMENT
        assert [a.code for a in answers] == expected, answers
    for request, method in (
        (pb.ListAdapterVersionsRequest(name="alice/x"), adapters.ListAdapterVersions),
        (pb.AliasRef(name="alice/x", alias="prod"), adapters.RollbackAlias),
        (pb.SetAliasRequest(name="alice/x", alias="prod",
                            targets=[pb.AliasTarget(version="v1", weight=100)]),
         adapters.SetAlias),
    ):  # fmt: skip
        answer = call(method, request, mallory)
        assert answer.code == grpc.StatusCode.NOT_FOUND, answer
    listed = call(adapters.ListAdapters, pb.ListAdaptersRequest(), mallory)
    assert listed.code == OK and not listed.response.adapters


def test_listing_pages_and_bad_tokens_over_grpc(
    api: tuple[Any, Any, dict[str, str]], stored: dict[str, list[int]]
) -> None:
    _, adapters, keys = api
    alice = keys["alice"]
    first = call(adapters.ListAdapters, pb.ListAdaptersRequest(page_size=2), alice)
    assert first.code == OK
    assert [a.name for a in first.response.adapters] == ["only-a", "only-b"]
    token = first.response.next_page_token
    second = call(
        adapters.ListAdapters, pb.ListAdaptersRequest(page_size=2, page_token=token), alice
    )
    assert [(a.name, a.version) for a in second.response.adapters] == [("x", 1)]
    assert not second.response.next_page_token
    bad = [
        (pb.ListAdaptersRequest(page_size=1001), "page_size"),
        (pb.ListAdaptersRequest(page_size=2, page_token=token[:-2] + "xx"), "page_token"),
        (pb.ListAdaptersRequest(page_size=2, page_token=token, name_prefix="o"), "page_token"),
    ]
    for request, field in bad:
        refused = call(adapters.ListAdapters, request, alice)
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT, refused
        assert refused.field == field
    stolen = call(
        adapters.ListAdapters,
        pb.ListAdaptersRequest(page_size=2, page_token=token),
        keys["mallory"],
    )
    assert stolen.code == grpc.StatusCode.INVALID_ARGUMENT and stolen.field == "page_token"
    versions = call(adapters.ListAdapterVersions, pb.ListAdapterVersionsRequest(name="x"), alice)
    assert [v.version for v in versions.response.versions] == [1, 2]
    assert "default" in {a.name for a in versions.response.aliases}


def test_the_cli_downloads_a_version_as_a_peft_folder(
    server: RunningServer,
    api: tuple[Any, Any, dict[str, str]],
    stored: dict[str, list[int]],
    folders: dict[str, Path],
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    _, _, keys = api
    done = subprocess.run(
        [sys.executable, "-m", "loramux.cli", "adapters", "download", "x@v1", str(tmp_path / "d"),
         "--address", f"127.0.0.1:{server.port}", "--api-key", keys["alice"]],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "alice/x@v1" in done.stdout
    assert read_folder(tmp_path / "d") == read_folder(folders["a"])


def test_the_cli_pushes_a_stored_version_to_a_hub_with_the_callers_token(
    server: RunningServer,
    api: tuple[Any, Any, dict[str, str]],
    stored: dict[str, list[int]],
    folders: dict[str, Path],
) -> None:
    import os
    import subprocess
    import sys

    from hub_server import local_hub

    _, _, keys = api
    with local_hub(token="hf_caller") as hub:

        def push(ref: str, repo_id: str, token: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "loramux.cli", "adapters", "push", ref, repo_id,
                 "--hub-token", token, "--hub-endpoint", hub.endpoint,
                 "--address", f"127.0.0.1:{server.port}", "--api-key", keys["alice"]],
                capture_output=True, text=True, timeout=180, check=False,
                env={**os.environ, "HF_HUB_DISABLE_XET": "1"},
            )  # fmt: skip

        done = push("x@v2", "alice/pushed", "hf_caller")
        assert done.returncode == 0, done.stderr
        assert f"commit {hub.head('alice/pushed')}" in done.stdout
        pushed = hub.files("alice/pushed")
        pushed.pop(".gitattributes")  # the Hub's own, made with the repo
        assert pushed == read_folder(folders["b"])
        # Without the caller's token the Hub refuses, and nothing is pushed.
        assert push("x@v1", "alice/other", "wrong").returncode != 0
        assert not hub.has_repo("alice/other")


def test_metrics_count_each_version_apart(
    server: RunningServer, api: tuple[Any, Any, dict[str, str]], stored: dict[str, list[int]]
) -> None:
    inference, _, keys = api
    sample = server.state.metrics.registry.get_sample_value

    def figures(version: str) -> tuple[float, float, float]:
        adapter = {"adapter": f"alice/x@{version}"}
        return (
            sample("loramux_requests_total", {**adapter, "tenant": "alice", "status": "OK"}) or 0,
            sample("loramux_adapter_generated_tokens_total", adapter) or 0,
            sample("loramux_adapter_request_seconds_count", adapter) or 0,
        )

    before = {v: figures(v) for v in ("v1", "v2")}
    generate(inference, "x@v2", keys["alice"])
    after = {v: figures(v) for v in ("v1", "v2")}
    assert after["v1"] == before["v1"]
    assert [b - a for a, b in zip(before["v2"], after["v2"], strict=True)] == [1, 12, 1]


def test_2000_requests_on_a_90_10_alias_split_within_binomial_bounds(
    server: RunningServer, api: tuple[Any, Any, dict[str, str]], stored: dict[str, list[int]]
) -> None:
    """Real requests, no key: the versions' request counters split 90/10 within 5 standard
    deviations (a correct split falls outside with p < 1e-6)."""
    import math
    from concurrent.futures import ThreadPoolExecutor

    inference, adapters, keys = api
    alice = keys["alice"]
    assert set_alias(adapters, alice, "split", {"v1": 90, "v2": 10}).code == OK
    sample = server.state.metrics.registry.get_sample_value

    def served(version: str) -> float:
        labels = {"adapter": f"alice/x@{version}", "tenant": "alice", "status": "OK"}
        return sample("loramux_requests_total", labels) or 0.0

    before = {v: served(v) for v in ("v1", "v2")}
    request = generate_request(PROMPT, "x@split", 1)
    metadata = [("authorization", f"Bearer {alice}")]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda _: inference.Generate(request, metadata=metadata), range(2000)))
    counts = {v: served(v) - before[v] for v in ("v1", "v2")}
    assert counts["v1"] + counts["v2"] == 2000
    sd = math.sqrt(2000 * 0.1 * 0.9)
    assert 200 - 5 * sd <= counts["v2"] <= 200 + 5 * sd, counts


def test_anyone_downloads_a_public_adapter_and_only_its_owner_moves_its_aliases(
    server: RunningServer,
    api: tuple[Any, Any, dict[str, str]],
    stored: dict[str, list[int]],
    folders: dict[str, Path],
) -> None:
    from hardening_helpers import ADMIN_KEY

    inference, adapters, keys = api
    channel, _, _, admin = stubs(f"127.0.0.1:{server.port}")
    try:
        public = pb.SetAdapterPublicRequest(owner="alice", name="x", public=True)
        assert call(admin.SetAdapterPublic, public, ADMIN_KEY).code == OK
        got = stream_call(
            adapters.DownloadAdapter, pb.AdapterRef(name="alice/x@v2"), keys["mallory"]
        )
        assert got.code == OK, got.details
        files = {m.chunk.path: b"" for m in got.response if m.WhichOneof("part") == "chunk"}
        for message in got.response:
            if message.WhichOneof("part") == "chunk":
                files[message.chunk.path] += message.chunk.data
        assert files == read_folder(folders["b"])
        assert generate(inference, "alice/x@v2", keys["mallory"]) == stored["only-b"]
        moved = call(
            adapters.SetAlias,
            pb.SetAliasRequest(
                name="alice/x", alias="prod", targets=[pb.AliasTarget(version="v2", weight=100)]
            ),
            keys["mallory"],
        )
        assert moved.code == grpc.StatusCode.NOT_FOUND, moved  # public is for use, not for writes
    finally:
        public.public = False
        assert call(admin.SetAdapterPublic, public, ADMIN_KEY).code == OK
        channel.close()
