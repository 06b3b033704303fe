"""CUDA graphs for the decode passes: static buffers, one graph per (view, padded
batch size, padded pass length), captured on first use and replayed after.

A decode step of a small batch launches hundreds of small kernels; replaying them as
one graph removes the per-launch host cost that otherwise sets the pace. Shapes are
padded up to buckets (batch 1, 2, 4, ..., 128; tokens 1, 2, 4, ..., 64): padding
sequences have no prefix and no valid token, so they read nothing and write nothing,
and padding tokens of a real sequence are outside its `nvalid` (masked as keys, never
written). Everything that changes from step to step travels in one int32 staging
array (prefix lengths, valid counts, draft anchors, block tables) with one
host-to-device copy per pass; the verify pass's token ids are copied on the device.

The hidden states land in one static buffer shared by all graphs (the caller applies
lm_head to the rows it needs before the next pass). Graphs share one memory pool.
"""
from __future__ import annotations

import gc
from typing import Callable, Optional, Sequence as Seq

import torch

from orthrus_runtime.defaults import BATCH_BUCKETS, TOKEN_BUCKETS
from orthrus_runtime.worker.fast_forward import FastForward

BATCH_SIZES, TOKEN_SIZES = BATCH_BUCKETS, TOKEN_BUCKETS
_ROW_START, _ROW_NVALID, _ROW_ANCHOR, _ROW_BT = 0, 1, 2, 3


def bucket(n: int, sizes: Seq[int]) -> Optional[int]:
    """The smallest size >= n, or None if n is larger than all."""
    for s in sizes:
        if s >= n:
            return s
    return None


