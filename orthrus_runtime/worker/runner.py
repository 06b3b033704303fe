"""ModelRunner: owns the weights and the KV tensors, runs the three kinds of pass
over padded batches. A batch is block tables and positions (cached lengths): the runner
never sees the engine's Sequence objects.

- prefill: AR view over prompt chunks, writes K/V;
- draft: diffusion view over [anchor, MASK x (D-1)], reads the cached prefix, writes nothing;
- verify: AR view over [anchor, drafts...], writes K/V (rolled back by the caller).

Every pass runs `fast_forward.FastForward` (packed projections, fused ops) with an op set
chosen by `fast_forward.make_ops`: the Triton kernels or flash-attn on CUDA, plain torch
(`TorchOps`, the one eager reference the kernels are tested against) elsewhere; on CUDA the
decode passes replay CUDA graphs at padded batch sizes (`cuda_graphs.GraphedPasses`).
The dense decoder of spec/reference.py is the definition all of it is tested against.

Pass costs are recorded in `self.costs` (graph replay times on CUDA, wall-clock on the
CPU) for the adaptive verify planner.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence as Seq

import torch

from orthrus_runtime.model.dual_view import DualViewModel
from orthrus_runtime.worker.cuda_graphs import bucket
from orthrus_runtime.worker.fast_forward import FastForward, make_ops
from orthrus_runtime.worker.kv_cache import KVCache
from orthrus_runtime.worker.pass_costs import PassCosts

# An AR pass of at most this many tokens (batch x length) replays verify graphs chunk by chunk
# instead of running eager (ModelRunner.prefill_graph_lengths).
GRAPHED_PREFILL_TOKENS = 1024


def _to(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A fresh host tensor on dev without waiting for the device: a pageable copy is staged at
    once, while a blocking one would first wait for every pass queued ahead on the stream (a
    pipelined decode cycle), stalling the host that should be preparing the next. The host
    tensor must not be written afterwards (callers build a new one per pass)."""
    return t.to(dev, non_blocking=True)


