"""Publishing an adapter folder: to the Hugging Face Hub, and to a running LoRAMux server.

Only the adapter's own files leave the machine (config, safetensors weights, model card,
loss curve, metrics, run summary): never checkpoints, optimizer state or pickles. The Hub
upload is one commit, and its sha is what a server's pull should pin.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramux.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    LoramuxError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from loramux.trainer.callbacks import METRICS_FILE
from loramux.trainer.card import CARD_FILE
from loramux.trainer.plot import LOSS_CURVE_FILE
from loramux.trainer.train import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SUMMARY_FILE

log = logging.getLogger(__name__)

PUBLISHED_FILES = (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CARD_FILE,
    LOSS_CURVE_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
)
SERVER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CARD_FILE)


@dataclass(frozen=True)
class HubPublication:
    """Where an upload landed. `commit_sha` pins exactly these files for later pulls."""

    repo_id: str
    branch: str
    commit_sha: str
    commit_url: str
    url: str  # the repo (or branch) page


def check_adapter_folder(folder: Path) -> dict[str, Any]:
    """Refuse folders that are not a publishable PEFT adapter; returns its adapter config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFound("folder", f"{folder} is not a folder")
    config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise InvalidArgument("folder", f"{folder} has no {ADAPTER_CONFIG} (not a PEFT adapter)")
    if not weights.is_file():
        hint = (
            " (.bin pickles are not published)" if (folder / "adapter_model.bin").exists() else ""
        )
        raise InvalidArgument("folder", f"{folder} has no {ADAPTER_WEIGHTS}{hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument("folder", f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidArgument("folder", f"{config_path} must hold a JSON object")
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise FailedPrecondition(
            "base_model_name_or_path",
            f"{config_path} does not say which base model the adapter is for; set "
            "base_model_name_or_path to the base model's name or Hub id",
        )
    if Path(base).is_absolute():
        log.warning(
            "%s names its base model by a local path (%s) that others cannot resolve",
            config_path,
            base,
        )
    return config


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of whichever HTTP library this huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            error = getattr(mod, name, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                found.append(error)
    return tuple(found)


def _hub_error(exc: BaseException, repo_id: str, endpoint: str) -> LoramuxError:
    """A Hub client exception as a LoRAMux error that names what to fix."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, RevisionNotFoundError):
        return NotFound("branch", f"{repo_id}: {exc}")
    if isinstance(exc, RepositoryNotFoundError):
        return NotFound("repo_id", f"{repo_id} not found on {endpoint} (or no access to it)")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return Unauthenticated(
                "token", f"{endpoint} refused the token: set HF_TOKEN or run `hf auth login`"
            )
        if status == 403:
            return PermissionDenied("repo_id", f"no write access to {repo_id} on {endpoint}")
        if status >= 500:
            return Unavailable("hub", f"{endpoint} answered {status}; try again later")
        return InvalidArgument("repo_id", f"{endpoint} refused the upload: {exc}")
    return Unavailable("hub", f"cannot reach the Hub at {endpoint}: {type(exc).__name__}: {exc}")


def push_to_hub(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> HubPublication:
    """Create the repo if needed (and the branch), then upload the adapter in one commit.

    `endpoint` defaults to huggingface_hub's (``HF_ENDPOINT``, else huggingface.co); `token`
    to huggingface_hub's (``HF_TOKEN``, else the stored login).
    """
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    check_adapter_folder(folder)
    if not repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise InvalidArgument("repo_id", f"must look like 'user-or-org/name', got {repo_id!r}")
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    target = branch or constants.DEFAULT_REVISION
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch and branch != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            revision=target,
            allow_patterns=list(PUBLISHED_FILES),
            commit_message=commit_message or f"Upload LoRA adapter {folder.name} (LoRAMux)",
        )
    except _network_errors() as exc:
        raise _hub_error(exc, repo_id, endpoint) from exc
    except Exception as exc:
        from huggingface_hub.errors import HfHubHTTPError

        if isinstance(exc, HfHubHTTPError):
            raise _hub_error(exc, repo_id, endpoint) from exc
        raise
    url = f"{endpoint}/{repo_id}" + (f"/tree/{target}" if branch else "")
    return HubPublication(
        repo_id=repo_id,
        branch=target,
        commit_sha=str(commit.oid),
        commit_url=str(commit.commit_url),
        url=url,
    )


def publish_to_server(
    folder: Path, address: str, *, name: str, api_key: str | None = None, **client_options: Any
) -> Any:
    """Upload the adapter to a running LoRAMux server through the Python client.

    Only the adapter files are sent (a clean copy of them), so checkpoints next to the
    adapter never travel. Returns the client's metadata for the stored adapter.
    `client_options` go to `LoramuxClient` (TLS: `tls`, `ca_file`, `client_cert`, ...).
    """
    folder = Path(folder)
    check_adapter_folder(folder)
    if ":" not in address or not address.rsplit(":", 1)[1].isdigit():
        raise InvalidArgument("publish_to", f"must be HOST:PORT, got {address!r}")
    if not name:
        raise InvalidArgument("adapter_name", "must not be empty")
    try:  # the client pulls in gRPC; only needed here
        from loramux.client import LoramuxClient  # type: ignore[attr-defined]
    except ImportError as exc:
        raise FailedPrecondition(
            "publish_to", f"the LoRAMux Python client is not available: {exc}"
        ) from exc
    with tempfile.TemporaryDirectory(prefix="loramux-upload-") as staging:
        clean = Path(staging) / name
        clean.mkdir()
        for file in SERVER_FILES:
            if (folder / file).is_file():
                shutil.copy2(folder / file, clean / file)
        client = LoramuxClient(address, api_key=api_key, **client_options)
        try:
            return client.upload_adapter(clean, name)
        finally:
            close = getattr(client, "close", None)
            if callable(close):
                close()
