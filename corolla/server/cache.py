"""Accounting of the attention cache that inference sessions hold.

Tokens are counted per batch row through all held blocks, in whole pages: a session holds
``batch x pages(tokens) x page_tokens`` of the budget (``--cache-tokens``), reserved as it grows and released as it
shrinks (a rewind) or ends. A session that needs pages when the budget is full waits, up to ``wait_s``, for other
sessions to free some; then it gets ``CacheExhaustedError`` naming what holds the cache. Nothing already held is
ever taken away from a session for another. Fair shares: while sessions of other peers hold cache or wait for it,
one peer's sessions together may hold at most ``max_share`` of the budget. Alone, a peer's sessions may grow to all
of it by the tokens their steps bring (each page past a row's first is paid for with the tokens that fill it), but a
session opens only while its peer's sessions, with its first page, hold at most that share (``opening_cap``) even
alone: an opening costs no compute, yet reserves a page for every row of its batch, so without this one
``OpenSession`` of batch 512 (or a few of 256) took a quiet server's whole cache for nothing, and every session
opened after it waited, then failed.
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

    @property
    def opening_cap(self) -> int:
        """The most one peer's sessions may hold, with a new session's first page, for it to open (alone or not):
        its share, and at least a page (a server with a tiny cache still takes a session of one row)."""
        return self.total_tokens if self.max_share >= 1.0 else \
            max(int(self.max_share * self.total_tokens), self.page_tokens)

    @property
    def max_session_batch(self) -> int:
        """The largest batch a session may open with: its first page, a page per row, fits ``opening_cap``."""
        return self.opening_cap // self.page_tokens

    def _over_share(self, holder, tokens: int, owner: Optional[str], opening: bool = False) -> bool:
        """Whether ``owner`` would hold more than its share while other peers hold or wait (or, ``opening`` a
        session, more than ``opening_cap`` at all)."""
        if owner is None or self.max_share >= 1.0:
            return False
        after = self.held_by_owner(owner) - self._held.get(holder, 0) + tokens
        if opening and after > self.opening_cap:
            return True
        others = any(self._owner.get(h) != owner for h, t in self._held.items() if t) or \
            any(count for peer, count in self._waiting.items() if peer != owner)
        return others and after > self.max_share * self.total_tokens

    async def hold(self, holder, tokens: int, wait_s: Optional[float] = None, owner: Optional[str] = None,
                   opening: bool = False) -> None:
        """Make ``holder`` (of peer ``owner``) hold exactly ``tokens``: release at once, or wait (up to ``wait_s``) for
        room to grow. ``opening``: these are a new session's first page, which must keep its peer within
        ``opening_cap`` even with nobody else here."""
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
                while tokens - self._held.get(holder, 0) > self.free_tokens or \
                        self._over_share(holder, tokens, owner, opening):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._refusal(holder, tokens, owner, wait_s, opening)
                    try:
                        await asyncio.wait_for(changed.wait(), left)
                    except asyncio.TimeoutError:
                        pass
                self._held[holder] = tokens
        finally:
            if owner is not None:
                self._waiting[owner] -= 1

    def _refusal(self, holder, tokens: int, owner: Optional[str], wait_s: float,
                 opening: bool = False) -> CacheExhaustedError:
        if opening and self._over_share(holder, tokens, owner, opening) and not self._over_share(holder, tokens, owner):
            return CacheExhaustedError(
                f"your sessions hold {self.held_by_owner(owner)} of {self.total_tokens} cache tokens here, "
                f"{tokens - self._held.get(holder, 0)} more with a new session's first page: past {self.opening_cap}, "
                f"the most one peer's sessions may hold for one to open ({self.max_share:.0%}, even alone: they may "
                f"grow past it by the tokens of their steps, not by opening sessions; waited {wait_s:g} s)"
            )
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
