"""Batch-M GEMV / skinny-GEMM micro-benchmark for the Qwen3-8B decode step's linear layers.

    PYTHONUNBUFFERED=1 python3 benchmarks/gemv_micro.py --out /tmp/x                   # ~1 minute on an H200
    PYTHONUNBUFFERED=1 python3 benchmarks/gemv_micro.py --sections fold --out /tmp/y   # the "fold" design, ~20 s

Needs torch and triton (and the engine's add_rmsnorm / silu_mul kernels, for the unfused chains). For each weight shape
(bf16, random) and M in 1..32 it times y = x @ W.T with
  (a) F.linear as the process finds it (torch's default BLAS backend, named in the JSON),
  (b) F.linear after preferred_blas_library("cublas") and (b') "cublaslt" (switched back after),
  (c) Triton GEMV kernels of this file over a small fixed sweep of configs (no autotuner):
      "fma" (CUDA-core dot products, one row of W per lane group, M unrolled) and "dot"
      (tensor cores, W tile as the A operand and x^T padded to 16/32 columns as B), each
      optionally split over K with a deterministic reduction: "reduce" = a second kernel
      sums the fp32 partials in split order; "fixup" = the last program of a column tile
      to arrive (an int32 counter, no float atomics) sums them in split order.
and, at M = 1 and 4, fused variants against their unfused chains:
  (i)  add+RMSNorm prologue in the qkv and gate|up GEMVs (norm = "exact": a first pass over
       the row computes rstd and the input is rounded as the reference rounds it; "scale":
       sum of squares accumulated in the main loop and rstd applied to the accumulator)
       vs add_rmsnorm kernel + best plain GEMV;
  (ii) down GEMV with silu(gate)*up computed in the prologue from the packed gate|up
       output, and the residual added in the epilogue (in place) vs silu_mul kernel + best
       plain GEMV (+ a separate add).
and (--sections fold) a "fold" design at M = 1, 2, 4, 8: the RMSNorm weight folded into the qkv
and gate|up weights (W diag(g)) with rstd applied in the epilogue, gate|up rows interleaved
(gate_j, up_j) with silu(gate)*up in the epilogue, and the residual added in the o and down
epilogues: 4 launches for a layer's linears instead of 7, timed per op and as whole-layer chains.
Every timing is the median over many replays of one CUDA graph holding NCALLS (20)
back-to-back calls that read different weight copies (several GB in all, far beyond the
L2), divided by NCALLS: how the calls run inside the decode graph. Every Triton variant is
checked against a float32 reference on fresh random data (relative error < 1e-2) before
it is timed; one that fails is recorded and not timed.

Also runnable without a GPU: `TRITON_INTERPRET=1 python3 benchmarks/gemv_micro.py --selftest`
checks every kernel variant on small shapes on the CPU (Triton interpreter; in float16, since
the interpreter computes bfloat16 on raw bits, and with numpy < 2.4, which Triton 3.6's
interpreter needs; Triton 3.9's interpreter, which `make test` installs, rejects these kernels'
masks on the unrolled row index, "mask has unsupported dtype"), and
`--compile-only` compiles every variant for sm_90 with a stand-in driver.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {  # name: (N, K) of W; y[M, N] = x[M, K] @ W.T
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (24576, 4096),
    "down": (4096, 12288),
    "lm_head": (151936, 4096),
}
LAYERS = 36
HIDDEN, INTER = 4096, 12288
EPS = 1e-6
NCALLS = 20
MS = [1, 4, 2, 8, 16, 32]  # order of work: what matters most first
FUSE_MS = [1, 4]

# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _ld(p, mask, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(p)
    else:
        return tl.load(p, mask=mask, other=0.0)


@triton.jit
def _silu_mul_bf(g, u):
    # Rounded like the reference: silu in float32, rounded, times up (rounded).
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    return s * u


@triton.jit
def _store_out(Y, yo, acc, mask, ADD: tl.constexpr):
    if ADD:
        acc = acc + tl.load(Y + yo, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + yo, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(Y, P, LOCK, acc, rn, rm, nm, M, N, sy, pid_n, pid_k,
              BN: tl.constexpr, BM: tl.constexpr, EPI: tl.constexpr, ADD: tl.constexpr, GLU: tl.constexpr):
    yo = rm[None, :] * sy + rn[:, None]  # acc is [BN, BM]: y^T tile
    ymask = nm[:, None] & (rm[None, :] < M)
    if GLU:
        # W rows interleaved gate_j, up_j: y[:, j] = silu(gate_j) * up_j, each rounded as the
        # reference rounds its GEMM outputs (Y is [M, N/2])
        a3 = tl.permute(tl.reshape(acc, [BN // 2, 2, BM]), [0, 2, 1])
        gg, uu = tl.split(a3)
        act = _silu_mul_bf(gg.to(Y.dtype.element_ty), uu.to(Y.dtype.element_ty))
        rj = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        tl.store(Y + rm[None, :] * sy + rj[:, None], act, mask=(rj < N // 2)[:, None] & (rm[None, :] < M))
    elif EPI == 0:
        _store_out(Y, yo, acc, ymask, ADD)
    else:
        po = (pid_k * M + rm[None, :]) * N + rn[:, None]
        tl.store(P + po, acc, mask=ymask)
        if EPI == 2:
            # Deterministic in-kernel split-K: the last program of this column tile to arrive
            # (int32 counter) sums every split's partial in split order, then resets the counter.
            S = tl.num_programs(1)
            tl.debug_barrier()
            cnt = tl.atomic_add(LOCK + pid_n, 1, sem="acq_rel", scope="gpu")
            if cnt == S - 1:
                tot = tl.zeros([BN, BM], tl.float32)
                for s in range(0, S):
                    tot += tl.load(P + (s * M + rm[None, :]) * N + rn[:, None], mask=ymask, other=0.0,
                                   cache_modifier=".cg")
                _store_out(Y, yo, tot, ymask, ADD)
                tl.atomic_xchg(LOCK + pid_n, 0, sem="relaxed", scope="gpu")


# PRO (prologue, how a chunk of the input row is made):
#   0: x[M, K] as is
#   1: h = x + r (rounded), "exact" RMSNorm: first pass over the row for rstd, then
#      ((h * rstd) rounded) * g, as the reference rounds; program (0, 0) writes h to RO
#   2: h = x + r, "scale" RMSNorm: input h * g, sum of squares in the main loop, rstd applied
#      to the accumulator at the end; programs of column tile 0 write h to RO (no split-K)
#   3: x is the packed [M, 2K] gate|up output: input silu(gate) * up
#   4: "fold": x is the residual stream h, the norm weight is folded into W (W' = W diag(g));
#      sum of squares in the main loop, rstd applied to the accumulator (no split-K)
# GLU: W's rows are interleaved gate_j, up_j; the epilogue writes silu(gate) * up [M, N/2]
# EPI: 0 store y (ADD: y = Y + acc, in place); 1 fp32 partial for the reduce kernel;
#      2 fp32 partial + last-arriving program reduces (ADD as for 0)


@triton.jit(do_not_specialize=["M"])
def _gemv_fma_kernel(X, R, G, RO, W, Y, P, LOCK, M, N, K, KS, sx, sw, sy, eps,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRO: tl.constexpr,
                     EPI: tl.constexpr, ADD: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                     PREF: tl.constexpr, GLU: tl.constexpr):
    # CUDA-core GEMV: the BM (M rounded up to a power of two) rows of x unrolled; per row a [BN, BK] product reduced over K.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm = tl.arange(0, BM)
    nm = rn < N
    k_lo = pid_k * KS
    wrow = W + rn.to(tl.int64)[:, None] * sw
    rstd = tl.zeros([BM], tl.float32)
    if PRO == 1:
        ss = tl.zeros([BM], tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            km = kk < K
            xo = rm[:, None] * sx + kk[None, :]
            xm2 = (rm[:, None] < M) & km[None, :]
            h = tl.load(X + xo, mask=xm2, other=0.0) + tl.load(R + xo, mask=xm2, other=0.0)
            if (pid_n == 0) & (pid_k == 0):
                tl.store(RO + xo, h, mask=xm2)
            hf = h.to(tl.float32)
            ss += tl.sum(hf * hf, axis=1)
        rstd = tl.rsqrt(ss / K + eps)
    acc = tl.zeros([BN, BM], tl.float32)
    ss2 = tl.zeros([BM], tl.float32)
    if PREF:
        # register double buffering (Triton does not pipeline loads that feed no tl.dot):
        # the next W tile's loads are issued before this tile's arithmetic
        k_end = tl.minimum(K, k_lo + KS)
        w_nx = tl.load(wrow + (k_lo + rk)[None, :], mask=nm[:, None] & ((k_lo + rk) < k_end)[None, :], other=0.0)
    for k0 in range(k_lo, k_lo + KS, BK):
        kk = k0 + rk
        km = kk < K
        if PREF:
            w = w_nx.to(tl.float32)
            kn = kk + BK
            w_nx = tl.load(wrow + kn[None, :], mask=nm[:, None] & (kn < k_end)[None, :], other=0.0)
        else:
            w = _ld(wrow + kk[None, :], nm[:, None] & km[None, :], EVEN_N and EVEN_K).to(tl.float32)
        if PRO == 1 or PRO == 2:
            gw = _ld(G + kk, km, EVEN_K)
        for m in tl.static_range(BM):
            # rows >= M (BM is M rounded up to a power of two) read nothing and add zeros
            xo = m * sx + kk
            xk = km & (m < M)
            if PRO == 0:
                xv = _ld(X + xo, xk, False).to(tl.float32)
            elif PRO == 1:
                h = _ld(X + xo, xk, False) + _ld(R + xo, xk, False)
                r_m = tl.sum(tl.where(rm == m, rstd, 0.0), axis=0)
                xv = ((h.to(tl.float32) * r_m).to(h.dtype) * gw).to(tl.float32)
            elif PRO == 2:
                h = _ld(X + xo, xk, False) + _ld(R + xo, xk, False)
                if pid_n == 0:
                    tl.store(RO + xo, h, mask=xk)
                hf = h.to(tl.float32)
                ss2 += tl.where(rm == m, tl.sum(hf * hf, axis=0), 0.0)
                xv = hf * gw.to(tl.float32)
            elif PRO == 3:
                gg = _ld(X + xo, xk, False)
                uu = _ld(X + xo + K, xk, False)
                xv = _silu_mul_bf(gg, uu).to(tl.float32)
            else:  # 4: the norm weight is folded into W; x is the residual stream h
                xv = _ld(X + xo, xk, False).to(tl.float32)
                ss2 += tl.where(rm == m, tl.sum(xv * xv, axis=0), 0.0)
            part = tl.sum(w * xv[None, :], axis=1)
            acc += tl.where(rm[None, :] == m, part[:, None], 0.0)
    if PRO == 2 or PRO == 4:
        acc = acc * tl.rsqrt(ss2 / K + eps)[None, :]
    _epilogue(Y, P, LOCK, acc, rn, rm, nm, M, N, sy, pid_n, pid_k, BN, BM, EPI, ADD, GLU)


@triton.jit(do_not_specialize=["M"])
def _gemm_dot_kernel(X, R, G, RO, W, Y, P, LOCK, M, N, K, KS, sx, sw, sy, eps,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRO: tl.constexpr,
                     EPI: tl.constexpr, ADD: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                     GLU: tl.constexpr):
    # Tensor-core skinny GEMM, swapped: acc[BN, BM] += W[BN, BK] @ x[BM, BK]^T (x rows >= M are 0).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    rm = tl.arange(0, BM)
    nm = rn < N
    mm = rm < M
    k_lo = pid_k * KS
    wrow = W + rn.to(tl.int64)[:, None] * sw
    rstd = tl.zeros([BM], tl.float32)
    if PRO == 1:
        ss = tl.zeros([BM], tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            xo = rm[:, None] * sx + kk[None, :]
            xm2 = mm[:, None] & (kk < K)[None, :]
            h = tl.load(X + xo, mask=xm2, other=0.0) + tl.load(R + xo, mask=xm2, other=0.0)
            if (pid_n == 0) & (pid_k == 0):
                tl.store(RO + xo, h, mask=xm2)
            hf = h.to(tl.float32)
            ss += tl.sum(hf * hf, axis=1)
        rstd = tl.rsqrt(ss / K + eps)
    acc = tl.zeros([BN, BM], tl.float32)
    ss2 = tl.zeros([BM], tl.float32)
    for k0 in range(k_lo, k_lo + KS, BK):
        kk = k0 + rk
        km = kk < K
        w = _ld(wrow + kk[None, :], nm[:, None] & km[None, :], EVEN_N and EVEN_K)
        xo = rm[:, None] * sx + kk[None, :]
        xm2 = mm[:, None] & km[None, :]
        if PRO == 0:
            xt = tl.load(X + xo, mask=xm2, other=0.0)
        elif PRO == 1:
            h = tl.load(X + xo, mask=xm2, other=0.0) + tl.load(R + xo, mask=xm2, other=0.0)
            gw = _ld(G + kk, km, EVEN_K)
            xt = (h.to(tl.float32) * rstd[:, None]).to(h.dtype) * gw[None, :]
        elif PRO == 2:
            h = tl.load(X + xo, mask=xm2, other=0.0) + tl.load(R + xo, mask=xm2, other=0.0)
            if pid_n == 0:
                tl.store(RO + xo, h, mask=xm2)
            hf = h.to(tl.float32)
            ss2 += tl.sum(hf * hf, axis=1)
            gw = _ld(G + kk, km, EVEN_K)
            xt = (hf * gw.to(tl.float32)[None, :]).to(h.dtype)
        elif PRO == 3:
            gg = tl.load(X + xo, mask=xm2, other=0.0)
            uu = tl.load(X + xo + K, mask=xm2, other=0.0)
            xt = _silu_mul_bf(gg, uu)
        else:  # 4: norm weight folded into W; sum of squares from a second (register) load of x
            xt = tl.load(X + xo, mask=xm2, other=0.0)
            xr = tl.load(X + xo, mask=xm2, other=0.0, cache_modifier=".ca").to(tl.float32)
            ss2 += tl.sum(xr * xr, axis=1)
        acc = tl.dot(w, tl.trans(xt), acc)
    if PRO == 2 or PRO == 4:
        acc = acc * tl.rsqrt(ss2 / K + eps)[None, :]
    _epilogue(Y, P, LOCK, acc, rn, rm, nm, M, N, sy, pid_n, pid_k, BN, BM, EPI, ADD, GLU)


@triton.jit(do_not_specialize=["M", "S"])
def _splitk_reduce_kernel(P, Y, M, N, S, sy, ADD: tl.constexpr, BLOCK: tl.constexpr):
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    nm = rn < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, S):
        acc += tl.load(P + (s * M + m) * N + rn, mask=nm, other=0.0)
    _store_out(Y, m * sy + rn, acc, nm, ADD)


# The engine's two small kernels, for the unfused chains.
from orthrus_runtime.worker.triton_kernels import _add_rmsnorm_kernel, _silu_mul_kernel  # noqa: E402


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def add_rmsnorm(x, res, w, y, ro, warmup=False):
    n, h = x.shape
    args = (x, res, w, y, ro, x.stride(0), res.stride(0), y.stride(0), ro.stride(0), h, EPS)
    kw = dict(HAS_RES=True, BLOCK=_pow2(h), num_warps=4 if h <= 2048 else 8)
    _launch(_add_rmsnorm_kernel, (n,), args, kw, warmup)
    return y, ro


def silu_mul(gu, out, warmup=False):
    n, two_i = gu.shape
    inter = two_i // 2
    args = (gu, out, inter, gu.stride(0), out.stride(0))
    _launch(_silu_mul_kernel, (n, triton.cdiv(inter, 1024)), args, dict(BLOCK=1024, num_warps=4), warmup)
    return out


def _launch(kern, grid, args, kw, warmup):
    if warmup:
        kern.warmup(*[a.dtype if isinstance(a, torch.Tensor) else a for a in args], grid=grid, **kw)
    else:
        kern[grid](*args, **kw)


class Cfg(NamedTuple):
    kind: str  # "fma" | "dot"
    bn: int
    bk: int
    warps: int
    stages: int
    split: int = 1
    mode: str = "direct"  # "direct" | "reduce" (second kernel) | "fixup" (last program reduces)

    @property
    def name(self) -> str:
        s = f"{self.kind}_n{self.bn}_k{self.bk}_w{self.warps}_s{self.stages}"
        return s + (f"_sk{self.split}{self.mode[0]}" if self.split > 1 else "")

    @staticmethod
    def parse(name: str) -> "Cfg":
        p = name.split("_")
        c = Cfg(p[0], int(p[1][1:]), int(p[2][1:]), int(p[3][1:]), int(p[4][1:]))
        if len(p) > 5:
            c = c._replace(split=int(p[5][2:-1]), mode={"r": "reduce", "f": "fixup"}[p[5][-1]])
        return c


class Workspace:
    def __init__(self, device, max_parts=4 * 32 * 24576, max_tiles=1 << 16):
        self.part = torch.empty(max_parts, dtype=torch.float32, device=device)
        self.lock = torch.zeros(max_tiles, dtype=torch.int32, device=device)


def tri_linear(x, w, cfg: Cfg, y, ws: Workspace, *, pro=0, res=None, g=None, ro=None, add=False,
               glu=False, warmup=False):
    """y[M, N] (=, or += with add) x @ w.T with the prologue `pro` (see the kernels). pro 3: x is
    the packed [M, 2K] gate|up. Returns y."""
    M = x.shape[0]
    N, K = w.shape
    assert x.shape[1] == (2 * K if pro == 3 else K), (x.shape, w.shape, pro)
    S = cfg.split
    KS = K if S == 1 else triton.cdiv(triton.cdiv(K, S), cfg.bk) * cfg.bk
    S = triton.cdiv(K, KS)
    epi = 0 if S == 1 else {"reduce": 1, "fixup": 2}[cfg.mode]
    assert not (pro in (2, 4) and S > 1), "the 'scale' norm needs the whole row in one program"
    assert not (glu and (S > 1 or add or cfg.bn % 2)), "GLU epilogue: no split-K, no add, even BN"
    if cfg.kind == "fma":
        BM, kern = _pow2(M), _gemv_fma_kernel
    else:
        BM, kern = max(16, _pow2(M)), _gemm_dot_kernel
    if epi:
        assert S * M * N <= ws.part.numel() and triton.cdiv(N, cfg.bn) <= ws.lock.numel()
    r = res if res is not None else x
    args = (x, r, g if g is not None else r, ro if ro is not None else r, w, y, ws.part, ws.lock,
            M, N, K, KS, x.stride(0), w.stride(0), y.stride(0), EPS)
    kw = dict(BM=BM, BN=cfg.bn, BK=cfg.bk, PRO=pro, EPI=epi, ADD=bool(add) and epi != 1, GLU=bool(glu),
              EVEN_N=N % cfg.bn == 0, EVEN_K=(K % cfg.bk == 0 and K % KS == 0), num_warps=cfg.warps)
    if cfg.kind == "fma":  # Triton does not pipeline its loads: stages 2 = register prefetch
        kw.update(PREF=cfg.stages >= 2, num_stages=1)
    else:
        kw.update(num_stages=cfg.stages)
    _launch(kern, (triton.cdiv(N, cfg.bn), S), args, kw, warmup)
    if epi == 1:
        RB = 256
        _launch(_splitk_reduce_kernel, (M, triton.cdiv(N, RB)), (ws.part, y, M, N, S, y.stride(0)),
                dict(ADD=bool(add), BLOCK=RB, num_warps=2), warmup)
    return y


# ---------------------------------------------------------------------------------------------
# Config sweep (fixed lists, no autotuner)
# ---------------------------------------------------------------------------------------------

# fma: stages 1 = plain loop, 2 = register prefetch of the next W tile. dot: Triton's pipeline depth.
FMA_CFGS = [Cfg("fma", *c) for c in [
    (8, 512, 4, 1), (16, 256, 4, 1), (16, 512, 4, 1), (16, 512, 8, 1), (32, 256, 4, 1), (32, 512, 8, 1),
    (8, 1024, 4, 1), (4, 2048, 4, 1), (16, 1024, 8, 1),
    (8, 512, 4, 2), (16, 256, 4, 2), (16, 512, 4, 2), (32, 256, 4, 2), (8, 1024, 4, 2)]]
DOT_CFGS = [Cfg("dot", *c) for c in [
    (16, 256, 1, 4), (16, 512, 2, 3), (32, 128, 4, 4), (32, 256, 2, 4), (32, 256, 4, 4),
    (64, 128, 4, 4), (64, 128, 4, 6), (64, 256, 4, 3), (128, 128, 8, 4)]]
SPLIT_BASE = [Cfg("fma", 16, 512, 4, 1), Cfg("fma", 8, 1024, 4, 1), Cfg("fma", 16, 512, 4, 2),
              Cfg("dot", 64, 128, 4, 4), Cfg("dot", 32, 256, 4, 4)]
FMA_MAX_M = 8
NORM_CFGS = [Cfg("fma", 16, 512, 4, 1), Cfg("fma", 8, 1024, 4, 1), Cfg("fma", 16, 512, 4, 2),
             Cfg("fma", 8, 512, 4, 2), Cfg("dot", 16, 256, 1, 4), Cfg("dot", 32, 256, 4, 4),
             Cfg("dot", 64, 128, 4, 4)]
DOWN_CFGS = NORM_CFGS + [c._replace(split=s, mode=md) for c in (Cfg("fma", 16, 512, 4, 1), Cfg("dot", 64, 128, 4, 4))
                         for s in (2, 4) for md in ("reduce", "fixup")]


def plain_cfgs(shape: str, M: int) -> list[Cfg]:
    N, K = SHAPES[shape]
    out = list(DOT_CFGS)
    if M <= FMA_MAX_M:
        out = FMA_CFGS + out
    if N <= 6144:  # split-K only where the column tiles alone give few programs
        for c in SPLIT_BASE:
            if c.kind == "fma" and M > FMA_MAX_M:
                continue
            for s in (2, 4):
                for md in ("reduce", "fixup"):
                    out.append(c._replace(split=s, mode=md))
    return out


# ---------------------------------------------------------------------------------------------
# References and checks
# ---------------------------------------------------------------------------------------------


def ref_rms(h, g):
    hf = h.float()
    return g * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(h.dtype)


def ref_silu_mul(gu):
    gg, uu = gu.chunk(2, dim=-1)
    return F.silu(gg) * uu


def rel_err(y, ref) -> float:
    y = y.float()
    if not torch.isfinite(y).all():
        return float("inf")
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def time_graph(call, reps: int, warm: int = 2) -> dict:
    """call(i) issues call i (of NCALLS); captured once into a graph, replayed `reps` times.
    Returns us per call (median, min, max over replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(NCALLS):
            call(i)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(NCALLS):
            call(i)
    for _ in range(warm):
        g.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    t = sorted(a.elapsed_time(b) * 1e3 / NCALLS for a, b in ev)
    del g
    return dict(us=statistics.median(t), us_min=t[0], us_max=t[-1], reps=reps)


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.dev = torch.device("cuda")
        self.ws = Workspace(self.dev)
        self.res = dict(meta={}, ceilings={}, plain={}, fused={}, kernel_names={}, errors=[], skipped=[])
        self.W = {}  # shape -> list of weight copies (timing)
        self.Wc = {}  # shape -> (fresh check weight bf16, its float32)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def over(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def save(self):
        os.makedirs(self.args.out, exist_ok=True)
        with open(os.path.join(self.args.out, "gemv_micro.json"), "w") as f:
            json.dump(self.res, f, indent=1)

    def err(self, what, e):
        msg = f"{what}: {type(e).__name__}: {str(e)[:400]}"
        print("ERROR", msg, flush=True)
        self.res["errors"].append(msg)

    # -- setup --------------------------------------------------------------------------------
    def setup(self):
        p = torch.cuda.get_device_properties(0)
        m = self.res["meta"]
        m.update(device=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                 l2_mb=getattr(p, "L2_cache_size", 0) / 2**20, mem_gb=p.total_memory / 2**30,
                 torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                 default_blas=str(torch.backends.cuda.preferred_blas_library()),
                 ncalls=NCALLS, eps=EPS, date=time.strftime("%Y-%m-%d %H:%M:%S"))
        print("device", m, flush=True)
        torch.backends.cuda.matmul.allow_tf32 = False
        gen = torch.Generator(device=self.dev)
        gen.manual_seed(0)
        for name, (N, K) in SHAPES.items():
            wb = N * K * 2
            nc = min(NCALLS, max(4, math.ceil(4e9 / wb)))
            base = (torch.randn(N, K, device=self.dev, generator=gen, dtype=torch.bfloat16) / math.sqrt(K))
            self.W[name] = [base] + [base.clone() for _ in range(nc - 1)]
            wc = torch.randn(N, K, device=self.dev, generator=gen, dtype=torch.bfloat16) / math.sqrt(K)
            self.Wc[name] = (wc, wc.float())
            m.setdefault("weight_copies", {})[name] = dict(copies=nc, copy_mb=wb / 2**20, total_gb=nc * wb / 2**30)
        self.ln_w = (1.0 + 0.1 * torch.randn(HIDDEN, device=self.dev)).to(torch.bfloat16)
        torch.cuda.synchronize()
        print(f"weights: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated", flush=True)

    def ceilings(self):
        n = 1 << 30  # 1 GiB buffers; a copy moves 2 GiB (read + written)
        a = torch.empty(n // 2, dtype=torch.bfloat16, device=self.dev).normal_()
        b = torch.empty_like(a)
        bufs = [(a, b), (b, a)]
        try:
            t = time_graph(lambda i: bufs[i % 2][1].copy_(bufs[i % 2][0]), reps=10)
            self.res["ceilings"]["copy_TBps"] = 2 * n / (t["us"] * 1e-6) / 1e12
            # read-only: a float32 sum over one GiB
            out = torch.empty((), dtype=torch.float32, device=self.dev)
            t = time_graph(lambda i: torch.sum(bufs[i % 2][0], dim=0, dtype=torch.float32, out=out), reps=10)
            self.res["ceilings"]["read_sum_TBps"] = n / (t["us"] * 1e-6) / 1e12
        except Exception as e:  # noqa: BLE001
            self.err("ceilings", e)
        bufs.clear()
        print("ceilings", self.res["ceilings"], flush=True)

    # -- compile everything up front, in parallel ----------------------------------------------
    def precompile(self):
        t = time.time()
        jobs = []
        for M in MS:
            x = torch.empty(M, HIDDEN, dtype=torch.bfloat16, device=self.dev)
            for shape, (N, K) in SHAPES.items():
                xx = x if K == HIDDEN else torch.empty(M, K, dtype=torch.bfloat16, device=self.dev)
                y = torch.empty(M, N, dtype=torch.bfloat16, device=self.dev)
                for c in plain_cfgs(shape, M):
                    jobs.append(lambda xx=xx, w=self.W[shape][0], c=c, y=y: tri_linear(xx, w, c, y, self.ws, warmup=True))
        for M in FUSE_MS:
            d = torch.empty(M, HIDDEN, dtype=torch.bfloat16, device=self.dev)
            gu = torch.empty(M, 2 * INTER, dtype=torch.bfloat16, device=self.dev)
            for shape in ("qkv", "gate_up"):
                y = torch.empty(M, SHAPES[shape][0], dtype=torch.bfloat16, device=self.dev)
                for c in NORM_CFGS:
                    for pro in (1, 2):
                        jobs.append(lambda c=c, pro=pro, y=y, w=self.W[shape][0], d=d: tri_linear(
                            d, w, c, y, self.ws, pro=pro, res=d, g=self.ln_w, ro=d, warmup=True))
            y = torch.empty(M, HIDDEN, dtype=torch.bfloat16, device=self.dev)
            for c in DOWN_CFGS:
                jobs.append(lambda c=c, y=y, gu=gu: tri_linear(gu, self.W["down"][0], c, y, self.ws, pro=3, add=True,
                                                              warmup=True))
            jobs.append(lambda d=d: add_rmsnorm(d, d, self.ln_w, d, d, warmup=True))
            jobs.append(lambda gu=gu, M=M: silu_mul(gu, torch.empty(M, INTER, dtype=gu.dtype, device=gu.device),
                                                    warmup=True))
        nw = max(4, (os.cpu_count() or 8))
        try:
            with ThreadPoolExecutor(nw) as ex, triton.AsyncCompileMode(ex, ignore_errors=True):
                for j in jobs:
                    j()
        except Exception as e:  # noqa: BLE001
            self.err("async precompile (falls back to compiling at first use)", e)
        self.res["meta"]["precompile_s"] = time.time() - t
        self.res["meta"]["precompile_jobs"] = len(jobs)
        print(f"precompiled {len(jobs)} launches in {time.time() - t:.1f} s ({nw} threads)", flush=True)

    def precompile_fold(self):
        t = time.time()
        jobs = []
        for M in [int(m) for m in self.args.fold_ms.split(",")]:
            for op in self.FOLD_OPS:
                for c in self.fold_cands(op, M):
                    if ("glu" in op or "fold" in op) and c.split > 1:
                        continue
                    jobs.append(lambda op=op, M=M, c=c: self.fold_op(op, M, c, check=False, warmup=True))
        try:
            with ThreadPoolExecutor(max(4, os.cpu_count() or 8)) as ex, triton.AsyncCompileMode(ex, ignore_errors=True):
                for j in jobs:
                    j()
        except Exception as e:  # noqa: BLE001
            self.err("async precompile (fold)", e)
        self.res["meta"]["precompile_fold_s"] = time.time() - t
        print(f"precompiled {len(jobs)} fold launches in {time.time() - t:.1f} s", flush=True)

    def table_fold(self):
        print("\n==== fold design: per-op best (us) and per-layer chains (us/layer) ====")
        for k, o in self.res.get("fold", {}).items():
            print(k, "  ".join(f"{op} {v['us']:.2f} [{v['best']}]" for op, v in o["ops"].items() if v["us"]))
            print("   chains", {kk: round(vv, 2) for kk, vv in o["chains_us_per_layer"].items()},
                  "lm_head", o.get("lm_head_default_us"), "->", o.get("lm_head_triton_us"),
                  "step saving ms: plain", o.get("step_saving_ms_triton_plain_unfused"),
                  "fold", o.get("step_saving_ms_triton_fold"))
        print("ceilings", self.res["ceilings"], "errors", len(self.res["errors"]), self.res["errors"][:5])

    # -- plain GEMV -----------------------------------------------------------------------------
    def blas_time(self, shape, M, backend):
        N, K = SHAPES[shape]
        Ws = self.W[shape]
        x = torch.randn(M, K, device=self.dev, dtype=torch.bfloat16)
        prev = torch.backends.cuda.preferred_blas_library()
        try:
            if backend != "default":
                torch.backends.cuda.preferred_blas_library(backend)
            r = time_graph(lambda i: F.linear(x, Ws[i % len(Ws)]), reps=self.args.reps)
        finally:
            torch.backends.cuda.preferred_blas_library(prev)
        return r

    def check_tri(self, shape, M, cfg, times=1) -> float:
        N, K = SHAPES[shape]
        wc, wf = self.Wc[shape]
        worst = 0.0
        for _ in range(times):
            x = torch.randn(M, K, device=self.dev, dtype=torch.bfloat16)
            y = torch.full((M, N), float("nan"), device=self.dev, dtype=torch.bfloat16)
            tri_linear(x, wc, cfg, y, self.ws)
            worst = max(worst, rel_err(y, x.float() @ wf.T))
        return worst

    def tri_time(self, shape, M, cfg, reps):
        N, K = SHAPES[shape]
        Ws = self.W[shape]
        x = torch.randn(M, K, device=self.dev, dtype=torch.bfloat16)
        y = torch.empty(M, N, device=self.dev, dtype=torch.bfloat16)
        return time_graph(lambda i: tri_linear(x, Ws[i % len(Ws)], cfg, y, self.ws), reps=reps)

    def plain(self, shape, M):
        N, K = SHAPES[shape]
        wb = N * K * 2
        key = f"{shape}/M{M}"
        out = dict(shape=shape, M=M, N=N, K=K, weight_mb=wb / 2**20, blas={}, triton={})
        tbps = lambda us: wb / (us * 1e-6) / 1e12  # noqa: E731
        for be in ("default", "cublas", "cublaslt"):
            try:
                r = self.blas_time(shape, M, be)
                r["TBps"] = tbps(r["us"])
                out["blas"][be] = r
            except Exception as e:  # noqa: BLE001
                self.err(f"{key} blas {be}", e)
        # Triton: check, quick time for all, long time for the top 3.
        quick = {}
        for c in plain_cfgs(shape, M):
            try:
                e = self.check_tri(shape, M, c, times=3 if c.mode == "fixup" and c.split > 1 else 1)
                rec = dict(rel_err=e, ok=e < 1e-2)
                if rec["ok"]:
                    rec.update(self.tri_time(shape, M, c, reps=self.args.quick_reps))
                    quick[c.name] = rec["us"]
                out["triton"][c.name] = rec
            except Exception as ex:  # noqa: BLE001
                self.err(f"{key} {c.name}", ex)
                out["triton"][c.name] = dict(ok=False, error=f"{type(ex).__name__}: {str(ex)[:200]}")
        for name in sorted(quick, key=quick.get)[:3]:
            r = self.tri_time(shape, M, Cfg.parse(name), reps=self.args.reps)
            out["triton"][name].update(r, quick_us=quick[name])
        for rec in out["triton"].values():
            if "us" in rec:
                rec["TBps"] = tbps(rec["us"])
        ok = {k: v for k, v in out["triton"].items() if "us" in v and v.get("reps") == self.args.reps}
        if ok:
            b = min(ok, key=lambda k: ok[k]["us"])
            out["best_triton"] = dict(cfg=b, us=ok[b]["us"], TBps=ok[b]["TBps"], rel_err=ok[b]["rel_err"])
        if out["blas"]:
            b = min(out["blas"], key=lambda k: out["blas"][k]["us"])
            out["best_blas"] = dict(backend=b, us=out["blas"][b]["us"], TBps=out["blas"][b]["TBps"])
        cands = [("blas:" + k, v["us"]) for k, v in out["blas"].items()]
        if "best_triton" in out:
            cands.append(("triton:" + out["best_triton"]["cfg"], out["best_triton"]["us"]))
        if cands:
            b = min(cands, key=lambda c: c[1])
            out["best"] = dict(impl=b[0], us=b[1], TBps=tbps(b[1]))
        nz = int((self.ws.lock != 0).sum())
        if nz:  # a split-K counter left non-zero would break the next call: report and clear
            self.res["errors"].append(f"{key}: {nz} split-K counters not reset")
            self.ws.lock.zero_()
        self.res["plain"][key] = out
        bt = out.get("best_triton", {})
        print(f"[{self.elapsed():6.1f}s] {key:14s} default {out['blas'].get('default', {}).get('us', float('nan')):8.2f} us"
              f"  cublas {out['blas'].get('cublas', {}).get('us', float('nan')):8.2f}"
              f"  lt {out['blas'].get('cublaslt', {}).get('us', float('nan')):8.2f}"
              f"  triton {bt.get('us', float('nan')):8.2f} ({bt.get('cfg', '-')})", flush=True)
        self.save()

    def best_plain_call(self, shape, M):
        """The fastest plain implementation measured for (shape, M): a call(x, w, y) and its name."""
        b = self.res["plain"][f"{shape}/M{M}"]["best"]["impl"]
        kind, name = b.split(":", 1)
        if kind == "triton":
            c = Cfg.parse(name)
            return (lambda x, w, y: tri_linear(x, w, c, y, self.ws)), b, None
        # a BLAS backend: F.linear allocates its own output
        return (lambda x, w, y: F.linear(x, w)), b, (None if name == "default" else name)

    # -- fused variants ----------------------------------------------------------------------------
    def fused_norm(self, shape, M):
        N, K = SHAPES[shape]
        Ws = self.W[shape]
        wc, wf = self.Wc[shape]
        key = f"{shape}/M{M}"
        out = dict(shape=shape, M=M, variants={})
        d = torch.randn(M, K, device=self.dev, dtype=torch.bfloat16)
        r = torch.randn(M, K, device=self.dev, dtype=torch.bfloat16)
        ro = torch.empty_like(d)
        y = torch.empty(M, N, device=self.dev, dtype=torch.bfloat16)
        h = torch.empty_like(d)
        for c in NORM_CFGS:
            if c.kind == "fma" and M > FMA_MAX_M:
                continue
            for pro, pname in ((1, "exact"), (2, "scale")):
                nm = f"{pname}:{c.name}"
                try:
                    d2 = torch.randn(M, K, device=self.dev, dtype=torch.bfloat16)
                    r2 = torch.randn(M, K, device=self.dev, dtype=torch.bfloat16)
                    ro2 = torch.full_like(d2, float("nan"))
                    y2 = torch.full((M, N), float("nan"), device=self.dev, dtype=torch.bfloat16)
                    tri_linear(d2, wc, c, y2, self.ws, pro=pro, res=r2, g=self.ln_w, ro=ro2)
                    hs = d2 + r2
                    e = rel_err(y2, ref_rms(hs, self.ln_w).float() @ wf.T)
                    ro_ok = bool(torch.equal(ro2, hs))
                    rec = dict(rel_err=e, ro_exact=ro_ok, ok=e < 1e-2 and ro_ok)
                    if rec["ok"]:
                        rec.update(time_graph(lambda i, c=c, pro=pro: tri_linear(d, Ws[i % len(Ws)], c, y, self.ws, pro=pro, res=r,
                                                                   g=self.ln_w, ro=ro), reps=self.args.reps))
                    out["variants"][nm] = rec
                except Exception as ex:  # noqa: BLE001
                    self.err(f"fused norm {key} {nm}", ex)
                    out["variants"][nm] = dict(ok=False, error=f"{type(ex).__name__}: {str(ex)[:200]}")
        # unfused: add_rmsnorm kernel alone, and add_rmsnorm + the best plain GEMV as one chain
        out["add_rmsnorm_us"] = time_graph(lambda i: add_rmsnorm(d, r, self.ln_w, h, ro), reps=self.args.reps)["us"]
        call, impl, be = self.best_plain_call(shape, M)
        prev = torch.backends.cuda.preferred_blas_library()
        try:
            if be:
                torch.backends.cuda.preferred_blas_library(be)
            out["unfused_chain_us"] = time_graph(
                lambda i: call(add_rmsnorm(d, r, self.ln_w, h, ro)[0], Ws[i % len(Ws)], y), reps=self.args.reps)["us"]
        finally:
            torch.backends.cuda.preferred_blas_library(prev)
        out["unfused_gemv"] = impl
        out["unfused_gemv_us"] = self.res["plain"][key]["best"]["us"]
        # today: add_rmsnorm + F.linear with the default backend
        out["today_chain_us"] = time_graph(lambda i: F.linear(add_rmsnorm(d, r, self.ln_w, h, ro)[0], Ws[i % len(Ws)]),
                                           reps=self.args.reps)["us"]
        okv = {k: v for k, v in out["variants"].items() if "us" in v}
        if okv:
            b = min(okv, key=lambda k: okv[k]["us"])
            out["best_fused"] = dict(variant=b, us=okv[b]["us"], rel_err=okv[b]["rel_err"])
            for mode in ("exact", "scale"):
                mv = {k: v for k, v in okv.items() if k.startswith(mode)}
                if mv:
                    bm = min(mv, key=lambda k: mv[k]["us"])
                    out[f"best_{mode}"] = dict(variant=bm, us=mv[bm]["us"])
            out["saving_us"] = out["unfused_chain_us"] - out["best_fused"]["us"]
        self.res["fused"][f"norm+{key}"] = out
        print(f"[{self.elapsed():6.1f}s] fused norm+{key}: fused {out.get('best_fused', {}).get('us', float('nan')):.2f} us "
              f"({out.get('best_fused', {}).get('variant', '-')}) vs chain {out['unfused_chain_us']:.2f} "
              f"(add_rmsnorm {out['add_rmsnorm_us']:.2f} + {impl})", flush=True)
        self.save()

    def fused_down(self, M):
        shape = "down"
        N, K = SHAPES[shape]
        Ws = self.W[shape]
        wc, wf = self.Wc[shape]
        key = f"down/M{M}"
        out = dict(shape=shape, M=M, variants={})
        gu = torch.randn(M, 2 * K, device=self.dev, dtype=torch.bfloat16)
        res = torch.randn(M, N, device=self.dev, dtype=torch.bfloat16)
        act = torch.empty(M, K, device=self.dev, dtype=torch.bfloat16)
        for c in DOWN_CFGS:
            if c.kind == "fma" and M > FMA_MAX_M:
                continue
            nm = c.name
            try:
                worst, worst_d = 0.0, 0.0
                for _ in range(3 if c.split > 1 else 1):
                    gu2 = torch.randn(M, 2 * K, device=self.dev, dtype=torch.bfloat16)
                    r0 = torch.randn(M, N, device=self.dev, dtype=torch.bfloat16)
                    y2 = r0.clone()
                    tri_linear(gu2, wc, c, y2, self.ws, pro=3, add=True)
                    delta_ref = ref_silu_mul(gu2).float() @ wf.T
                    worst = max(worst, rel_err(y2, r0.float() + delta_ref))
                    worst_d = max(worst_d, rel_err(y2.float() - r0.float(), delta_ref))
                rec = dict(rel_err=worst, rel_err_delta=worst_d, ok=worst < 1e-2)
                if rec["ok"]:
                    rec.update(time_graph(lambda i, c=c: tri_linear(gu, Ws[i % len(Ws)], c, res, self.ws, pro=3, add=True),
                                          reps=self.args.reps))
                out["variants"][nm] = rec
            except Exception as ex:  # noqa: BLE001
                self.err(f"fused down {key} {nm}", ex)
                out["variants"][nm] = dict(ok=False, error=f"{type(ex).__name__}: {str(ex)[:200]}")
        out["silu_mul_us"] = time_graph(lambda i: silu_mul(gu, act), reps=self.args.reps)["us"]
        y = torch.empty(M, N, device=self.dev, dtype=torch.bfloat16)
        out["add_us"] = time_graph(lambda i: res.add_(y), reps=self.args.reps)["us"]
        call, impl, be = self.best_plain_call(shape, M)
        prev = torch.backends.cuda.preferred_blas_library()
        try:
            if be:
                torch.backends.cuda.preferred_blas_library(be)
            out["unfused_chain_us"] = time_graph(
                lambda i: call(silu_mul(gu, act), Ws[i % len(Ws)], y), reps=self.args.reps)["us"]

            def chain_add(i):
                o = call(silu_mul(gu, act), Ws[i % len(Ws)], y)
                res.add_(o if o is not None else y)
            out["unfused_chain_add_us"] = time_graph(chain_add, reps=self.args.reps)["us"]
        finally:
            torch.backends.cuda.preferred_blas_library(prev)
        out["unfused_gemv"] = impl
        out["unfused_gemv_us"] = self.res["plain"][key]["best"]["us"]
        out["today_chain_us"] = time_graph(lambda i: F.linear(silu_mul(gu, act), Ws[i % len(Ws)]),
                                           reps=self.args.reps)["us"]
        okv = {k: v for k, v in out["variants"].items() if "us" in v}
        if okv:
            b = min(okv, key=lambda k: okv[k]["us"])
            out["best_fused"] = dict(variant=b, us=okv[b]["us"], rel_err=okv[b]["rel_err"])
            out["saving_vs_silu+gemv_us"] = out["unfused_chain_us"] - out["best_fused"]["us"]
            out["saving_vs_silu+gemv+add_us"] = out["unfused_chain_add_us"] - out["best_fused"]["us"]
        self.res["fused"][f"silu+res+{key}"] = out
        print(f"[{self.elapsed():6.1f}s] fused silu+down+res {key}: fused {out.get('best_fused', {}).get('us', float('nan')):.2f} us "
              f"({out.get('best_fused', {}).get('variant', '-')}) vs chain {out['unfused_chain_us']:.2f} "
              f"(+add {out['unfused_chain_add_us']:.2f}; silu {out['silu_mul_us']:.2f}, add {out['add_us']:.2f}, {impl})",
              flush=True)
        self.save()

    # -- "fold" design: 4 kernels per layer's linears instead of 7 ----------------------------
    # qkv:     y = rstd(h) * (W' h), W' = W diag(g_ln1) folded at load time, h = the residual stream
    # o:       h += W a (residual add in the epilogue, in place)
    # gate|up: act = silu(g) * u from rows interleaved (gate_j, up_j), W' = W diag(g_ln2), rstd(h) epilogue
    # down:    h += W act (in place)
    FOLD_M1 = [Cfg("fma", 8, 1024, 4, 1), Cfg("fma", 4, 2048, 4, 1), Cfg("fma", 16, 512, 8, 1),
               Cfg("fma", 32, 256, 4, 1), Cfg("fma", 4, 2048, 4, 2), Cfg("fma", 2, 4096, 4, 1),
               Cfg("fma", 8, 2048, 8, 1), Cfg("dot", 64, 128, 4, 6), Cfg("dot", 16, 512, 2, 3)]
    FOLD_MN = [Cfg("dot", 64, 128, 4, 6), Cfg("dot", 64, 128, 4, 4), Cfg("dot", 16, 512, 2, 3),
               Cfg("dot", 32, 256, 4, 4), Cfg("dot", 64, 128, 4, 8), Cfg("dot", 32, 128, 4, 8)]
    FOLD_SPLIT = [Cfg("dot", 64, 128, 4, 4, 4, "fixup"), Cfg("dot", 64, 128, 4, 6, 2, "fixup"),
                  Cfg("dot", 64, 128, 4, 6, 4, "fixup")]
    FOLD_SPLIT_M1 = [Cfg("fma", 8, 1024, 4, 1, 2, "fixup"), Cfg("fma", 4, 2048, 4, 1, 2, "fixup")]

    def fold_cands(self, op, M):
        c = list(self.FOLD_M1 if M == 1 else self.FOLD_MN)
        if op in ("o_plain", "o_add", "down_plain", "down_add", "qkv_plain"):
            c += self.FOLD_SPLIT + (self.FOLD_SPLIT_M1 if M == 1 else [])
        return c

    def fold_op(self, op, M, c, check: bool, warmup=False):
        """Returns (call(i) for timing, rel_err of a fresh check or None)."""
        shape = {"qkv": "qkv", "o": "o", "gu": "gate_up", "down": "down"}[op.split("_")[0]]
        N, K = SHAPES[shape]
        Ws = self.W[shape]
        bf = torch.bfloat16
        kw = {}
        if op.endswith("_fold") or op == "gu_fold_glu":
            kw["pro"] = 4
        if op.endswith("_add"):
            kw["add"] = True
        if op.endswith("glu"):
            kw["glu"] = True
        nout = N // 2 if kw.get("glu") else N
        x = torch.randn(M, K, device=self.dev, dtype=bf)
        y = torch.randn(M, nout, device=self.dev, dtype=bf)
        if warmup:
            tri_linear(x, Ws[0], c, y, self.ws, warmup=True, **kw)
            return None, None
        call = lambda i: tri_linear(x, Ws[i % len(Ws)], c, y, self.ws, **kw)  # noqa: E731
        err = None
        if check:
            wc, wf = self.Wc[shape]
            xc = torch.randn(M, K, device=self.dev, dtype=bf)
            if kw.get("pro") == 4:
                wk = (wc.float() * self.ln_w.float()[None, :]).to(bf)  # the folded weight
                ref_in = ref_rms(xc, self.ln_w).float()  # reference: normalise, round, scale
            else:
                wk, ref_in = wc, xc.float()
            ref = ref_in @ wf.T
            if kw.get("glu"):
                refb = ref.to(bf)
                ref = ref_silu_mul(torch.cat([refb[:, 0::2], refb[:, 1::2]], dim=1)).float()
            r0 = torch.randn(M, nout, device=self.dev, dtype=bf)
            yc = r0.clone() if kw.get("add") else torch.full((M, nout), float("nan"), device=self.dev, dtype=bf)
            tri_linear(xc, wk, c, yc, self.ws, **kw)
            err = rel_err(yc.float() - r0.float(), ref) if kw.get("add") else rel_err(yc, ref)
        return call, err

    FOLD_OPS = ["qkv_plain", "qkv_fold", "o_plain", "o_add", "gu_plain", "gu_glu", "gu_fold_glu", "down_plain", "down_add"]

    def fold(self, M):
        out = dict(M=M, ops={})
        for op in self.FOLD_OPS:
            recs = {}
            for c in self.fold_cands(op, M):
                if "glu" in op and c.split > 1:
                    continue
                if ("fold" in op) and c.split > 1:
                    continue
                try:
                    call, err = self.fold_op(op, M, c, check=True)
                    rec = dict(rel_err=err, ok=err < 1e-2)
                    if rec["ok"]:
                        rec.update(time_graph(call, reps=self.args.quick_reps))
                    recs[c.name] = rec
                except Exception as ex:  # noqa: BLE001
                    self.err(f"fold {op} M{M} {c.name}", ex)
                    recs[c.name] = dict(ok=False, error=f"{type(ex).__name__}: {str(ex)[:200]}")
            ok = {k: v for k, v in recs.items() if "us" in v}
            for name in sorted(ok, key=lambda k: ok[k]["us"])[:2]:
                call, _ = self.fold_op(op, M, Cfg.parse(name), check=False)
                q = recs[name]["us"]
                recs[name].update(time_graph(call, reps=self.args.reps), quick_us=q)
            ok = {k: v for k, v in recs.items() if v.get("reps") == self.args.reps}
            best = min(ok, key=lambda k: ok[k]["us"]) if ok else None
            out["ops"][op] = dict(cands=recs, best=best, us=ok[best]["us"] if best else None)
        # whole-layer chains (linears + the small kernels only), 20 layers of distinct weights per graph
        bf = torch.bfloat16
        d = torch.randn(M, HIDDEN, device=self.dev, dtype=bf)
        res = torch.randn(M, HIDDEN, device=self.dev, dtype=bf)
        a = torch.randn(M, HIDDEN, device=self.dev, dtype=bf)
        h, ro, h2, ro2 = (torch.empty(M, HIDDEN, device=self.dev, dtype=bf) for _ in range(4))
        act = torch.empty(M, INTER, device=self.dev, dtype=bf)
        yq = torch.empty(M, SHAPES["qkv"][0], device=self.dev, dtype=bf)
        yo = torch.empty(M, HIDDEN, device=self.dev, dtype=bf)
        ygu = torch.empty(M, 2 * INTER, device=self.dev, dtype=bf)
        yd = torch.empty(M, HIDDEN, device=self.dev, dtype=bf)
        W = self.W
        L = lambda sh, i: W[sh][i % len(W[sh])]  # noqa: E731
        g = self.ln_w

        def today(i):
            hh, r1 = add_rmsnorm(d, res, g, h, ro)
            F.linear(hh, L("qkv", i))
            o = F.linear(a, L("o", i))
            hh2, _ = add_rmsnorm(o, r1, g, h2, ro2)
            F.linear(silu_mul(F.linear(hh2, L("gate_up", i)), act), L("down", i))

        best = {op: Cfg.parse(v["best"]) for op, v in out["ops"].items() if v["best"]}
        chains = {"today_default_blas": today}
        if all(k in best for k in ("qkv_plain", "o_plain", "gu_plain", "down_plain")):
            def unfused(i):
                hh, r1 = add_rmsnorm(d, res, g, h, ro)
                tri_linear(hh, L("qkv", i), best["qkv_plain"], yq, self.ws)
                tri_linear(a, L("o", i), best["o_plain"], yo, self.ws)
                hh2, _ = add_rmsnorm(yo, r1, g, h2, ro2)
                tri_linear(hh2, L("gate_up", i), best["gu_plain"], ygu, self.ws)
                tri_linear(silu_mul(ygu, act), L("down", i), best["down_plain"], yd, self.ws)
            chains["triton_plain_unfused"] = unfused
        if all(k in best for k in ("qkv_fold", "o_add", "gu_fold_glu", "down_add")):
            def folded(i):
                tri_linear(res, L("qkv", i), best["qkv_fold"], yq, self.ws, pro=4)
                tri_linear(a, L("o", i), best["o_add"], res, self.ws, add=True)
                tri_linear(res, L("gate_up", i), best["gu_fold_glu"], act, self.ws, pro=4, glu=True)
                tri_linear(act, L("down", i), best["down_add"], res, self.ws, add=True)
            chains["triton_fold"] = folded
        out["chains_us_per_layer"] = {}
        for k, fn in chains.items():
            try:
                out["chains_us_per_layer"][k] = time_graph(fn, reps=self.args.reps)["us"]
            except Exception as ex:  # noqa: BLE001
                self.err(f"fold chain {k} M{M}", ex)
        # lm_head, same run: default BLAS vs the best Triton config of run 1's sweep
        try:
            x = torch.randn(M, HIDDEN, device=self.dev, dtype=bf)
            yl = torch.empty(M, SHAPES["lm_head"][0], device=self.dev, dtype=bf)
            Wl = W["lm_head"]
            cl = Cfg("dot", 64, 128, 4, 4) if M <= 8 else Cfg("dot", 128, 128, 8, 4)
            out["lm_head_default_us"] = time_graph(lambda i: F.linear(x, Wl[i % len(Wl)]), reps=10)["us"]
            out["lm_head_triton_us"] = time_graph(lambda i: tri_linear(x, Wl[i % len(Wl)], cl, yl, self.ws),
                                                  reps=10)["us"]
            out["lm_head_triton_cfg"] = cl.name
        except Exception as ex:  # noqa: BLE001
            self.err(f"fold lm_head M{M}", ex)
        ch = out["chains_us_per_layer"]
        if "today_default_blas" in ch and "lm_head_default_us" in out:
            lm_save = out["lm_head_default_us"] - out["lm_head_triton_us"]
            for k in ("triton_plain_unfused", "triton_fold"):
                if k in ch:
                    out[f"step_saving_ms_{k}"] = ((ch["today_default_blas"] - ch[k]) * LAYERS + lm_save) / 1e3
        self.res.setdefault("fold", {})[f"M{M}"] = out
        bo = {op: (v["best"], round(v["us"], 2) if v["us"] else None) for op, v in out["ops"].items()}
        print(f"[{self.elapsed():6.1f}s] fold M{M}: chains/layer {ch}; lm_head {out.get('lm_head_default_us')} -> "
              f"{out.get('lm_head_triton_us')}; best {bo}", flush=True)
        self.save()

    def kernel_names(self):
        """Which kernels F.linear launches per backend (eager, one profiler session each)."""
        from torch.profiler import ProfilerActivity, profile
        for M in (1, 4):
            for shape, (N, K) in SHAPES.items():
                x = torch.randn(M, K, device=self.dev, dtype=torch.bfloat16)
                w = self.W[shape][0]
                for be in ("default", "cublas", "cublaslt"):
                    prev = torch.backends.cuda.preferred_blas_library()
                    try:
                        if be != "default":
                            torch.backends.cuda.preferred_blas_library(be)
                        F.linear(x, w)
                        torch.cuda.synchronize()
                        with profile(activities=[ProfilerActivity.CUDA]) as prof:
                            F.linear(x, w)
                            torch.cuda.synchronize()
                        names = [e.name for e in prof.events() if str(e.device_type).endswith("CUDA")]
                        self.res["kernel_names"][f"{shape}/M{M}/{be}"] = [n[:120] for n in names]
                    except Exception as e:  # noqa: BLE001
                        self.err(f"kernel names {shape} M{M} {be}", e)
                    finally:
                        torch.backends.cuda.preferred_blas_library(prev)
        self.save()

    # -- summary ---------------------------------------------------------------------------------
    def summary(self):
        P, Fu = self.res["plain"], self.res["fused"]
        s = {}
        try:
            per_layer = ["qkv", "o", "gate_up", "down"]
            for M in MS:
                if not all(f"{sh}/M{M}" in P for sh in SHAPES):
                    continue
                today = sum(P[f"{sh}/M{M}"]["blas"]["default"]["us"] for sh in per_layer) * LAYERS + \
                    P[f"lm_head/M{M}"]["blas"]["default"]["us"]
                best = sum(P[f"{sh}/M{M}"]["best"]["us"] for sh in per_layer) * LAYERS + P[f"lm_head/M{M}"]["best"]["us"]
                wbytes = sum(SHAPES[sh][0] * SHAPES[sh][1] * 2 for sh in per_layer) * LAYERS + \
                    SHAPES["lm_head"][0] * SHAPES["lm_head"][1] * 2
                s[f"M{M}"] = dict(linear_today_default_ms=today / 1e3, linear_best_plain_ms=best / 1e3,
                                  plain_saving_ms=(today - best) / 1e3,
                                  # weight bytes over the read-only ceiling (the copy figure of this
                                  # script came out low on the H200, 2.8 TB/s, unexplained)
                                  linear_floor_at_read_bw_ms=wbytes / (self.res["ceilings"].get("read_sum_TBps", 4.2) * 1e12) * 1e3)
                # fusion on top of the best plain: per layer, the chains replaced by fused kernels
                fk = [f"norm+qkv/M{M}", f"norm+gate_up/M{M}", f"silu+res+down/M{M}"]
                if all(k in Fu and "best_fused" in Fu[k] for k in fk):
                    # today's chain: add_rmsnorm + default-BLAS qkv, add_rmsnorm + gate_up, silu_mul + down
                    t_today = (Fu[fk[0]]["add_rmsnorm_us"] + P[f"qkv/M{M}"]["blas"]["default"]["us"]
                               + Fu[fk[1]]["add_rmsnorm_us"] + P[f"gate_up/M{M}"]["blas"]["default"]["us"]
                               + Fu[fk[2]]["silu_mul_us"] + P[f"down/M{M}"]["blas"]["default"]["us"]
                               + P[f"o/M{M}"]["blas"]["default"]["us"])
                    t_fused = (Fu[fk[0]]["best_fused"]["us"] + Fu[fk[1]]["best_fused"]["us"]
                               + Fu[fk[2]]["best_fused"]["us"] + P[f"o/M{M}"]["best"]["us"])
                    t_chain_best = Fu[fk[0]]["unfused_chain_us"] + Fu[fk[1]]["unfused_chain_us"] + \
                        Fu[fk[2]]["unfused_chain_us"] + P[f"o/M{M}"]["best"]["us"]
                    t_today_chain = (Fu[fk[0]]["today_chain_us"] + Fu[fk[1]]["today_chain_us"]
                                     + Fu[fk[2]]["today_chain_us"] + P[f"o/M{M}"]["blas"]["default"]["us"])
                    lm = P[f"lm_head/M{M}"]
                    s[f"M{M}"].update(
                        layer_today_sum_of_parts_us=t_today, layer_today_chains_us=t_today_chain,
                        layer_best_unfused_chains_us=t_chain_best, layer_fused_us=t_fused,
                        step_saving_fused_vs_today_chains_ms=((t_today_chain - t_fused) * LAYERS
                                                              + lm["blas"]["default"]["us"] - lm["best"]["us"]) / 1e3,
                        step_saving_fused_vs_today_ms=((t_today - t_fused) * LAYERS
                                                       + lm["blas"]["default"]["us"] - lm["best"]["us"]) / 1e3,
                        step_saving_unfused_best_vs_today_ms=((t_today - t_chain_best) * LAYERS
                                                              + lm["blas"]["default"]["us"] - lm["best"]["us"]) / 1e3)
        except Exception as e:  # noqa: BLE001
            self.err("summary", e)
        self.res["summary"] = s
        self.save()

    def table(self):
        P = self.res["plain"]
        print("\n==== plain GEMV, us per call (TB/s on weight bytes) ====", flush=True)
        print(f"{'shape/M':14s} {'default':>15s} {'cublas':>15s} {'cublaslt':>15s} {'triton best':>15s}  config")
        for M in sorted({v['M'] for v in P.values()}):
            for sh in SHAPES:
                k = f"{sh}/M{M}"
                if k not in P:
                    continue
                o = P[k]
                cell = lambda r: f"{r['us']:7.2f} ({r['TBps']:4.2f})" if r else f"{'-':>15s}"  # noqa: E731
                print(f"{k:14s} {cell(o['blas'].get('default'))} {cell(o['blas'].get('cublas'))} "
                      f"{cell(o['blas'].get('cublaslt'))} {cell(o.get('best_triton'))}  {o.get('best_triton', {}).get('cfg', '-')}")
        print("\n==== fused vs unfused chains, us per call ====")
        for k, o in self.res["fused"].items():
            bf = o.get("best_fused", {})
            extra = f" +add {o['unfused_chain_add_us']:.2f}" if "unfused_chain_add_us" in o else ""
            print(f"{k:22s} fused {bf.get('us', float('nan')):7.2f} [{bf.get('variant', '-')}]  chain {o.get('unfused_chain_us', float('nan')):7.2f}{extra}"
                  f"  [{o.get('unfused_gemv')} {o.get('unfused_gemv_us', float('nan')):.2f}]")
        print("\n==== summary ====")
        print(json.dumps(self.res.get("summary", {}), indent=1))
        print("ceilings", self.res["ceilings"], "errors", len(self.res["errors"]), "skipped", self.res["skipped"])

    def run(self):
        self.setup()
        self.ceilings()
        secs = set(self.args.sections.split(","))
        self.res["meta"]["sections"] = sorted(secs)
        if "fold" in secs:
            self.precompile_fold()
            for M in [int(m) for m in self.args.fold_ms.split(",")]:
                if self.over():
                    self.res["skipped"].append(f"fold M{M}")
                    continue
                try:
                    self.fold(M)
                except Exception as e:  # noqa: BLE001
                    self.err(f"fold M{M}", e)
                    traceback.print_exc()
            self.res["meta"]["total_s"] = self.elapsed()
            self.save()
            self.table_fold()
            if "plain" not in secs:
                return
        self.precompile()
        self.save()
        for M in MS:
            for shape in SHAPES:
                if self.over():
                    self.res["skipped"].append(f"plain {shape}/M{M}")
                    continue
                try:
                    self.plain(shape, M)
                except Exception as e:  # noqa: BLE001
                    self.err(f"plain {shape}/M{M}", e)
                    traceback.print_exc()
            if M == FUSE_MS[-1]:
                for Mf in FUSE_MS:
                    for shape in ("qkv", "gate_up"):
                        if self.over():
                            self.res["skipped"].append(f"fused norm {shape}/M{Mf}")
                            continue
                        try:
                            self.fused_norm(shape, Mf)
                        except Exception as e:  # noqa: BLE001
                            self.err(f"fused norm {shape}/M{Mf}", e)
                            traceback.print_exc()
                    if self.over():
                        self.res["skipped"].append(f"fused down M{Mf}")
                        continue
                    try:
                        self.fused_down(Mf)
                    except Exception as e:  # noqa: BLE001
                        self.err(f"fused down M{Mf}", e)
                        traceback.print_exc()
        if not self.over():
            self.kernel_names()
        self.summary()
        self.res["meta"]["total_s"] = self.elapsed()
        self.save()
        self.table()


# ---------------------------------------------------------------------------------------------
# CPU self-test (Triton interpreter) and sm_90 compile check (no GPU)
# ---------------------------------------------------------------------------------------------


def selftest():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.manual_seed(0)
    DT = torch.float16  # the interpreter computes bf16 on raw bits (wrong); the kernels are dtype-generic
    ws = Workspace("cpu", max_parts=1 << 16, max_tiles=1024)
    bad = 0
    cfgs = [Cfg("fma", 16, 64, 4, 1), Cfg("fma", 8, 128, 4, 2), Cfg("dot", 32, 64, 4, 1), Cfg("dot", 64, 32, 4, 1)]
    cfgs.append(Cfg("fma", 16, 64, 4, 2))
    cfgs += [c._replace(split=s, mode=m) for c in cfgs[:3] for s in (2, 3) for m in ("reduce", "fixup")]
    for (N, K) in [(96, 256), (100, 320)]:  # even and uneven
        W = (torch.randn(N, K) / math.sqrt(K)).to(DT)
        Wf = W.float()
        g = (1 + 0.1 * torch.randn(K)).to(DT)
        for M in (1, 3, 4):
            for c in cfgs:
                x = torch.randn(M, K).to(DT)
                y = torch.full((M, N), float("nan")).to(DT)
                tri_linear(x, W, c, y, ws)
                e = rel_err(y, x.float() @ Wf.T)
                # norm prologues
                d, r = torch.randn(M, K).to(DT), torch.randn(M, K).to(DT)
                en = []
                for pro in ((1, 2) if c.split == 1 else (1,)):
                    ro = torch.full_like(d, float("nan"))
                    yn = torch.full((M, N), float("nan")).to(DT)
                    tri_linear(d, W, c, yn, ws, pro=pro, res=r, g=g, ro=ro)
                    en.append(rel_err(yn, ref_rms(d + r, g).float() @ Wf.T))
                    if not torch.equal(ro, d + r):
                        en.append(float("inf"))
                # silu + residual
                gu = torch.randn(M, 2 * K).to(DT)
                r0 = torch.randn(M, N).to(DT)
                yd = r0.clone()
                tri_linear(gu, W, c, yd, ws, pro=3, add=True)
                dref = ref_silu_mul(gu).float() @ Wf.T
                ed = rel_err(yd.float() - r0.float(), dref)
                if c.split == 1:  # fold (pro 4) and the GLU epilogue
                    Wg = (W.float() * g.float()[None, :]).to(DT)
                    yf = torch.full((M, N), float("nan")).to(DT)
                    tri_linear(x, Wg, c, yf, ws, pro=4)
                    en.append(rel_err(yf, ref_rms(x, g).float() @ Wf.T))
                    for pro in (0, 4):
                        yg = torch.full((M, N // 2), float("nan")).to(DT)
                        tri_linear(x, Wg if pro else W, c, yg, ws, pro=pro, glu=True)
                        rb = ((ref_rms(x, g).float() if pro else x.float()) @ Wf.T).to(DT)
                        en.append(rel_err(yg, ref_silu_mul(torch.cat([rb[:, 0::2], rb[:, 1::2]], 1)).float()))
                ok = e < 1e-2 and all(v < 1e-2 for v in en) and ed < 2e-2
                bad += not ok
                print(f"N{N} K{K} M{M} {c.name:28s} plain {e:.2e} norm {['%.2e' % v for v in en]} silu+res(delta) {ed:.2e}"
                      f" {'ok' if ok else 'FAIL'}", flush=True)
                assert int(ws.lock.abs().sum()) == 0, "split-K counters not reset"
    x = torch.randn(3, 64).to(DT)
    r = torch.randn(3, 64).to(DT)
    h, ro = torch.empty_like(x), torch.empty_like(x)
    g = torch.ones(64).to(DT)
    add_rmsnorm(x, r, g, h, ro)
    print("add_rmsnorm", rel_err(h, ref_rms(x + r, g).float()))
    gu = torch.randn(3, 128).to(DT)
    print("silu_mul", rel_err(silu_mul(gu, torch.empty(3, 64).to(DT)), ref_silu_mul(gu).float()))
    print("selftest", "FAILED" if bad else "passed", bad)
    return 1 if bad else 0


def compile_only():
    """Compile every variant for sm_90 with a stand-in driver (no GPU); print registers/spills."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class _Fake:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(_Fake())
    ws = Workspace("meta", max_parts=1 << 24, max_tiles=1 << 16)
    kerns = []
    t = time.time()
    dev = "meta"
    for M in MS:
        for shape, (N, K) in SHAPES.items():
            x = torch.empty(M, K, dtype=torch.bfloat16, device=dev)
            w = torch.empty(N, K, dtype=torch.bfloat16, device=dev)
            y = torch.empty(M, N, dtype=torch.bfloat16, device=dev)
            for c in plain_cfgs(shape, M):
                kerns.append((f"{shape}/M{M} {c.name}", lambda x=x, w=w, c=c, y=y: tri_linear(x, w, c, y, ws, warmup=True)))
    for M in FUSE_MS:
        d = torch.empty(M, HIDDEN, dtype=torch.bfloat16, device=dev)
        gln = torch.empty(HIDDEN, dtype=torch.bfloat16, device=dev)
        for shape in ("qkv", "gate_up"):
            w = torch.empty(*SHAPES[shape], dtype=torch.bfloat16, device=dev)
            y = torch.empty(M, SHAPES[shape][0], dtype=torch.bfloat16, device=dev)
            for c in NORM_CFGS:
                for pro in (1, 2):
                    kerns.append((f"norm{pro} {shape}/M{M} {c.name}", lambda c=c, pro=pro, y=y, w=w, d=d, gln=gln: tri_linear(
                        d, w, c, y, ws, pro=pro, res=d, g=gln, ro=d, warmup=True)))
        gu = torch.empty(M, 2 * INTER, dtype=torch.bfloat16, device=dev)
        w = torch.empty(HIDDEN, INTER, dtype=torch.bfloat16, device=dev)
        y = torch.empty(M, HIDDEN, dtype=torch.bfloat16, device=dev)
        for c in DOWN_CFGS:
            kerns.append((f"silu down/M{M} {c.name}", lambda c=c, y=y, gu=gu, w=w: tri_linear(gu, w, c, y, ws, pro=3, add=True,
                                                                                            warmup=True)))
    seen = {}
    for name, fn in kerns:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            print("COMPILE FAIL", name, type(e).__name__, str(e)[:2000])
            return 1
    print(f"compiled {len(kerns)} launches in {time.time() - t:.1f} s")
    # resource usage, from the cached cubins
    import glob
    import subprocess
    cobj = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for f in sorted(glob.glob(os.path.expanduser("~/.triton/cache/*/*.cubin"))):
        try:
            o = subprocess.run([cobj, "-res-usage", f], capture_output=True, text=True).stdout
            for ln in o.splitlines():
                if "REG" in ln:
                    seen[os.path.basename(f)] = ln.strip()
        except Exception:  # noqa: BLE001
            pass
    for k, v in seen.items():
        print(k, v)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gemv_micro"))
    ap.add_argument("--budget-s", type=float, default=270.0, help="stop starting new work after this")
    ap.add_argument("--reps", type=int, default=40, help="graph replays for reported times")
    ap.add_argument("--quick-reps", type=int, default=8, help="graph replays for the config sweep")
    ap.add_argument("--sections", default="plain", help="plain (sweep + fused + names) and/or fold")
    ap.add_argument("--fold-ms", default="1,2,4,8")
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--compile-only", action="store_true")
    a = ap.parse_args()
    if a.selftest:
        return selftest()
    if a.compile_only:
        return compile_only()
    if not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    b = Bench(a)
    try:
        b.run()
    except Exception as e:  # noqa: BLE001
        b.err("run", e)
        traceback.print_exc()
        b.save()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
