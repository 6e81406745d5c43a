"""``FrameBudget``: the bytes of request frames a server holds at once, from a frame's first byte until the request
it carries is answered (a unary request) or the next step is read (a session or push stream).

Without it, many streams each sending a large frame, all at once or half-way and slowly, could hold any amount of
memory. A frame is held as its bytes arrive, a part at a time (``corolla.wire.framing.HOLD_PART_BYTES``), never by
the size its prefix declares: a peer that declares huge frames and sends nothing more holds one part per stream,
so it cannot take the budget from others without sending the bytes (a slowloris). A frame that does not fit, at
its start or part-way, is read to its end and dropped (nothing of it held) and its sender gets ``ServerBusyError``;
a client takes that as this server's failure and uses another. While other peers hold frame bytes here, one peer
may hold at most ``peer_share`` of the budget, so one peer cannot crowd the others out.
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

    def reservation(self, peer: str) -> "FrameReservation":
        """An empty reservation of ``peer``'s, grown as a frame's bytes arrive (``read_message``'s ``hold``)."""
        return FrameReservation(self, peer)

    def _take(self, peer: str, size: int, frame_bytes: int) -> None:
        """Hold ``size`` more bytes for ``peer``, whose frame holds ``frame_bytes`` already, or raise
        ``ServerBusyError`` saying why not."""
        if self.used + size > self.limit_bytes:
            raise ServerBusyError(f"server busy: {self.used} bytes of request frames held here, {size} more for your "
                                  f"frame (past its first {frame_bytes}) would pass the limit of {self.limit_bytes}; "
                                  "retry later or elsewhere")
        mine = self.by_peer.get(peer, 0)
        others = self.used - mine
        if others and mine + size > self.peer_share * self.limit_bytes:
            raise ServerBusyError(f"your frames here would hold {mine + size} bytes while other peers wait, more than "
                                  f"your share ({self.peer_share:.0%} of {self.limit_bytes} bytes)")
        self.used += size
        self.by_peer[peer] = mine + size

    def _release(self, peer: str, size: int) -> None:
        self.used -= size
        left = self.by_peer[peer] - size
        if left:
            self.by_peer[peer] = left
        else:
            del self.by_peer[peer]


class FrameReservation:
    """What one frame of one peer holds of the budget: grows as its bytes arrive, released at once."""

    def __init__(self, budget: FrameBudget, peer: str):
        self._budget, self._peer = budget, peer
        self.size = 0

    def grow(self, size: int) -> None:
        """Hold ``size`` more bytes; if the budget refuses them, the frame is dropped, so this holds nothing more
        either (what arrived of it is not kept) and the ``ServerBusyError`` is raised."""
        try:
            self._budget._take(self._peer, size, self.size)
        except ServerBusyError:
            self.release()
            raise
        self.size += size

    def release(self) -> None:
        """Hold nothing (again): the frame was answered, dropped or cut off."""
        if self.size:
            self._budget._release(self._peer, self.size)
            self.size = 0
