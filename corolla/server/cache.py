"""Accounting of the attention cache that inference sessions hold.

Tokens are counted per batch row through all held blocks, in whole pages: a session holds
``batch x pages(tokens) x page_tokens`` of the budget (``--cache-tokens``), reserved as it grows and released as it
shrinks (a rewind) or ends. A session that needs pages when the budget is full waits, up to ``wait_s``, for other
sessions to free some; then it gets ``CacheExhaustedError`` naming what holds the cache. Nothing already held is
ever taken away from a session for another.
"""
from __future__ import annotations

import asyncio
import time
from typing import Optional

from corolla.core.errors import CacheExhaustedError


class CacheBudget:
    def __init__(self, total_tokens: int, bytes_per_token: int, page_tokens: int = 64, wait_s: float = 10.0):
        self.total_tokens = total_tokens
        self.bytes_per_token = bytes_per_token  # keys + values of one token of one row through all held blocks
        self.page_tokens = page_tokens
        self.wait_s = wait_s
        self._held: dict[object, int] = {}  # holder (a session) -> tokens it holds
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

    async def hold(self, holder, tokens: int, wait_s: Optional[float] = None) -> None:
        """Make ``holder`` hold exactly ``tokens``: release at once, or wait (up to ``wait_s``) for room to grow."""
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
        async with changed:
            while tokens - self._held.get(holder, 0) > self.free_tokens:
                left = deadline - time.monotonic()
                if left <= 0:
                    others = [h for h in self._held if h is not holder and self._held[h]]
                    raise CacheExhaustedError(
                        f"cache full: {self.held_tokens} of {self.total_tokens} tokens held by {len(others)} other "
                        f"session(s); {tokens - self._held.get(holder, 0)} more needed, waited {wait_s:.0f} s; "
                        "retry later or use another server"
                    )
                try:
                    await asyncio.wait_for(changed.wait(), left)
                except asyncio.TimeoutError:
                    pass
            self._held[holder] = tokens

    def release(self, holder) -> None:
        """``holder`` holds nothing any more."""
        self._set(holder, 0)

    def _set(self, holder, tokens: int) -> None:
        if tokens:
            self._held[holder] = tokens
        else:
            self._held.pop(holder, None)
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