def _padded_ids(tokens: list[list[int]], T: int, dev: torch.device) -> torch.Tensor:
    """[len(tokens), T] token ids on dev, each row zero-padded past its sequence's tokens."""
    ids = torch.zeros(len(tokens), T, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = torch.tensor(t)
    return _to(ids, dev)


class ModelRunner:
    def __init__(self, model: DualViewModel, kv: KVCache, device: torch.device,
                 cuda_graphs: Optional[bool] = None, max_model_len: Optional[int] = None, ops=None,
                 attention_backend: str = "auto", graphed_prefill_tokens: int = GRAPHED_PREFILL_TOKENS):
        """cuda_graphs: None = on for CUDA. ops: the op set (default:
        `fast_forward.make_ops(attention_backend)`). graphed_prefill_tokens: the largest AR pass
        (batch x length) that replays captured verify graphs (prefill_graph_lengths); 0: never."""
        self.model = model
        self.kv = kv
        self.device = device
        self.graphed_prefill_tokens = graphed_prefill_tokens
        self.page = kv.page_size
        self.costs = PassCosts()
        self.graphs = None
        self.fast = FastForward(model, kv, ops if ops is not None else make_ops(attention_backend, device, model))
        use_graphs = cuda_graphs if cuda_graphs is not None else device.type == "cuda"
        if use_graphs and device.type == "cuda" and self.fast.ops.graphable:
            from orthrus_runtime.worker.cuda_graphs import GraphedPasses

            max_len = max_model_len or model.cfg.max_position_embeddings
            costs = self.costs  # not self: a runner <-> graphs cycle would leave dead graphs to the
            # garbage collector, which may then destroy them in the middle of another capture
            self.graphs = GraphedPasses(self.fast, -(-(max_len + 64) // self.page),
                                        on_cost=lambda k, b, t, c: costs.record(k, b, t, c, replace=True))
        self._timed = device.type == "cpu"  # wall-clock is device time only on the CPU

    @property
    def backend(self) -> str:
        return f"{self.fast.ops.name}{'+cuda-graphs' if self.graphs is not None else ''}"

    def capture_graphs(self, batch_sizes: Seq[int], token_sizes: Seq[int], mask_id: int,
                       kinds: Seq[str] = ("verify", "draft")) -> int:
        """Capture ahead (instead of on first use) and record each pass's measured cost.
        Returns the number of graphs held."""
        if self.graphs is None:
            return 0
        for bs in sorted(batch_sizes, reverse=True):
            for T in sorted(token_sizes, reverse=True):
                for kind in kinds:
                    if kind == "draft" and T < 2:
                        continue
                    self.graphs.capture(kind, bs, T, mask_id)
        return len(self.graphs.graphs)

    # -- helpers -----------------------------------------------------------------------------
    def _meta(self, tables: Seq[list[int]], starts: list[int], nvalid: list[int], T: int,
              start_dev: Optional[torch.Tensor] = None):
        """Device tensors of an eager pass: start, nvalid [bs] int32, block tables [bs, w] int32.
        start_dev: the exact starts, already on the device (`starts` are then upper bounds)."""
        w = max(max(-(-(s + T) // self.page) for s in starts), 1)
        bt = torch.zeros(len(tables), w, dtype=torch.int32)
        for i, t in enumerate(tables):
            row = t[:w]
            bt[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
        dev = self.device
        start = start_dev if start_dev is not None else _to(torch.tensor(starts, dtype=torch.int32), dev)
        return start, _to(torch.tensor(nvalid, dtype=torch.int32), dev), _to(bt, dev)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [bs, n, h] (any strides) -> float32 logits [bs, n, V]. Flattened to one matrix
        product first: lm_head on a strided 3-D view runs as a per-sequence batched product
        that reads the whole vocabulary matrix once per sequence."""
        bs, n, h = hidden.shape
        return self._head(hidden.reshape(bs * n, h)).view(bs, n, -1)

    def _head(self, flat: torch.Tensor) -> torch.Tensor:
        """flat [n, hidden] -> float32 logits [n, V]."""
        return self.fast.logits(flat)

    def _record(self, kind: str, bs: int, T: int, t0: float) -> None:
        if self._timed:
            self.costs.record(kind, bs, T, time.perf_counter() - t0)

    # -- passes ------------------------------------------------------------------------------
    @torch.inference_mode()
    def run_ar(self, tables: Seq[list[int]], tokens: list[list[int]], starts: list[int],
               logits_at: list[list[int]]) -> list[torch.Tensor]:
        """AR pass: sequence i (block table tables[i]) gets tokens[i] at positions starts[i]..
        (K/V written there). Returns, per sequence, float32 logits [len(logits_at[i]), V] at
        those row offsets."""
        bs, T = len(tables), max(len(t) for t in tokens)
        lengths = self.prefill_graph_lengths(bs, T)
        if lengths:
            return self._run_ar_graphed(tables, tokens, starts, logits_at, lengths)
        return self._run_ar_eager(tables, tokens, starts, logits_at)

    @torch.inference_mode()
    def _run_ar_eager(self, tables: Seq[list[int]], tokens: list[list[int]], starts: list[int],
                      logits_at: list[list[int]]) -> list[torch.Tensor]:
        """One eager pass over the whole batch (the reference the graphed prefill is tested against)."""
        bs, T = len(tables), max(len(t) for t in tokens)
        dev = self.device
        start, nvalid, bt = self._meta(tables, starts, [len(t) for t in tokens], T)
        hidden = self.fast.forward(_padded_ids(tokens, T, dev), start, nvalid, bt, diff=False).view(bs, T, -1)
        rows = [_to(torch.as_tensor(r, dtype=torch.long), dev) for r in logits_at]
        flat = torch.cat([hidden[i, r] for i, r in enumerate(rows)], dim=0)
        logits = self._head(flat)
        return list(logits.split([len(r) for r in logits_at]))

    def prefill_graph_lengths(self, bs: int, T: int) -> list[int]:
        """The pass lengths, ascending, of the verify graphs captured at warm-up for bs sequences'
        padded batch, through which an AR pass of bs sequences and T tokens at most runs chunk
        by chunk; empty: it runs as one eager pass.

        Rule: graphed only while the pass is launch-bound (bs * T <= graphed_prefill_tokens). An
        eager pass of a small model costs about 10 ms of host launches whatever its length
        (benchmarks/results/2026-12-02-h200-admission-cost-eager-prefill.json), and every running
        sequence waits for it at each admission; a replay costs one launch. The verify graph is
        the same AR pass, writing K/V for the valid tokens alone. Only graphs captured at warm-up
        are used: a capture while serving would stall every running request."""
        g = self.graphs
        if g is None or bs * T > self.graphed_prefill_tokens:
            return []
        bsp = bucket(bs, g.batch_sizes)
        if bsp is None:
            return []
        return sorted({k[2] for k in g.graphs if k[0] == "verify" and k[1] == bsp})

    @torch.inference_mode()
    def _run_ar_graphed(self, tables: Seq[list[int]], tokens: list[list[int]], starts: list[int],
                        logits_at: list[list[int]], lengths: list[int]) -> list[torch.Tensor]:
        """run_ar through captured verify graphs: chunks of the longest captured length, the last
        one at the shortest captured length that holds it. Same results as _run_ar_eager."""
        bs, T = len(tables), max(len(t) for t in tokens)
        dev = self.device
        ids = _padded_ids(tokens, T, dev)
        lens = [len(t) for t in tokens]
        want = [sorted(set(r)) for r in logits_at]
        got: list[dict[int, torch.Tensor]] = [{} for _ in range(bs)]
        longest = lengths[-1]
        for off in range(0, T, longest):
            w = min(longest, T - off)
            Tc = next(n for n in lengths if n >= w)  # a captured length: padding rows are invalid
            nvalid = [max(0, min(n - off, w)) for n in lens]
            # A sequence whose tokens ended in an earlier chunk takes no token (reads its prefix,
            # writes nothing); its start stays inside its block table.
            st = [s + min(off, n) for s, n in zip(starts, lens)]
            hidden = self.graphs.run("verify", st, nvalid, list(tables), Tc, ids=ids[:, off: off + w])
            sel = [(i, r) for i, rows in enumerate(want) for r in rows if off <= r < off + w]
            if sel:
                # Taken out of the shared output buffer before the next chunk's replay overwrites it.
                ii = _to(torch.tensor([i for i, _ in sel]), dev)
                rr = _to(torch.tensor([r - off for _, r in sel]), dev)
                logits = self._head(hidden[ii, rr])
                for k, (i, r) in enumerate(sel):
                    got[i][r] = logits[k]
        vocab = self.model.cfg.vocab_size
        return [torch.stack([got[i][r] for r in rows]) if rows else torch.empty(0, vocab, device=dev)
                for i, rows in enumerate(logits_at)]

    @torch.inference_mode()
    def run_draft(self, tables: Seq[list[int]], starts: list[int], anchors: list[int], block_size: int,
                  mask_id: int, num_logits: int, start_dev: Optional[torch.Tensor] = None,
                  anchor_dev: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Diffusion pass over [anchor, MASK x (block_size-1)] at positions starts[i]..; returns
        float32 logits [bs, num_logits, V] of block rows 0..num_logits-1.
        start_dev [bs] int32 / anchor_dev [bs] int64: exact values on the device (a chained
        cycle), `starts` being upper bounds and `anchors` unused."""
        bs, B = len(tables), block_size
        dev = self.device
        t0 = time.perf_counter()
        ctx_l = list(starts)
        if self.graphs is not None and self.graphs.fits(bs, B):
            hidden = self.graphs.run("draft", ctx_l, [B] * bs, list(tables), B,
                                     anchors=anchors, mask_id=mask_id, start_dev=start_dev, anchor_dev=anchor_dev)
        else:
            ids = torch.full((bs, B), mask_id, dtype=torch.long, device=dev)
            ids[:, 0] = anchor_dev if anchor_dev is not None else _to(torch.tensor(anchors), dev)
            start, nvalid, bt = self._meta(tables, ctx_l, [B] * bs, B, start_dev)
            hidden = self.fast.forward(ids, start, nvalid, bt, diff=True).view(bs, B, -1)
        out = self._logits(hidden[:, :num_logits])
        self._record("draft", bs, B, t0)
        return out

    @torch.inference_mode()
    def run_verify(self, tables: Seq[list[int]], starts: list[int], ids: torch.Tensor, lengths: list[int],
                   start_dev: Optional[torch.Tensor] = None) -> torch.Tensor:
        """AR pass over ids [bs, T] (on the device: [anchor, drafts...]) at positions starts[i]..;
        sequence i's first lengths[i] tokens are real (their K/V are written), the rest padding.
        start_dev as in run_draft. Returns float32 logits [bs, T, V]."""
        bs, T = ids.shape
        dev = self.device
        t0 = time.perf_counter()
        starts = list(starts)
        if self.graphs is not None and self.graphs.fits(bs, T):
            hidden = self.graphs.run("verify", starts, lengths, list(tables), T, ids=ids,
                                     start_dev=start_dev)
        else:
            start, nvalid, bt = self._meta(tables, starts, lengths, T, start_dev)
            hidden = self.fast.forward(ids, start, nvalid, bt, diff=False).view(bs, T, -1)
        out = self._logits(hidden)
        self._record("verify", bs, T, t0)
        return out
