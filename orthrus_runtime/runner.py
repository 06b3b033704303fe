"""ModelRunner: owns the weights and the KV tensors, runs the three kinds of pass
over padded batches of sequences.

- prefill: AR view over prompt chunks, writes K/V;
- draft: diffusion view over [anchor, MASK x (B-1)], reads the cached prefix, writes nothing;
- verify: AR view over [anchor, drafts...], writes K/V (rolled back by the caller).

Attention here is the portable torch path (gather the block tables, SDPA with a
mask). Faster backends plug in as other `Attend` strategies.
"""
from __future__ import annotations

from typing import Sequence as Seq

import torch

from .kv_cache import KVCache
from .model import DualViewModel, sdpa
from .sequence import Sequence


class PagedAR:
    """AR view over the paged cache: write this pass's K/V, then attend causally."""

    def __init__(self, kv: KVCache, slots: torch.Tensor, valid: torch.Tensor, block_tables: torch.Tensor,
                 positions: torch.Tensor, scale: float):
        # slots [n_valid] flat slot ids of valid tokens; valid [bs, T] bool;
        # block_tables [bs, nb]; positions [bs, T] (padding rows: 0).
        self.kv, self.slots, self.valid, self.bt, self.scale = kv, slots, valid, block_tables, scale
        S = block_tables.shape[1] * kv.page_size
        self.mask = torch.arange(S, device=positions.device).view(1, 1, S) <= positions.unsqueeze(-1)

    def __call__(self, layer, q, k, v):
        self.kv.write(layer, self.slots, k[self.valid], v[self.valid])
        K, V = self.kv.gather(layer, self.bt)
        return sdpa(q, K, V, self.mask, self.scale)


class PagedDraft:
    """Diffusion view: the cached prefix [0, ctx_len) plus its own block, bidirectional."""

    def __init__(self, kv: KVCache, block_tables: torch.Tensor, ctx_lens: torch.Tensor, T: int, scale: float):
        self.kv, self.bt, self.scale = kv, block_tables, scale
        S = block_tables.shape[1] * kv.page_size
        bs = ctx_lens.shape[0]
        ctx = (torch.arange(S, device=ctx_lens.device).view(1, 1, S) < ctx_lens.view(bs, 1, 1)).expand(bs, T, S)
        own = torch.ones(bs, T, T, dtype=torch.bool, device=ctx_lens.device)
        self.mask = torch.cat([ctx, own], dim=-1)

    def __call__(self, layer, q, k, v):
        K, V = self.kv.gather(layer, self.bt)
        return sdpa(q, torch.cat([K, k], dim=1), torch.cat([V, v], dim=1), self.mask, self.scale)


class ModelRunner:
    def __init__(self, model: DualViewModel, kv: KVCache, device: torch.device):
        self.model = model
        self.kv = kv
        self.device = device
        self.page = kv.page_size

    def _block_tables(self, seqs: Seq[Sequence], num_positions: list[int]) -> torch.Tensor:
        nb = max(max(-(-n // self.page), 1) for n in num_positions)
        rows = [s.block_table[:nb] + [0] * (nb - min(nb, len(s.block_table))) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _slots(self, seq: Sequence, start: int, n: int) -> list[int]:
        return [seq.block_table[p // self.page] * self.page + p % self.page for p in range(start, start + n)]

    @torch.inference_mode()
    def run_ar(self, seqs: Seq[Sequence], tokens: list[list[int]], starts: list[int],
               logits_at: list[list[int]]) -> list[torch.Tensor]:
        """AR pass: seq i gets tokens[i] at positions starts[i].. (K/V written there).
        Returns, per seq, float32 logits [len(logits_at[i]), V] at those row offsets."""
        bs, T = len(seqs), max(len(t) for t in tokens)
        ids = torch.zeros(bs, T, dtype=torch.long)
        pos = torch.zeros(bs, T, dtype=torch.long)
        valid = torch.zeros(bs, T, dtype=torch.bool)
        slots: list[int] = []
        for i, (s, t, st) in enumerate(zip(seqs, tokens, starts)):
            n = len(t)
            ids[i, :n] = torch.tensor(t)
            pos[i, :n] = torch.arange(st, st + n)
            valid[i, :n] = True
            slots += self._slots(s, st, n)
        bt = self._block_tables(seqs, [st + len(t) for st, t in zip(starts, tokens)])
        dev = self.device
        ids, pos, valid = ids.to(dev), pos.to(dev), valid.to(dev)
        attend = PagedAR(self.kv, torch.tensor(slots, dtype=torch.long, device=dev), valid, bt, pos, self.model.scale)
        hidden = self.model.forward_hidden(ids, pos, attend, diff=False)
        rows = [torch.as_tensor(r, dtype=torch.long, device=dev) for r in logits_at]
        flat = torch.cat([hidden[i, r] for i, r in enumerate(rows)], dim=0)
        logits = self.model.logits(flat)
        return list(logits.split([len(r) for r in logits_at]))

    @torch.inference_mode()
    def run_draft(self, seqs: Seq[Sequence], anchors: list[int], block_size: int, mask_id: int,
                  num_logits: int) -> torch.Tensor:
        """Diffusion pass over [anchor, MASK x (B-1)] at positions num_cached..;
        returns float32 logits [bs, num_logits, V] of block rows 0..num_logits-1."""
        bs, B = len(seqs), block_size
        dev = self.device
        ids = torch.full((bs, B), mask_id, dtype=torch.long)
        ids[:, 0] = torch.tensor(anchors)
        ctx = torch.tensor([s.num_cached for s in seqs], dtype=torch.long)
        pos = ctx.unsqueeze(1) + torch.arange(B).unsqueeze(0)
        bt = self._block_tables(seqs, [s.num_cached for s in seqs])
        ids, pos, ctx = ids.to(dev), pos.to(dev), ctx.to(dev)
        attend = PagedDraft(self.kv, bt, ctx, B, self.model.scale)
        hidden = self.model.forward_hidden(ids, pos, attend, diff=True)
        return self.model.logits(hidden[:, :num_logits])
