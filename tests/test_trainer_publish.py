"""Issue 5, publishing: the real huggingface_hub client against a Hub-compatible local server.

Nothing is mocked: `HubServer` (tests/hub_server.py) speaks the Hub's HTTP API on 127.0.0.1,
and the client runs its real code paths (preupload, LFS batch + PUT, NDJSON commit, resolve).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
from hub_server import HubServer, git_blob_sha1
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from trainer_helpers import tiny_settings, write_task

from loramux.core.errors import InvalidArgument, NotFound, Unauthenticated, Unavailable
from loramux.core.models import ResolvedModel
from loramux.trainer.options import TrainOptions
from loramux.trainer.publish import (
    PUBLISHED_FILES,
    check_adapter_folder,
    publish_to_server,
    push_to_hub,
)
from loramux.trainer.train import train


@pytest.fixture(autouse=True)
def classic_lfs(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process the client must use the LFS protocol the test Hub speaks, not Xet."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def hub() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny_llama: ResolvedModel) -> Path:
    """A real (tiny) trainer output, checkpoints included: those must never be published."""
    root = tmp_path_factory.mktemp("publish")
    options = TrainOptions(
        train_file=write_task(root / "train.jsonl", 8),
        eval_split=0.25,
        output_dir=root / "tiny-adapter",
        max_steps=2,
        batch_size=2,
        grad_accum=1,
        rank=2,
        save_steps=1,
        progress_bar=False,
    )
    return train(options, tiny_settings(tiny_llama), echo=None).output_dir


def test_push_to_hub_uploads_the_adapter_in_one_pinned_commit(
    hub: HubServer, adapter: Path, tmp_path: Path
) -> None:
    published = push_to_hub(adapter, "alice/tiny-adapter", endpoint=hub.endpoint, token=hub.token)
    assert published.commit_sha == hub.head("alice/tiny-adapter")
    assert len(published.commit_sha) == 40
    assert published.url == f"{hub.endpoint}/alice/tiny-adapter"
    assert published.commit_url == f"{published.url}/commit/{published.commit_sha}"
    repo = hub.repo("alice/tiny-adapter")
    commit = repo.commits[published.commit_sha]
    assert commit.parent is not None and repo.commits[commit.parent].title == "initial commit"
    assert set(commit.files) == {".gitattributes", *PUBLISHED_FILES}  # no checkpoints
    assert commit.files["adapter_model.safetensors"].lfs_sha256 is not None  # went through LFS
    assert commit.files["adapter_config.json"].lfs_sha256 is None
    oid = commit.files["adapter_model.safetensors"].lfs_sha256
    puts = [path for method, path in hub.requests if method == "PUT"]
    assert any(path.startswith(f"/lfs-upload/alice/tiny-adapter/{oid}?") for path in puts)

    # What a server's pull does: download exactly that commit.
    folder = Path(
        snapshot_download(
            "alice/tiny-adapter",
            revision=published.commit_sha,
            endpoint=hub.endpoint,
            token=hub.token,
            cache_dir=tmp_path / "cache",
        )
    )
    for name in PUBLISHED_FILES:
        assert (folder / name).read_bytes() == (adapter / name).read_bytes()
    info = HfApi(endpoint=hub.endpoint, token=hub.token).model_info("alice/tiny-adapter")
    assert info.sha == published.commit_sha
    assert info.card_data is not None and info.card_data.library_name == "peft"
    assert {"lora", "qlora", "loramux"} <= set(info.tags or [])


def test_republishing_makes_a_new_commit_and_old_shas_stay_pinned(
    hub: HubServer, adapter: Path, tmp_path: Path
) -> None:
    first = push_to_hub(adapter, "alice/pinned", endpoint=hub.endpoint, token=hub.token)
    changed = tmp_path / "changed"
    changed.mkdir()
    for name in PUBLISHED_FILES:
        (changed / name).write_bytes((adapter / name).read_bytes())
    config = json.loads((changed / "adapter_config.json").read_text())
    config["lora_alpha"] = 99
    (changed / "adapter_config.json").write_text(json.dumps(config))
    second = push_to_hub(changed, "alice/pinned", endpoint=hub.endpoint, token=hub.token)
    assert second.commit_sha != first.commit_sha
    assert hub.repo("alice/pinned").commits[second.commit_sha].parent == first.commit_sha
    old = hf_hub_download(
        "alice/pinned",
        "adapter_config.json",
        revision=first.commit_sha,
        endpoint=hub.endpoint,
        token=hub.token,
        cache_dir=tmp_path / "cache",
    )
    assert json.loads(Path(old).read_text())["lora_alpha"] != 99
    # Nothing changed: no empty commit.
    again = push_to_hub(changed, "alice/pinned", endpoint=hub.endpoint, token=hub.token)
    assert again.commit_sha == second.commit_sha


def test_branch_and_private(hub: HubServer, adapter: Path) -> None:
    published = push_to_hub(
        adapter,
        "team/secret",
        private=True,
        branch="exp-1",
        endpoint=hub.endpoint,
        token=hub.token,
    )
    assert published.branch == "exp-1"
    assert published.url.endswith("/team/secret/tree/exp-1")
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    refs = {ref.name: ref.target_commit for ref in api.list_repo_refs("team/secret").branches}
    assert refs["exp-1"] == published.commit_sha
    assert refs["main"] != published.commit_sha  # main still holds only the initial commit
    assert api.model_info("team/secret").private is True
    with pytest.raises(RepositoryNotFoundError):  # private: invisible without the token
        HfApi(endpoint=hub.endpoint, token=False).model_info("team/secret")


def test_hub_errors_become_clear_loramux_errors(hub: HubServer, adapter: Path) -> None:
    with pytest.raises(Unauthenticated, match="HF_TOKEN"):
        push_to_hub(adapter, "alice/x", endpoint=hub.endpoint, token="hf_wrong")
    with pytest.raises(InvalidArgument, match="repo_id"):
        push_to_hub(adapter, "no-namespace", endpoint=hub.endpoint, token=hub.token)
    with pytest.raises(InvalidArgument, match=r"adapter_config\.json"):
        push_to_hub(adapter.parent, "alice/x", endpoint=hub.endpoint, token=hub.token)
    with pytest.raises(NotFound):
        check_adapter_folder(adapter / "absent")
    endpoint = hub.endpoint
    hub.stop()
    with pytest.raises(Unavailable, match=f"cannot reach the Hub at {endpoint}"):
        push_to_hub(adapter, "alice/x", endpoint=endpoint, token=hub.token)


def test_publish_cli_prints_sha_and_url(hub: HubServer, adapter: Path) -> None:
    command = [sys.executable, "-m", "loramux.cli", "publish", str(adapter), "bob/cli-adapter"]
    result = subprocess.run(
        [*command, "--branch", "v1"], capture_output=True, text=True, env=hub.env(), timeout=300
    )
    assert result.returncode == 0, result.stderr
    sha = hub.head("bob/cli-adapter", "v1")
    assert f"commit {sha}" in result.stdout
    assert f"{hub.endpoint}/bob/cli-adapter/tree/v1" in result.stdout
    hub.stop()
    down = subprocess.run(command, capture_output=True, text=True, env=hub.env(), timeout=300)
    assert down.returncode == 2
    assert "cannot reach the Hub" in down.stderr


# -- the test Hub itself: what the gRPC PullAdapter tests rely on -----------------------------


def test_hub_server_resolve_headers_and_error_codes(hub: HubServer, tmp_path: Path) -> None:
    weights = bytes(range(256)) * 40
    sha = hub.commit("org/seeded", {"adapter_model.safetensors": weights, "a.json": b"{}"})

    def head(path: str) -> tuple[int, dict[str, str]]:
        request = urllib.request.Request(f"{hub.endpoint}/{path}", method="HEAD")
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, dict(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers)

    status, headers = head("org/seeded/resolve/main/adapter_model.safetensors")
    assert status == 200 and headers["X-Repo-Commit"] == sha
    assert headers["X-Linked-Size"] == str(len(weights))
    assert headers["X-Linked-Etag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
    status, headers = head(f"org/seeded/resolve/{sha}/a.json")
    assert status == 200 and headers["ETag"] == f'"{git_blob_sha1(b"{}")}"'
    assert "X-Linked-Etag" not in headers
    assert head("org/absent/resolve/main/a.json")[1]["X-Error-Code"] == "RepoNotFound"
    assert head("org/seeded/resolve/nope/a.json")[1]["X-Error-Code"] == "RevisionNotFound"
    status, headers = head("org/seeded/resolve/main/b.json")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (
        404,
        "EntryNotFound",
        sha,
    )

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/absent")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/seeded", revision="f" * 40)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(
            "org/seeded", "b.json", endpoint=hub.endpoint, cache_dir=str(tmp_path / "hf-cache")
        )
    api.create_branch("org/seeded", branch="old", revision=sha)
    later = hub.commit("org/seeded", {"a.json": b'{"v": 2}'})
    assert [c.commit_id for c in api.list_repo_commits("org/seeded")][:2] == [later, sha]
    assert hub.head("org/seeded", "old") == sha
    info = api.model_info("org/seeded", revision="old", files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    assert sizes["adapter_model.safetensors"] == len(weights)
    assert api.whoami()["name"] == hub.user


def test_hub_server_restarts_on_the_same_port(tmp_path: Path) -> None:
    with HubServer() as hub:
        sha = hub.commit("org/r", {"x.txt": b"x"})
        api = HfApi(endpoint=hub.endpoint, token=hub.token)
        assert api.model_info("org/r").sha == sha  # opens a keep-alive connection
        hub.stop()
        assert not hub.running
        with pytest.raises(Exception) as caught:
            api.model_info("org/r")
        assert not isinstance(caught.value, RepositoryNotFoundError)  # unreachable, not 404
        hub.start()
        assert api.model_info("org/r").sha == sha
    assert os.environ.get("HF_ENDPOINT") != hub.endpoint  # in-process tests leave env alone


# -- to a running LoRAMux server --------------------------------------------------------------


def test_publish_to_a_running_server(
    adapter: Path, tiny_llama: ResolvedModel, tmp_path: Path
) -> None:
    from loramux.client import LoramuxClient
    from loramux.server.app import start_server

    settings = tiny_settings(
        tiny_llama, home=tmp_path, port=0, metrics_port=0, grpc_workers=4, dev=True
    )
    server = start_server(settings)
    address = f"127.0.0.1:{server.port}"
    try:
        stored = publish_to_server(adapter, address, name="tiny-code")
        assert stored.name == "tiny-code" and stored.rank == 2
        with LoramuxClient(address) as client:
            assert "tiny-code" in [a.name for a in client.list_adapters()]
            reply = client.generate("Code for item 3?", adapter="tiny-code", max_new_tokens=4)
            assert reply.completion_tokens == 4
        command = [sys.executable, "-m", "loramux.cli", "publish", str(adapter)]
        result = subprocess.run(
            [*command, "--publish-to", address, "--adapter-name", "via-cli"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert f"uploaded to {address} as 'via-cli'" in result.stdout
        with pytest.raises(InvalidArgument, match="HOST:PORT"):
            publish_to_server(adapter, "no-port", name="x")
    finally:
        server.close()
