"""The paged KV cache shared by both views.

KVCache owns the tensors: per layer a pool of fixed-size KV pages
[num_blocks, page_size, kv_heads, head_dim] for keys and for values; which pages a
sequence owns is the engine's business (engine/block_manager.py), and every pass
here takes block tables and positions. Only the AR view writes; the diffusion view
reads the cached prefix. Stale entries past a sequence's cached length are never
read, because every read is bounded by it.
"""
from __future__ import annotations

import torch

from orthrus_runtime.model.config import ModelConfig


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
