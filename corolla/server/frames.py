"""``FrameBudget``: the bytes of request frames a server holds at once, from a frame's first byte until the request
it carries is answered (a unary request) or the next step is read (a session or push stream).

Without it, many streams each sending a large frame, all at once or half-way and slowly, could hold any amount of
memory. A frame that does not fit is read and dropped (never held) and its sender gets ``ServerBusyError``; a
client takes that as this server's failure and uses another. While other peers hold frame bytes here, one peer may
hold at most ``peer_share`` of the budget, so one peer cannot crowd the others out.
"""
from __future__ import annotations

from corolla.server.sessions import ServerBusyError


class FrameBudget:
    def __init__(self, limit_bytes: int, peer_share: float = 0.5):
        if limit_bytes <= 0 or not 0 < peer_share <= 1:
            raise ValueError("a frame budget needs a positive limit and a share in (0, 1]")
        self.limit_bytes = limit_bytes
        self.peer_share = peer_share
        self.used = 0
        self.by_peer: dict[str, int] = {}

    def acquire(self, peer: str, size: int) -> "FrameReservation":
        """Hold ``size`` bytes for ``peer``, or raise ``ServerBusyError`` saying why not."""
        if self.used + size > self.limit_bytes:
            raise ServerBusyError(f"server busy: {self.used} bytes of request frames held here, a frame of {size} "
                                  f"bytes would pass the limit of {self.limit_bytes}; retry later or elsewhere")
        mine = self.by_peer.get(peer, 0)
        others = self.used - mine
        if others and mine + size > self.peer_share * self.limit_bytes:
            raise ServerBusyError(f"your frames here would hold {mine + size} bytes while other peers wait, more than "
                                  f"your share ({self.peer_share:.0%} of {self.limit_bytes} bytes)")
        self.used += size
        self.by_peer[peer] = mine + size
        return FrameReservation(self, peer, size)

    def _release(self, peer: str, size: int) -> None:
        self.used -= size
        left = self.by_peer[peer] - size
        if left:
            self.by_peer[peer] = left
        else:
            del self.by_peer[peer]


class FrameReservation:
    def __init__(self, budget: FrameBudget, peer: str, size: int):
        self._budget, self._peer, self.size = budget, peer, size
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._budget._release(self._peer, self.size)
