"""Triton kernels of the CUDA hot path (imported only where `triton` imports).

Four fused kernels replace the dozens of small launches of a plain PyTorch layer,
which is what holds a batch-1 decode step far above the memory roofline (and
`skinny_linear`, at the end, runs the linear layers of passes of a few tokens):

- `add_rmsnorm`: residual add + RMSNorm in one pass over the row;
- `qk_norm_rope`: per-head q/k RMSNorm (Qwen3) + rotary embedding, and, for the AR
  view, the write of the K/V rows into the paged cache;
- `paged_attention`: one query block per sequence against (a) its cached prefix,
  read through the block table, and (b) this pass's own keys/values, causal for the
  AR view and bidirectional for the diffusion view; online softmax in float32; for a
  small batch the prefix is split over several programs and merged (split-KV);
- `silu_mul`: the MLP's SiLU(gate) * up;
- `merge_attention`: two partial attentions (flash-attn's prefix and own-block calls of
  the diffusion view) merged by their log-sum-exps.

Every size that changes from step to step (prefix lengths, valid tokens, block
tables) is read from device memory, so the launches can be captured in a CUDA graph.
Float32 inputs use exact ("ieee") dot products, so the float32 fast path matches the
torch reference path to rounding; bf16 inputs use the tensor cores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# -- residual add + RMSNorm ----------------------------------------------------------------------


@triton.jit
def _add_rmsnorm_kernel(X, R, W, Y, RO, sx, sr, sy, sro, N, eps,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * sx + cols, mask=m, other=0.0)
    if HAS_RES:
        # Rounded to the activation dtype, as the reference's `x = x + f(x)` is.
        x = x + tl.load(R + row * sr + cols, mask=m, other=0.0)
    tl.store(RO + row * sro + cols, x, mask=m)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(W + cols, mask=m, other=0.0)
    tl.store(Y + row * sy + cols, (y * w).to(x.dtype), mask=m)


def add_rmsnorm(x: torch.Tensor, res: torch.Tensor | None, w: torch.Tensor, eps: float):
    """x, res [n, h] -> (rmsnorm(x + res) * w, x + res). res None: no add."""
    n, h = x.shape
    y = torch.empty_like(x)
    ro = torch.empty_like(x) if res is not None else x
    r = res if res is not None else x
    _add_rmsnorm_kernel[(n,)](x, r, w, y, ro, x.stride(0), r.stride(0), y.stride(0), ro.stride(0), h, eps,
                              HAS_RES=res is not None, BLOCK=_pow2(h), num_warps=4 if h <= 2048 else 8)
    return y, ro


# -- q/k norm + rotary (+ K/V cache write) -----------------------------------------------------


@triton.jit
def _qk_norm_rope_kernel(QKV, COS, SIN, QW, KW, QO, KO, KC, VC, SLOT, sqkv, sc_slot, sc_h, eps,
                         H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, QK_NORM: tl.constexpr,
                         WRITE: tl.constexpr):
    # One program per (token, head): q heads 0..H-1, then k heads; a k head also writes its
    # K and V rows into the cache. One head per program keeps a batch-1 pass parallel.
    n = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1)
    is_k = hh >= H
    c = tl.arange(0, D)
    half = D // 2
    partner = (c + half) % D
    row = QKV + n * sqkv + hh * D  # q heads and k heads are adjacent in the packed projection
    x = tl.load(row + c)
    x2 = tl.load(row + partner)
    dt = x.dtype
    if QK_NORM:
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        w = tl.where(is_k, tl.load(KW + c), tl.load(QW + c))
        w2 = tl.where(is_k, tl.load(KW + partner), tl.load(QW + partner))
        # Rounded like the reference: normalise in float32, round, scale by the weight.
        x = (xf * rstd).to(dt) * w
        x2 = (x2.to(tl.float32) * rstd).to(dt) * w2
    cos = tl.load(COS + n * D + c).to(tl.float32)
    sin = tl.load(SIN + n * D + c).to(tl.float32)
    sign = tl.where(c < half, -1.0, 1.0)
    out = (x.to(tl.float32) * cos + sign * x2.to(tl.float32) * sin).to(dt)
    if hh < H:
        tl.store(QO + n * (H * D) + hh * D + c, out)
    else:
        kh = hh - H
        tl.store(KO + n * (HKV * D) + kh * D + c, out)
        if WRITE:
            slot = tl.load(SLOT + n)
            if slot >= 0:
                v = tl.load(QKV + n * sqkv + (H + HKV + kh) * D + c)
                tl.store(KC + slot * sc_slot + kh * sc_h + c, out)
                tl.store(VC + slot * sc_slot + kh * sc_h + c, v)


def qk_norm_rope(qkv, cos, sin, qw, kw, H, HKV, D, eps, kc=None, vc=None, slots=None):
    """qkv [n, (H+2HKV)*D] -> q [n, H, D], k [n, HKV, D] (normed when qw is given, rotated);
    with slots (int64 [n], -1 = skip) also writes k and v into one layer's caches kc/vc
    [num_blocks, page, HKV, D] (contiguous: slot s is block s // page, row s % page)."""
    n = qkv.shape[0]
    q = torch.empty(n, H, D, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(n, HKV, D, dtype=qkv.dtype, device=qkv.device)
    write = slots is not None
    qk_norm = qw is not None
    if n == 0:
        return q, k
    _qk_norm_rope_kernel[(n, H + HKV)](
        qkv, cos, sin, qw if qk_norm else cos, kw if qk_norm else cos, q, k,
        kc if write else k, vc if write else k, slots if write else k,
        qkv.stride(0), kc.stride(1) if write else 0, kc.stride(2) if write else 0, eps,
        H=H, HKV=HKV, D=D, QK_NORM=qk_norm, WRITE=write, num_warps=1)
    return q, k


# -- paged attention: cached prefix + this pass's block ----------------------------------------------


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, PREC: tl.constexpr):
    """Fold one key tile into the running softmax: s [M, N] scores in log2 units (-inf where
    masked), v [N, D] -> the new (row max, row sum, accumulator). A row with every key masked
    so far keeps max -inf and sum 0 (no NaN: the max is taken as 0 for the exponentials)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


# Nothing that follows the batch's lengths may select a specialisation, or each new value class
# compiles a kernel in the middle of serving (issue 16: a stall of every running request). SPLITS
# is a runtime argument, not a constexpr (only SPLIT, whether there are splits, is): the split
# count follows the block table's width. T (tokens a sequence), NTOK (tokens in all) and the
# block table's strides are not specialised either: Triton otherwise builds one kernel for a
# value of 1, one for multiples of 16 and one for the rest (the H200 serving run built three
# after ready, from prefill passes of new lengths). The split buffers always have the same
# types (paged_attention), so what is left to specialise is BLOCK_M (from T x G), CAUSAL and
# SPLIT: setup.warm_up runs every combination a configuration can reach.
@triton.jit(do_not_specialize=["SPLITS", "T", "NTOK", "sbt_b", "sbt_p"])
def _attn_kernel(Q, KB, VB, KC, VC, BT, START, NVALID, O, PO, PL, LOCK,
                 sq_n, sq_h, skb_n, skb_h, svb_n, svb_h, sc_blk, sc_pg, sc_h, sbt_b, sbt_p, so_n, so_h,
                 T, NTOK, scale, SPLITS,
                 G: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
                 MIN_CHUNK: tl.constexpr):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    pm = tl.program_id(2) // SPLITS
    sp = tl.program_id(2) % SPLITS
    # Rows of this program: (token t, head kh*G + g) pairs; a KV head serves its G query heads.
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    t = m // G
    g = m % G
    row_ok = t < T
    tok = (b * T + t).to(tl.int64)
    head = kh * G + g
    d = tl.arange(0, D)
    q = tl.load(Q + tok[:, None] * sq_n + head[:, None] * sq_h + d[None, :], mask=row_ok[:, None], other=0.0)
    start = tl.load(START + b)
    nvalid = tl.load(NVALID + b)
    if SPLIT:
        # Split-KV: the prefix in `n_active` chunks of whole key tiles, at least MIN_CHUNK keys
        # each (a short prefix stays one chunk: no partials, no merge); split sp takes chunk sp
        # and the last active split also the pass's own keys. Splits past n_active do nothing.
        chunk = tl.maximum(tl.cdiv(tl.cdiv(start, SPLITS), BLOCK_N) * BLOCK_N, MIN_CHUNK)
        n_active = tl.maximum(tl.cdiv(start, chunk), 1)
        lo = sp * chunk
        hi_pre = tl.minimum(start, lo + chunk)
        last = sp == n_active - 1
    else:
        n_active = 1
        lo = 0
        hi_pre = start
    qk_scale = scale * 1.4426950408889634  # exp -> exp2
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    # (a) the cached prefix [lo, hi_pre) of [0, start): visible to every row.
    for n0 in range(lo, hi_pre, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        km = offs < hi_pre
        blk = tl.load(BT + b * sbt_b + (offs // PAGE) * sbt_p, mask=km, other=0).to(tl.int64)
        base = blk * sc_blk + (offs % PAGE) * sc_pg + kh * sc_h
        k = tl.load(KC + base[:, None] + d[None, :], mask=km[:, None], other=0.0)
        v = tl.load(VC + base[:, None] + d[None, :], mask=km[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        m_i, l_i, acc = _online_softmax_step(tl.where(km[None, :], s, float("-inf")), v, m_i, l_i, acc, PREC)
    # (b) this pass's own keys [0, nvalid): causal (AR view) or all (diffusion view).
    hi = nvalid
    if CAUSAL:
        t_last = ((pm + 1) * BLOCK_M - 1) // G
        hi = tl.minimum(nvalid, t_last + 1)
    if SPLIT:
        hi = tl.where(last, hi, 0)
    for n0 in range(0, hi, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        jm = j < nvalid
        jt = (b * T + j).to(tl.int64)
        k = tl.load(KB + jt[:, None] * skb_n + kh * skb_h + d[None, :], mask=jm[:, None], other=0.0)
        v = tl.load(VB + jt[:, None] * svb_n + kh * svb_h + d[None, :], mask=jm[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        vis = jm[None, :]
        if CAUSAL:
            vis = vis & (j[None, :] <= t[:, None])
        m_i, l_i, acc = _online_softmax_step(tl.where(vis, s, float("-inf")), v, m_i, l_i, acc, PREC)
    # Rows that see no key at all (padding rows of a padded batch) come out as zeros.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptr = O + tok[:, None] * so_n + head[:, None] * so_h + d[None, :]
    if not SPLIT:
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    else:
        if n_active == 1:
            if sp == 0:
                tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None])
        elif sp < n_active:
            # A partial result (normalised output, log2-sum-exp) per split; the split that
            # finishes last merges them all. The counter is per (sequence, KV head, row block)
            # and goes back to zero for the next call (and the next CUDA-graph replay).
            prow = (sp * NTOK + tok) * (G * tl.num_programs(1)) + head
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(PO + prow[:, None] * D + d[None, :], out, mask=row_ok[:, None])
            tl.store(PL + prow, lse, mask=row_ok)
            tl.debug_barrier()  # every thread's partial is written before the count says so
            lock = LOCK + (b * tl.num_programs(1) + kh) * tl.cdiv(tl.num_programs(2), SPLITS) + pm
            if tl.atomic_add(lock, 1, sem="acq_rel") == n_active - 1:
                mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
                den = tl.zeros([BLOCK_M], tl.float32)
                num = tl.zeros([BLOCK_M, D], tl.float32)
                for s2 in range(0, n_active):
                    r2 = (s2 * NTOK + tok) * (G * tl.num_programs(1)) + head
                    l2 = tl.load(PL + r2, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                    o2 = tl.load(PO + r2[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0,
                                 cache_modifier=".cg")
                    mn = tl.maximum(mx, l2)
                    ms = tl.where(mn == float("-inf"), 0.0, mn)
                    a = tl.exp2(mx - ms)
                    e = tl.exp2(l2 - ms)
                    num = num * a[:, None] + o2 * e[:, None]
                    den = den * a + e
                    mx = mn
                merged = num / tl.where(den > 0, den, 1.0)[:, None]
                tl.store(o_ptr, merged.to(O.dtype.element_ty), mask=row_ok[:, None])
                tl.atomic_xchg(lock, 0)


# Split-KV ("flash-decoding"): a small batch gives the kernel a few programs (batch x KV heads
# x row blocks: 8 for an 8B-shape batch-1 step) that each stream a whole long prefix, on a GPU
# with 132 SMs. Splitting the prefix into up to SPLIT_MAX chunks of at least SPLIT_MIN_KEYS
# keys fills the GPU; the split count is fixed by the shapes (CUDA graphs), the chunking by
# the prefix length on the device, so a short prefix still runs as one program and no merge.
SPLIT_MAX = 32
SPLIT_MIN_KEYS = 256
_sm_count: dict = {}
_locks: dict = {}
_retired_locks: list = []


def num_splits(bs: int, HKV: int, row_blocks: int, max_keys: int, device: torch.device) -> int:
    """Prefix splits for a grid of bs x HKV x row_blocks programs: up to about two waves of
    the GPU's SMs, and none where max_keys (the block table's reach) fits two chunks."""
    if device.type != "cuda" or max_keys < 2 * SPLIT_MIN_KEYS:
        return 1
    sms = _sm_count.get(device.index)
    if sms is None:
        sms = _sm_count[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    progs = bs * HKV * row_blocks
    return max(1, min(SPLIT_MAX, (2 * sms) // progs, max_keys // SPLIT_MIN_KEYS))


def _lock_buffer(device: torch.device, n: int) -> torch.Tensor:
    """The split-KV counters: zeros, kept for good (CUDA graphs hold their address; a larger
    buffer, never needed with `num_splits`'s counts, leaves the old one alive for them)."""
    lock = _locks.get(device.index)
    if lock is None or lock.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split-KV attention: run the pass once outside a CUDA graph capture first")
        if lock is not None:
            _retired_locks.append(lock)
        lock = _locks[device.index] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return lock


_unused: dict = {}


def _unused_f32(device: torch.device) -> torch.Tensor:
    """A float32 placeholder for the split buffers of a pass without splits (kept: CUDA graphs
    hold its address)."""
    t = _unused.get(device)
    if t is None:
        t = _unused[device] = torch.zeros(1, dtype=torch.float32, device=device)
    return t


def paged_attention(q, kb, vb, kc, vc, bt, start, nvalid, T: int, scale: float, causal: bool,
                    splits: int | None = None):
    """q [bs*T, H, D]; kb/vb [bs*T, HKV, D] (any row/head strides, unit last stride);
    kc/vc one layer's cache [num_blocks, page, HKV, D]; bt [bs, W] int32 (any strides);
    start/nvalid [bs] int32 -> out [bs*T, H, D]. splits: prefix splits (None: `num_splits`)."""
    n, H, D = q.shape
    HKV = kb.shape[1]
    G = H // HKV
    bs = start.shape[0]
    out = torch.empty_like(q)
    M = T * G
    BLOCK_M = max(16, min(64, _pow2(M)))
    BLOCK_N = 64 if D <= 128 else 32
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    qb = triton.cdiv(M, BLOCK_M)
    if splits is None:
        splits = num_splits(bs, HKV, qb, bt.shape[1] * kc.shape[1], q.device)
    # Unused without splits, but of the same types either way (one specialisation fewer).
    lock = _lock_buffer(q.device, bs * HKV * qb)
    if splits > 1:
        po = torch.empty(splits, n, H, D, dtype=torch.float32, device=q.device)
        pl = torch.empty(splits, n, H, dtype=torch.float32, device=q.device)
    else:
        po = pl = _unused_f32(q.device)
    grid = (bs, HKV, qb * splits)
    _attn_kernel[grid](
        q, kb, vb, kc, vc, bt, start, nvalid, out, po, pl, lock,
        q.stride(0), q.stride(1), kb.stride(0), kb.stride(1), vb.stride(0), vb.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), bt.stride(0), bt.stride(1), out.stride(0), out.stride(1),
        T, n, scale, splits, G=G, D=D, PAGE=kc.shape[1], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=causal,
        PREC=prec, SPLIT=splits > 1, MIN_CHUNK=SPLIT_MIN_KEYS, num_warps=4, num_stages=2)
    return out


