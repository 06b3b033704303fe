"""The paged KV cache shared by both views.

KVCache owns the tensors: per layer a pool of fixed-size blocks
[num_blocks, page_size, kv_heads, head_dim] for keys and for values. BlockManager
hands blocks to sequences (a block table each). Only the AR view writes; the
diffusion view reads the cached prefix. Rolling back rejected tokens is
`BlockManager.truncate`, which frees the blocks that became empty; the stale
entries inside the last kept block are never read, because every read is
bounded by the sequence's cached length.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import torch

from .config import ModelConfig

if TYPE_CHECKING:
    from .sequence import Sequence


def bytes_per_block(cfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * elem


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, page_size: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.num_layers, num_blocks, page_size, cfg.num_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.page_size = page_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [n] flat slot ids; k/v [n, Hkv, d]."""
        kl = self.k[layer].view(-1, *self.k.shape[-2:])
        vl = self.v[layer].view(-1, *self.v.shape[-2:])
        kl.index_copy_(0, slots, k)
        vl.index_copy_(0, slots, v)

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_tables [bs, nb] -> k, v [bs, nb*page, Hkv, d] (positions 0..nb*page-1)."""
        bs, nb = block_tables.shape
        k = self.k[layer][block_tables].reshape(bs, nb * self.page_size, *self.k.shape[-2:])
        v = self.v[layer][block_tables].reshape(bs, nb * self.page_size, *self.v.shape[-2:])
        return k, v


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
