"""BlockManager: hands KV pages ("blocks") to sequences, a block table each.

Rolling back rejected tokens is `truncate`, which frees the pages that became empty;
the stale entries inside the last kept page are never read, because every read is
bounded by the sequence's cached length.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orthrus_runtime.engine.sequence import Sequence


class BlockManager:
    """Free-list allocator of KV blocks. `can_allocate` / `allocate` come in pairs."""

    def __init__(self, num_blocks: int, page_size: int):
        self.num_blocks = num_blocks
        self.page_size = page_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks if self.num_blocks else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def num_new_blocks(self, seq: "Sequence", num_tokens: int) -> int:
        """Blocks seq still needs so that its table covers num_tokens positions."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: "Sequence", num_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_tokens) <= self.num_free

    def allocate(self, seq: "Sequence", num_tokens: int) -> None:
        n = self.num_new_blocks(seq, num_tokens)
        if n > self.num_free:
            raise RuntimeError("allocate() without a successful can_allocate()")
        for _ in range(n):
            seq.block_table.append(self.free_blocks.popleft())

    def truncate(self, seq: "Sequence", num_tokens: int) -> None:
        """Keep only the blocks covering positions [0, num_tokens); free the rest."""
        keep = self.blocks_for(num_tokens)
        while len(seq.block_table) > keep:
            self.free_blocks.append(seq.block_table.pop())

    def free(self, seq: "Sequence") -> None:
        self.truncate(seq, 0)
