"""Half-open ranges of transformer blocks."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class BlockRange:
    """Blocks ``start`` (inclusive) to ``end`` (exclusive), numbered as in the full model."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end):
            raise ValueError(f"a block range needs 0 <= start < end, got {self.start}:{self.end}")

    @classmethod
    def parse(cls, text: str) -> "BlockRange":
        """Parse ``"START:END"`` (half-open), as given on the command line."""
        try:
            start_text, end_text = text.split(":")
            return cls(int(start_text), int(end_text))
        except ValueError as exc:
            raise ValueError(f"blocks must look like START:END with 0 <= START < END, got {text!r}") from exc

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and self.start <= block < self.end

    def covers(self, other: "BlockRange") -> bool:
        return self.start <= other.start and other.end <= self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"
