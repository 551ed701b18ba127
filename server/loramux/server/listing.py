"""Pages of adapter names and versions: keyset order, signed page tokens.

A page is read with an index range (the primary key (owner, name), or (public, owner,
name) for public adapters), after the last key of the previous page, so the first page
costs the same at 1,000 or 100,000 adapters (bench/listing.py measures it). A page token
carries that last key and a hash of the query it belongs to, signed with the registry's
secret (HMAC-SHA256, shared by every replica through the database): a token altered, or
given with another query (other filters, another caller), is INVALID_ARGUMENT naming
`page_token`, never a page of something else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import asdict, dataclass

from loramux.core.errors import InvalidArgument

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_TOKEN_CHARS = 1024


@dataclass(frozen=True)
class AdapterQuery:
    """What a caller lists: its own and public names, narrowed by these filters."""

    tenant: str
    name_prefix: str = ""
    owner: str = ""
    public: bool | None = None  # None: both
    source: str = ""  # "" (any) | "upload" | "hub": names with a version from it

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def page_size(requested: int, field: str = "page_size") -> int:
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    if not 0 < requested <= MAX_PAGE_SIZE:
        raise InvalidArgument(field, f"must be in 1..{MAX_PAGE_SIZE}, got {requested}")
    return requested


class PageTokens:
    """Signs and checks page tokens: (query fingerprint, last key) under the secret."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, payload, hashlib.sha256).digest()[:16]

    def make(self, query: str, after: list[object]) -> str:
        payload = json.dumps([query, after], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(self._mac(payload) + payload).decode().rstrip("=")

    def read(self, token: str, query: str, field: str = "page_token") -> list[object] | None:
        """The last key a token carries; None for no token; INVALID_ARGUMENT if not ours."""
        if not token:
            return None
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidArgument(field, "not a page token of this server")
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except ValueError:
            raise InvalidArgument(field, "not a page token of this server") from None
        mac, payload = raw[:16], raw[16:]
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise InvalidArgument(field, "not a page token of this server (altered?)")
        made_for, after = json.loads(payload)
        if made_for != query:
            raise InvalidArgument(field, "this page token belongs to another query")
        return list(after)
