"""The Hugging Face Hub client: an adapter's files pinned to one commit.

Pulling is two steps, so the caller can reserve quota in between: `resolve` asks the Hub
which commit a revision names and what the adapter's files weigh; `download` fetches
exactly that commit. Transport-neutral; the errors are LoRAMux's own, naming the field.

Only the caller's token is sent; without one the pull is anonymous, so a tenant can never
reach private repos through credentials the server process happens to hold.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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

COMMIT_SHA = re.compile(r"[0-9a-f]{40}")  # a git commit id, as the Hub reports it


@dataclass(frozen=True)
class HubListing:
    """An adapter's files at one Hub commit, as the Hub lists them."""

    repo_id: str
    revision: str  # what the caller asked for (branch, tag or commit)
    sha: str  # the commit it named: 40 hex digits, checked
    size_bytes: int  # the listed sizes of the files LoRAMux stores


class HubClient:
    def __init__(self, endpoint: str | None, token: str | None) -> None:
        from huggingface_hub import HfApi

        self.endpoint = endpoint
        self._credential: str | bool = token or False
        self._api = HfApi(endpoint=endpoint, token=self._credential)

    def resolve(self, repo_id: str, revision: str, max_bytes: int) -> HubListing:
        """The commit `revision` names and the adapter's size there; refuses what cannot work.

        The Hub's answer is checked too: a commit id that is not 40 hex digits (a branch
        name, a path) would leave the pull unpinned, so it is refused.
        """
        with _hub_errors(repo_id, revision):
            info = self._api.model_info(
                repo_id, revision=revision, files_metadata=True, token=self._credential
            )
        sha = info.sha
        if not sha:
            raise Unavailable("repo_id", "the Hub did not report a commit for this revision")
        if not isinstance(sha, str) or not COMMIT_SHA.fullmatch(sha):
            raise FailedPrecondition(
                "revision",
                f"the Hub answered {str(sha)[:80]!r} as the commit of {repo_id}@{revision}: "
                "not a 40-hex-digit commit id, so the pull could not be pinned",
            )
        files = {s.rfilename: s.size or 0 for s in info.siblings or []}
        missing = [f for f in REQUIRED_FILES if f not in files]
        if missing:
            raise FailedPrecondition("repo_id", f"{repo_id}@{sha[:12]} has no {', '.join(missing)}")
        total = sum(size for name, size in files.items() if name in ALLOWED_FILES)
        if total > max_bytes:
            raise ResourceExhausted(
                "repo_id", f"adapter of {total} bytes exceeds the limit of {max_bytes}"
            )
        return HubListing(repo_id, revision, sha, total)

    def download(self, listing: HubListing, staged: Path) -> None:
        """Fetch the listed commit's adapter files into `staged`; refuse more bytes than listed."""
        from huggingface_hub import snapshot_download

        with _hub_errors(listing.repo_id, listing.revision):
            snapshot_download(
                listing.repo_id,
                revision=listing.sha,
                allow_patterns=list(ALLOWED_FILES),
                local_dir=str(staged),
                endpoint=self.endpoint,
                token=self._credential,
            )
        shutil.rmtree(staged / ".cache", ignore_errors=True)
        size = sum(p.stat().st_size for p in staged.iterdir() if p.is_file())
        if size > listing.size_bytes:  # the listing understated the sizes
            raise ResourceExhausted(
                "repo_id",
                f"the Hub listed {listing.size_bytes} bytes for {listing.repo_id}@"
                f"{listing.sha[:12]} but sent {size}",
            )


@contextmanager
def _hub_errors(repo_id: str, revision: str) -> Iterator[None]:
    """The Hub client's exceptions as LoRAMux errors naming the request field."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
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
