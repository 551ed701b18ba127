"""The KV block pool: which fixed-size blocks of the KV cache each request holds.

The KV cache (kv_cache.py) is one preallocated store of `num_blocks` blocks of
`block_size` token positions. This module only does the bookkeeping, on the engine
thread, in the spirit of vLLM's block manager and SGLang's radix cache:

* a request holds a *block table*: its token at position p lives in block
  `table[p // block_size]` at offset `p % block_size`;
* full blocks are kept after their request ends, keyed by a chained digest of everything
  that determines their keys and values (the KV identity of the adapter, see
  `kv_identity`, and every token up to the end of the block), so a later request whose
  prompt starts with the same tokens on the same KV identity reuses them instead of
  recomputing them (prefix caching);
* a block is in use while any request holds it (refcount); a cached block nobody holds
  is evictable, least recently released first; a block that was never full or whose
  digest another block already has goes straight back to the free list.

The digest is SHA-256, not Python's `hash`: a prefix hit hands one request another's
keys and values, so a tenant must not be able to craft a collision.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

ROOT_DIGEST = b""


def block_digest(parent: bytes, kv_identity: bytes, tokens: Sequence[int]) -> bytes:
    """Digest of a full block: its tokens, the KV identity and (via parent) all before it."""
    h = hashlib.sha256(parent)
    h.update(kv_identity)
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


class BlockPool:
    """Allocation, refcounts and the prefix cache of the KV blocks (engine thread only)."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out block 0 first
        self._refcount = [0] * num_blocks
        self._digest: list[bytes | None] = [None] * num_blocks  # digest of a cached full block
        self._cached: dict[bytes, int] = {}  # digest -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unheld; LRU first

    # -- sizes --
    @property
    def available(self) -> int:
        """Blocks a request may take now (free, or cached but held by nobody)."""
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - self.available

    @property
    def cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- allocation --
    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks (refcount 1), evicting cached ones if needed; None if short."""
        if count > self.available:
            return None
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                digest = self._digest[block]
                assert digest is not None
                del self._cached[digest]
                self._digest[block] = None
            self._refcount[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """A request lets go of its blocks. Tail first: a prefix's last blocks age out first."""
        for block in reversed(blocks):
            self._refcount[block] -= 1
            assert self._refcount[block] >= 0, "block released more often than taken"
            if self._refcount[block] == 0:
                if self._digest[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # -- prefix cache --
    def lookup(self, digests: Sequence[bytes]) -> list[int]:
        """The cached blocks for the longest run of `digests` from the start; each now held."""
        hits: list[int] = []
        if not self.prefix_caching:
            return hits
        for digest in digests:
            block = self._cached.get(digest)
            if block is None:
                break
            if self._refcount[block] == 0:
                del self._evictable[block]
            self._refcount[block] += 1
            hits.append(block)
        return hits

    def register(self, block: int, digest: bytes) -> None:
        """Block `block` is full with the content `digest` names: offer it to later requests."""
        if not self.prefix_caching or digest in self._cached or self._digest[block] is not None:
            return  # the same content is cached already (computed twice concurrently): keep one
        self._digest[block] = digest
        self._cached[digest] = block
