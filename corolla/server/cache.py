"""Accounting of the attention cache that inference sessions hold.

Tokens are counted per batch row through all held blocks, in whole pages: a session holds
``batch x pages(tokens) x page_tokens`` of the budget (``--cache-tokens``), reserved as it grows and released as it
shrinks (a rewind) or ends. A session that needs pages when the budget is full waits, up to ``wait_s``, for other
sessions to free some; then it gets ``CacheExhaustedError`` naming what holds the cache. Nothing already held is
ever taken away from a session for another. Fair shares: while sessions of other peers hold cache or wait for it,
one peer's sessions together may hold at most ``max_share`` of the budget (alone, a peer may use all of it).
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional

from corolla.core.errors import CacheExhaustedError


class CacheBudget:
    def __init__(self, total_tokens: int, bytes_per_token: int, page_tokens: int = 64, wait_s: float = 10.0,
                 max_share: float = 1.0):
        self.total_tokens = total_tokens
        self.bytes_per_token = bytes_per_token  # keys + values of one token of one row through all held blocks
        self.page_tokens = page_tokens
        self.wait_s = wait_s
        self.max_share = max_share
        self._held: dict[object, int] = {}  # holder (a session) -> tokens it holds
        self._owner: dict[object, str] = {}  # holder -> the peer it belongs to
        self._waiting: dict[str, int] = {}  # peer -> its holders waiting for room
        self._changed: Optional[asyncio.Condition] = None

    @property
    def held_tokens(self) -> int:
        return sum(self._held.values())

    @property
    def free_tokens(self) -> int:
        return self.total_tokens - self.held_tokens

    def tokens_for(self, tokens: int, batch: int) -> int:
        """What holding ``tokens`` tokens of ``batch`` rows costs, in whole pages."""
        return batch * -(-tokens // self.page_tokens) * self.page_tokens

    def held_by(self, holder) -> int:
        return self._held.get(holder, 0)

    def held_by_owner(self, owner: str) -> int:
        return sum(t for h, t in self._held.items() if self._owner.get(h) == owner)

    def _over_share(self, holder, tokens: int, owner: Optional[str]) -> bool:
        """Whether ``owner`` would hold more than its share while other peers hold or wait."""
        if owner is None or self.max_share >= 1.0:
            return False
        others = any(self._owner.get(h) != owner for h, t in self._held.items() if t) or \
            any(count for peer, count in self._waiting.items() if peer != owner)
        after = self.held_by_owner(owner) - self._held.get(holder, 0) + tokens
        return others and after > self.max_share * self.total_tokens

    async def hold(self, holder, tokens: int, wait_s: Optional[float] = None, owner: Optional[str] = None) -> None:
        """Make ``holder`` (of peer ``owner``) hold exactly ``tokens``: release at once, or wait (up to ``wait_s``) for
        room to grow."""
        if owner is not None:
            self._owner[holder] = owner
        owner = self._owner.get(holder)
        current = self._held.get(holder, 0)
        if tokens <= current:
            self._set(holder, tokens)
            return
        if tokens > self.total_tokens:
            raise CacheExhaustedError(
                f"a session of {tokens} cache tokens exceeds this server's whole cache of {self.total_tokens} tokens "
                f"({self.total_tokens * self.bytes_per_token / 2**20:.0f} MiB); ask for a smaller length or batch"
            )
        wait_s = self.wait_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        changed = self._condition()
        if owner is not None:
            self._waiting[owner] = self._waiting.get(owner, 0) + 1
        try:
            async with changed:
                while tokens - self._held.get(holder, 0) > self.free_tokens or self._over_share(holder, tokens, owner):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._refusal(holder, tokens, owner, wait_s)
                    try:
                        await asyncio.wait_for(changed.wait(), left)
                    except asyncio.TimeoutError:
                        pass
                self._held[holder] = tokens
        finally:
            if owner is not None:
                self._waiting[owner] -= 1

    def _refusal(self, holder, tokens: int, owner: Optional[str], wait_s: float) -> CacheExhaustedError:
        if self._over_share(holder, tokens, owner):
            return CacheExhaustedError(
                f"your sessions hold {self.held_by_owner(owner)} of {self.total_tokens} cache tokens here; while "
                f"others use this server one peer may hold at most {self.max_share:.0%} (waited {wait_s:.0f} s)"
            )
        others = [h for h in self._held if h is not holder and self._held[h]]
        return CacheExhaustedError(
            f"cache full: {self.held_tokens} of {self.total_tokens} tokens held by {len(others)} other session(s); "
            f"{tokens - self._held.get(holder, 0)} more needed, waited {wait_s:.0f} s; retry later or use another "
            "server"
        )

    def release(self, holder) -> None:
        """``holder`` holds nothing any more."""
        self._set(holder, 0)

    def _set(self, holder, tokens: int) -> None:
        if tokens:
            self._held[holder] = tokens
        else:
            self._held.pop(holder, None)
            self._owner.pop(holder, None)
        if self._changed is not None:  # someone may be waiting for room
            try:
                asyncio.get_running_loop().create_task(self._notify())
            except RuntimeError:  # no event loop: nobody can be waiting
                pass

    async def _notify(self) -> None:
        async with self._condition():
            self._condition().notify_all()

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed
