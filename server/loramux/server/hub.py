"""The Hugging Face Hub client: an adapter's files pinned to one commit.

Pulling is two steps, so the caller can reserve quota in between: `resolve` asks the Hub
which commit a revision names and what the adapter's files weigh; `download` fetches
exactly that commit. Transport-neutral; the errors are LoRAMux's own, naming the field.

The files are streamed here, not by `snapshot_download`, so every byte is counted as it
arrives: a Hub (or mirror, or proxy) that lists no sizes cannot be checked up front, and
one that lists too few must not get to write more than it listed. The caller's `arrived`
callback holds the bytes against the tenant's quota and refuses the first one over it.

Only the caller's token is sent; without one the pull is anonymous, so a tenant can never
reach private repos through credentials the server process happens to hold.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
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
CHUNK_BYTES = 1 << 20  # one read from the Hub: the quota is checked this often at most
HTTP_TIMEOUT_SECONDS = 60.0  # between two reads, not for a whole file


@dataclass(frozen=True)
class HubListing:
    """An adapter's files at one Hub commit, as the Hub lists them."""

    repo_id: str
    revision: str  # what the caller asked for (branch, tag or commit)
    sha: str  # the commit it named: 40 hex digits, checked
    files: tuple[str, ...]  # the files LoRAMux stores that the commit holds
    size_bytes: int | None  # their listed sizes; None when the Hub listed no size for some


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
        sizes = {s.rfilename: s.size for s in info.siblings or [] if s.rfilename in ALLOWED_FILES}
        missing = [f for f in REQUIRED_FILES if f not in sizes]
        if missing:
            raise FailedPrecondition("repo_id", f"{repo_id}@{sha[:12]} has no {', '.join(missing)}")
        listed = [size for size in sizes.values() if size is not None]
        total = sum(listed) if len(listed) == len(sizes) else None  # a mirror may list none
        if sum(listed) > max_bytes:
            raise ResourceExhausted(
                "repo_id", f"adapter of {sum(listed)} bytes exceeds the limit of {max_bytes}"
            )
        return HubListing(repo_id, revision, sha, tuple(sorted(sizes)), total)

    def download(
        self,
        listing: HubListing,
        staged: Path,
        max_bytes: int,
        arrived: Callable[[int], None],
    ) -> None:
        """Stream the listed commit's adapter files into `staged`, counting every byte.

        `arrived(total)` is called with the bytes received so far before each chunk is
        written (it raises to stop the pull: the tenant's quota); more than `max_bytes`,
        or more than the Hub listed, is refused at the first byte over.
        """
        import httpx
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        cap = max_bytes if listing.size_bytes is None else min(max_bytes, listing.size_bytes)
        headers = build_hf_headers(token=self._credential)
        total = 0
        with (
            _hub_errors(listing.repo_id, listing.revision),
            httpx.Client(follow_redirects=True, timeout=HTTP_TIMEOUT_SECONDS) as client,
        ):
            for name in listing.files:
                url = hf_hub_url(
                    listing.repo_id, name, revision=listing.sha, endpoint=self.endpoint
                )
                with (
                    client.stream("GET", url, headers=headers) as response,
                    (staged / name).open("wb") as out,
                ):
                    _check_status(response.status_code, listing.repo_id, name)
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        total += len(chunk)
                        if total > cap:
                            raise self._too_much(listing, total, max_bytes)
                        arrived(total)
                        out.write(chunk)

    @staticmethod
    def _too_much(listing: HubListing, total: int, max_bytes: int) -> LoramuxError:
        if listing.size_bytes is not None and total > listing.size_bytes:
            return FailedPrecondition(
                "repo_id",
                f"the Hub listed {listing.size_bytes} bytes for {listing.repo_id}@"
                f"{listing.sha[:12]} but sent more",
            )
        return ResourceExhausted(
            "repo_id", f"adapter of more than {max_bytes} bytes exceeds the limit of {max_bytes}"
        )


def _check_status(status: int, repo_id: str, name: str) -> None:
    """A file request's HTTP status as LoRAMux's error naming the field."""
    if status in (401, 403):
        raise PermissionDenied("repo_id", f"the Hub refused access to {repo_id}")
    if status == 404:
        raise NotFound("repo_id", f"{repo_id} has no {name} at the listed commit")
    if status >= 400:
        raise Unavailable("repo_id", f"the Hub answered {status} for {name}")


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
