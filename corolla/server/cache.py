"""Accounting of attention-cache memory reserved by inference sessions."""
from __future__ import annotations

from corolla.core.errors import CacheExhaustedError


class CacheBudget:
    """Tokens (of one batch row, through all held blocks) that sessions may reserve.

    A session reserves ``max_length * batch_size`` tokens when it opens and releases them when it ends, so a
    server never promises more cache than it has configured.
    """

    def __init__(self, total_tokens: int, bytes_per_token: int):
        self.total_tokens = total_tokens
        self.bytes_per_token = bytes_per_token
        self._reserved = 0

    @property
    def free_tokens(self) -> int:
        return self.total_tokens - self._reserved

    def reserve(self, tokens: int) -> None:
        if tokens > self.total_tokens:
            raise CacheExhaustedError(
                f"a session of {tokens} cache tokens (max_length x batch) exceeds this server's whole cache of "
                f"{self.total_tokens} tokens ({self.total_tokens * self.bytes_per_token / 2**20:.0f} MiB); "
                f"ask for a smaller max_length or batch"
            )
        if tokens > self.free_tokens:
            raise CacheExhaustedError(
                f"cache is busy: {tokens} tokens requested, {self.free_tokens} of {self.total_tokens} free; "
                f"retry later or use another server"
            )
        self._reserved += tokens

    def release(self, tokens: int) -> None:
        self._reserved = max(0, self._reserved - tokens)