class GraphedPasses:
    def __init__(self, fwd: FastForward, max_blocks_per_seq: int, batch_sizes: Seq[int] = BATCH_SIZES,
                 token_sizes: Seq[int] = TOKEN_SIZES, timing_replays: int = 3,
                 on_cost: Optional[Callable[[str, int, int, float], None]] = None):
        self.fwd = fwd
        self.batch_sizes, self.token_sizes = tuple(batch_sizes), tuple(token_sizes)
        self.MB, self.MT = max(batch_sizes), max(token_sizes)
        self.W = max_blocks_per_seq
        dev = fwd.model.lm_head.weight.device
        self.device = dev
        rows = _ROW_BT + self.W
        # Staging is [field rows, batch columns]: a pass copies its first 3 + w rows, all
        # columns, as one contiguous block.
        self.stage = torch.zeros(rows, self.MB, dtype=torch.int32, device=dev)
        # Pinned host buffers, two per pass kind used in turn: with pipelined decoding the host
        # stages a pass while the same kind of pass of the cycle before may still be queued.
        self.host = [torch.zeros(rows, self.MB, dtype=torch.int32).pin_memory() for _ in range(4)]
        self.host_np = [h.numpy() for h in self.host]
        self.copied: list = [None] * 4  # event after the last copy out of each host buffer
        self._turn = {"draft": 0, "verify": 2}
        self.ids = torch.zeros(self.MB, self.MT, dtype=torch.long, device=dev)
        self.out = torch.zeros(self.MB * self.MT, fwd.model.cfg.hidden_size, dtype=fwd.model.lm_head.weight.dtype,
                               device=dev)
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.timing_replays = timing_replays
        self.cost_s: dict[tuple[str, int, int], float] = {}  # (kind, bs, T) -> seconds per replay + lm_head
        self.on_cost = on_cost

    def fits(self, bs: int, T: int) -> bool:
        return bucket(bs, self.batch_sizes) is not None and bucket(T, self.token_sizes) is not None

    # -- capture ------------------------------------------------------------------------------
    def _body(self, kind: str, bs: int, T: int, mask_id: int) -> None:
        st = self.stage
        start, nvalid = st[_ROW_START, :bs], st[_ROW_NVALID, :bs]
        bt = st[_ROW_BT:, :bs].t()
        if kind == "draft":
            t = torch.arange(T, device=self.device).unsqueeze(0)
            ids = torch.where(t == 0, st[_ROW_ANCHOR, :bs].long().unsqueeze(1), torch.full_like(t, mask_id))
        else:
            ids = self.ids[:bs, :T]
        h = self.fwd.forward(ids, start, nvalid, bt, diff=(kind == "draft"))
        self.out[: bs * T].copy_(h)

    def capture(self, kind: str, bs: int, T: int, mask_id: int = 0) -> torch.cuda.CUDAGraph:
        key = (kind, bs, T, mask_id if kind == "draft" else 0)
        g = self.graphs.get(key)
        if g is not None:
            return g
        # Capture (and its warm-up, which compiles the kernels) on an all-padding batch:
        # no valid token, so nothing is written to the cache.
        self.stage[:_ROW_BT].zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body(kind, bs, T, mask_id)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        # No garbage collection inside the capture: collecting an object that owns a CUDA graph
        # or pinned memory runs CUDA calls that invalidate a capture in progress (seen on the
        # H200 as a failed cuBLAS call inside the capture, at random).
        gc.disable()
        try:
            with torch.cuda.graph(g, pool=self.pool):
                self._body(kind, bs, T, mask_id)
        finally:
            gc.enable()
        self.graphs[key] = g
        self._time(g, kind, bs, T)
        return g

    def _time(self, g: torch.cuda.CUDAGraph, kind: str, bs: int, T: int, ctx: int = 128) -> None:
        """Device time of one replay plus the lm_head over all its rows (median of a few), with a
        prefix of ctx cached tokens per sequence to attend to. The prefix reads the first blocks
        of the pool, whatever they hold; nothing is written (verify: no valid token). The token
        ids are random: the same token in every row runs compute-bound products measurably
        faster than real data does (about 20 % for the 8B shape at 1024 tokens, H200), and
        the adaptive policy would then over-speculate on large batches."""
        model = self.fwd.model
        nb = -(-ctx // self.fwd.page)
        vocab = model.cfg.vocab_size
        self.ids.random_(0, vocab)
        self.stage[_ROW_ANCHOR].random_(0, vocab)
        if nb <= min(self.W, self.fwd.kv.num_blocks):
            self.stage[_ROW_START, :bs] = ctx
            self.stage[_ROW_NVALID, :bs] = T if kind == "draft" else 0
            self.stage[_ROW_BT: _ROW_BT + nb, :bs] = torch.arange(nb, dtype=torch.int32,
                                                                   device=self.device).unsqueeze(1)
        times = []
        for _ in range(self.timing_replays):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            self.fwd.logits(self.out[: bs * T])
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        self.stage[:_ROW_BT].zero_()
        self.cost_s[(kind, bs, T)] = c = sorted(times)[len(times) // 2]
        if self.on_cost is not None:
            self.on_cost(kind, bs, T, c)

    # -- replay -------------------------------------------------------------------------------
    def run(self, kind: str, starts: Seq[int], nvalid: Seq[int], block_tables: Seq[Seq[int]], T: int,
            anchors: Optional[Seq[int]] = None, ids: Optional[torch.Tensor] = None,
            mask_id: int = 0, start_dev: Optional[torch.Tensor] = None,
            anchor_dev: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One pass of len(starts) sequences, T tokens each (padded to the buckets).
        start_dev / anchor_dev [bs]: exact starts / draft anchors already on the device (a
        chained cycle); they overwrite the staged host values (`starts` then only sizes the
        block tables, as upper bounds).
        Returns hidden [bs, T, hidden], a view of the shared output buffer (valid until the next pass)."""
        bs = len(starts)
        bsp, Tp = bucket(bs, self.batch_sizes), bucket(T, self.token_sizes)
        g = self.capture(kind, bsp, Tp, mask_id)
        base = 0 if kind == "draft" else 2
        hb = self._turn[kind] = base + (self._turn[kind] + 1 - base) % 2
        h, hn = self.host[hb], self.host_np[hb]
        ev = self.copied[hb]
        if ev is not None:
            ev.synchronize()  # the previous copy out of this host buffer has finished
        need = [-(-(s + T) // self.fwd.page) for s in starts]
        w = min(self.W, max(max(need), 1))
        hn[_ROW_START, :bs] = starts
        hn[_ROW_NVALID, :bs] = nvalid
        hn[:_ROW_BT, bs:bsp] = 0
        if anchors is not None:
            hn[_ROW_ANCHOR, :bs] = anchors
        for i, tbl in enumerate(block_tables):
            row = tbl[:w]
            hn[_ROW_BT: _ROW_BT + len(row), i] = row
        rows = _ROW_BT + w
        self.stage[:rows].copy_(h[:rows], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.copied[hb] = ev
        if start_dev is not None:
            self.stage[_ROW_START, :bs].copy_(start_dev)
        if anchor_dev is not None:
            self.stage[_ROW_ANCHOR, :bs].copy_(anchor_dev)
        if ids is not None:
            self.ids[:bs, : ids.shape[1]].copy_(ids)
        g.replay()
        return self.out[: bsp * Tp].view(bsp, Tp, -1)[:bs, :T]
