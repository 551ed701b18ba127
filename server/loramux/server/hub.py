"""The Hugging Face Hub client: fetch an adapter's files pinned to one commit.

Transport-neutral; the errors it raises are LoRAMux's own, naming the request field.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from loramux.core.errors import (
    FailedPrecondition,
    InvalidArgument,
    LoramuxError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from loramux.server.registry import ALLOWED_FILES, REQUIRED_FILES


def download_from_hub(
    repo_id: str,
    revision: str,
    staged: Path,
    max_bytes: int,
    endpoint: str | None = None,
    *,
    token: str | None = None,
) -> str:
    """Fetch an adapter's files pinned to the commit `revision` resolves to; return the sha.

    Only the caller's `token` is sent; without one the pull is anonymous, so a tenant can
    never reach private repos through credentials the server process happens to hold.
    """
    credential: str | bool = token or False
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(endpoint=endpoint, token=credential)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True, token=credential)
        sha = info.sha
        if not sha:
            raise Unavailable("repo_id", "the Hub did not report a commit for this revision")
        files = {s.rfilename: s.size or 0 for s in info.siblings or []}
        missing = [f for f in REQUIRED_FILES if f not in files]
        if missing:
            raise FailedPrecondition("repo_id", f"{repo_id}@{sha[:12]} has no {', '.join(missing)}")
        total = sum(size for name, size in files.items() if name in ALLOWED_FILES)
        if total > max_bytes:
            raise ResourceExhausted(
                "repo_id", f"adapter of {total} bytes exceeds the limit of {max_bytes}"
            )
        snapshot_download(
            repo_id,
            revision=sha,
            allow_patterns=list(ALLOWED_FILES),
            local_dir=str(staged),
            endpoint=endpoint,
            token=credential,
        )
    except LoramuxError:
        raise
    except HFValidationError as exc:
        raise InvalidArgument("repo_id", f"not a valid Hub repo id or revision: {exc}") from exc
    except RevisionNotFoundError as exc:
        raise NotFound("revision", f"{repo_id} has no revision {revision!r}") from exc
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        raise NotFound("repo_id", f"no accessible Hub repo {repo_id!r}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise PermissionDenied("repo_id", f"the Hub refused access to {repo_id}") from exc
        raise Unavailable("repo_id", f"the Hub answered {status or 'with an error'}") from exc
    except Exception as exc:  # connection refused, DNS, timeouts, offline mode
        raise Unavailable("repo_id", f"the Hub is unreachable ({type(exc).__name__})") from exc
    shutil.rmtree(staged / ".cache", ignore_errors=True)
    return sha
