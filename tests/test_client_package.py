"""Issue 14 point 6: the Python client installs alone, without the server's ML stack.

`pip install ./clients/python` into a fresh virtualenv (pip from the machine's configured
index), then that interpreter imports the client and talks to a real server on 127.0.0.1:
generation, and a typed error mapped back from the gRPC status.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from loramux.core.config import Settings
from loramux.core.models import ResolvedModel
from loramux.server.app import RunningServer, start_server

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "transformers", "bitsandbytes", "peft", "accelerate", "safetensors", "numpy"}
CLIENT_SCRIPT = """
import json, sys
from loramux.client import LoramuxClient, NotFound
with LoramuxClient(sys.argv[1]) as client:
    done = client.generate("Once upon a time", max_new_tokens=4)
    try:
        client.generate("Hi", adapter="no-such-adapter", max_new_tokens=1)
        error = None
    except NotFound as exc:
        error = exc.field
print(json.dumps({
    "text": done.text,
    "tokens": done.token_ids,
    "error_field": error,
    "server_modules": sorted(
        m for m in sys.modules if m.startswith(("loramux.core", "loramux.server", "torch"))
    ),
}))
"""


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with only `pip install ./clients/python` in it."""
    root = tmp_path_factory.mktemp("client-venv")
    source = root / "src"  # built from a copy: pip writes build/ and *.egg-info in the tree
    shutil.copytree(
        REPO / "clients" / "python",
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return python


@pytest.fixture(scope="module")
def server(
    tiny_llama: ResolvedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    settings = Settings(
        home=tmp_path_factory.mktemp("client-home"),
        base_model=str(tiny_llama.path),
        device="cpu",
        port=0,
        metrics_port=0,
        lora_kernel="eager",
        dev=True,
    )
    running = start_server(settings)  # --dev: no key needed
    yield running
    running.close()


def test_client_package_installs_no_ml_stack(client_python: Path) -> None:
    listed = subprocess.run(
        [str(client_python), "-m", "pip", "list", "--format=json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed)}
    assert "loramux-client" in installed and {"grpcio", "protobuf"} <= installed
    assert not installed & HEAVY
    assert "loramux" not in installed  # the server package is not pulled in


def test_client_alone_talks_to_a_server(client_python: Path, server: RunningServer) -> None:
    address = f"127.0.0.1:{server.port}"
    out = subprocess.run(
        [str(client_python), "-c", CLIENT_SCRIPT, address],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    result = json.loads(out)
    from loramux.client import LoramuxClient

    with LoramuxClient(address) as here:  # the same request from the full install
        expected = here.generate("Once upon a time", max_new_tokens=4)
    assert result["tokens"] == expected.token_ids and result["text"] == expected.text
    assert result["error_field"] == "adapter"  # NOT_FOUND came back as loramux.errors.NotFound
    assert result["server_modules"] == []


def test_every_package_folder_is_listed_for_a_non_editable_install() -> None:
    """The image installs the server without -e: a subpackage missing from the list is gone."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(REPO / top).parts)
        for top in ("core", "server", "trainer")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert found == listed
    client = tomllib.loads((REPO / "clients" / "python" / "pyproject.toml").read_text())
    in_client = {
        ".".join(init.parent.relative_to(REPO / "clients" / "python").parts)
        for init in (REPO / "clients" / "python").rglob("__init__.py")
        if "build" not in init.parts
    }
    assert in_client == set(client["tool"]["setuptools"]["packages"])