# -- merging two partial attentions by their log-sum-exps --------------------------------------------


@triton.jit
def _merge_attention_kernel(O1, L1, O2, L2, NVALID, O, T,
                            H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr):
    # One program per token row (all heads): o = (o1 e^l1 + o2 e^l2) / (e^l1 + e^l2).
    n = tl.program_id(0).to(tl.int64)
    b = n // T
    t = n % T
    h = tl.arange(0, HP)
    d = tl.arange(0, D)
    hm = h < H
    l1 = tl.load(L1 + (b * H + h) * T + t, mask=hm, other=float("-inf"))
    l2 = tl.load(L2 + (b * H + h) * T + t, mask=hm, other=float("-inf"))
    mx = tl.maximum(l1, l2)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # a row with no key in either part: weights 0
    w1 = tl.exp(l1 - mx)
    w2 = tl.exp(l2 - mx)
    den = w1 + w2
    den = tl.where(den > 0, den, 1.0)
    offs = n * (H * D) + h[:, None] * D + d[None, :]
    o1 = tl.load(O1 + offs, mask=hm[:, None], other=0.0).to(tl.float32)
    o2 = tl.load(O2 + offs, mask=hm[:, None], other=0.0).to(tl.float32)
    o = (o1 * w1[:, None] + o2 * w2[:, None]) / den[:, None]
    o = tl.where(t < tl.load(NVALID + b), o, 0.0)  # padding rows: zeros, as paged_attention gives
    tl.store(O + offs, o.to(O.dtype.element_ty), mask=hm[:, None])


def merge_attention(o1, l1, o2, l2, nvalid):
    """Exact softmax attention over the union of two key sets, from each set's result.
    o1/o2 [bs, T, H, D] (contiguous); l1/l2 [bs, H, T] float32 natural-log log-sum-exps (-inf:
    no key); nvalid [bs] int32 -> [bs, T, H, D], zeros in rows t >= nvalid[b]."""
    bs, T, H, D = o1.shape
    out = torch.empty_like(o1)
    if bs * T:
        _merge_attention_kernel[(bs * T,)](o1, l1.contiguous(), o2, l2.contiguous(), nvalid, out, T,
                                           H=H, HP=_pow2(H), D=D, num_warps=4)
    return out


# -- SiLU(gate) * up ----------------------------------------------------------------------------------


@triton.jit
def _silu_mul_kernel(GU, O, I, sgu, so, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < I
    g = tl.load(GU + row * sgu + cols, mask=m, other=0.0)
    u = tl.load(GU + row * sgu + I + cols, mask=m, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # rounded like F.silu's output
    tl.store(O + row * so + cols, s * u, mask=m)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [n, 2I] (gate | up) -> silu(gate) * up [n, I]."""
    n, two_i = gu.shape
    inter = two_i // 2
    out = torch.empty(n, inter, dtype=gu.dtype, device=gu.device)
    BLOCK = 1024
    _silu_mul_kernel[(n, triton.cdiv(inter, BLOCK))](gu, out, inter, gu.stride(0), out.stride(0), BLOCK=BLOCK,
                                                     num_warps=4)
    return out


# -- skinny linear layers: y = x @ w.T for a few rows --------------------------------------------------
#
# A decode pass of a few tokens multiplies a handful of activation rows by every weight matrix:
# pure weight streaming, where cuBLAS falls short of the copy bandwidth on all but the largest
# matrices and adds split-K reductions (measurements: benchmarks/gemv_micro.py, docs/performance.md):
# - one row: CUDA cores, each program a [BN, K] slab of w dotted with the row (tensor-core tiles
#   would be 15/16 padding);
# - 2-32 rows: tensor cores on the swapped product w_tile @ x_tile.T, x padded to 16 or 32 rows.
# Accumulation is float32 and each output is written once (no split-K, no atomics).


@triton.jit
def _w_tile(W, rn, sw, N, kk, K, EVEN: tl.constexpr):
    """Rows rn, columns kk of w [N, K] (row stride sw); zeros outside unless EVEN (no edges)."""
    ptr = W + rn.to(tl.int64)[:, None] * sw + kk[None, :]
    if EVEN:
        return tl.load(ptr)
    return tl.load(ptr, mask=(rn < N)[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def _gemv_row_kernel(X, W, Y, N, K, sw, BN: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr):
    # y[n] = sum_k w[n, k] x[k] for BN rows of w: one x row on the CUDA cores.
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BN], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        w = _w_tile(W, rn, sw, N, kk, K, EVEN).to(tl.float32)
        xv = tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    tl.store(Y + rn, acc.to(Y.dtype.element_ty), mask=rn < N)


@triton.jit(do_not_specialize=["M"])
def _skinny_mm_kernel(X, W, Y, M, N, K, sx, sw, sy,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm = tl.arange(0, BM)
    nm = rn < N
    mm = rm < M
    acc = tl.zeros([BN, BM], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        km = kk < K
        w = _w_tile(W, rn, sw, N, kk, K, EVEN)
        x = tl.load(X + rm[:, None] * sx + kk[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        acc = tl.dot(w, tl.trans(x), acc)
    tl.store(Y + rm[None, :] * sy + rn[:, None], acc.to(Y.dtype.element_ty), mask=nm[:, None] & mm[None, :])


SKINNY_MAX_ROWS = 32


def skinny_linear_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Half-precision, at most SKINNY_MAX_ROWS rows, unit inner strides (float32 stays on cuBLAS:
    the float32 fast path is the one tested for exactness against the reference path)."""
    return (x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype and x.dim() == 2
            and 1 <= x.shape[0] <= SKINNY_MAX_ROWS and x.stride(1) == 1 and w.stride(1) == 1)


def skinny_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] (M <= 32, half precision) @ w[N, K].T -> y [M, N]. Tile sizes are the fastest of
    benchmarks/gemv_micro.py's sweep: one row BN 4 x BK 2048 (BN 8 x BK 1024 for N > 8192); more
    rows BN 64 x BK 128, 6 stages (4 for a vocabulary-sized N)."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 1:
        BN, BK = (8, 1024) if N > 8192 else (4, 2048)
        BK = min(BK, _pow2(K))
        _gemv_row_kernel[(triton.cdiv(N, BN),)](x, w, y, N, K, w.stride(0), BN=BN, BK=BK,
                                                 EVEN=(N % BN == 0 and K % BK == 0), num_warps=4, num_stages=1)
    else:
        BN, BK = 64, 128
        _skinny_mm_kernel[(triton.cdiv(N, BN),)](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                                                  BM=16 if M <= 16 else 32, BN=BN, BK=BK,
                                                  EVEN=(N % BN == 0 and K % BK == 0), num_warps=4,
                                                  num_stages=4 if N > 65536 else 6)
    return y
