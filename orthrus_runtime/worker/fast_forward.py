"""The fast forward pass: one flat token batch per pass, packed projections, fused ops.

A pass is `bs` sequences of `T` tokens each: sequence i has `start[i]` tokens cached
and `nvalid[i]` real tokens in this pass (the rest is padding). The AR view writes its
valid tokens' K/V into the paged cache and attends causally; the diffusion view
writes nothing and attends bidirectionally inside its block. Everything that varies
between steps is a tensor (no host values are read), so the same call can be
captured in a CUDA graph and replayed with new contents.

Three op sets compute the same function: `TorchOps` (plain PyTorch, any device; the
reference the others are tested against), `TritonOps` (the kernels of
`triton_kernels`, CUDA) and `FlashAttnOps` (TritonOps with attention through
flash-attn 4, `flash_attn.cute.flash_attn_varlen_func`, on Hopper and Blackwell in
bf16/fp16). `make_ops` picks one from the `attention_backend` setting; "auto" takes
flash-attn for prefill-sized passes only (see `make_ops`).

Projections are packed per layer and view (q|k|v as one
matrix, gate|up as one) so that a layer is 4 GEMMs; the modules' weights become
views of the packed tensors, so no memory is duplicated. `ops.linear` runs them (and
lm_head, through `logits`): cuBLAS, or for passes of at most 32 half-precision rows
the skinny Triton kernels.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from orthrus_runtime.worker.kv_cache import KVCache
from orthrus_runtime.model.dual_view import DualViewModel, sdpa
from orthrus_runtime.model.rope import apply_rotary


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's RMSNorm: normalise in float32, round, then scale (as model.RMSNorm)."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


ATTENTION_BACKENDS = ("auto", "flash_attn", "triton", "torch")


class _Ops:
    def pass_meta(self, start, nvalid, bt, T: int, diff: bool, page: int):
        """Whatever attention needs once per pass rather than per layer (None: nothing)."""
        return None


class TorchOps(_Ops):
    """Plain PyTorch ops (CPU, or CUDA without Triton). Eager only: host-side filtering."""

    name = "torch"
    graphable = False

    def add_rmsnorm(self, x, res, w, eps):
        if res is not None:
            x = x + res
        return _rms(x, w, eps), x

    def qk_norm_rope(self, qkv, cos, sin, qw, kw, H, HKV, D, eps, kc=None, vc=None, slots=None):
        n = qkv.shape[0]
        q = qkv[:, : H * D].reshape(n, H, D)
        k = qkv[:, H * D: (H + HKV) * D].reshape(n, HKV, D)
        if qw is not None:
            q, k = _rms(q, qw, eps), _rms(k, kw, eps)
        c, s = cos.unsqueeze(0), sin.unsqueeze(0)
        q = apply_rotary(q.unsqueeze(0), c, s)[0]
        k = apply_rotary(k.unsqueeze(0), c, s)[0]
        if slots is not None:
            keep = slots >= 0
            v = qkv[:, (H + HKV) * D:].reshape(n, HKV, D)
            kc.view(-1, HKV, D).index_copy_(0, slots[keep], k[keep])
            vc.view(-1, HKV, D).index_copy_(0, slots[keep], v[keep])
        return q.contiguous(), k.contiguous()

    def attention(self, q, kb, vb, kc, vc, bt, start, nvalid, T, scale, causal, meta=None):
        n, H, D = q.shape
        bs, HKV, page = start.shape[0], kb.shape[1], kc.shape[1]
        dev = q.device
        nb = max(1, -(-int(start.max()) // page)) if bs else 1
        K = kc[bt[:, :nb].long()].reshape(bs, nb * page, HKV, D)
        V = vc[bt[:, :nb].long()].reshape(bs, nb * page, HKV, D)
        pre = (torch.arange(nb * page, device=dev).view(1, 1, -1) < start.view(bs, 1, 1).long()).expand(bs, T, -1)
        j = torch.arange(T, device=dev)
        own = (j.view(1, 1, T) < nvalid.view(bs, 1, 1).long()).expand(bs, T, T)
        if causal:
            own = own & (j.view(1, 1, T) <= j.view(1, T, 1))
        mask = torch.cat([pre, own], dim=-1)
        keys = torch.cat([K, kb.reshape(bs, T, HKV, D)], dim=1)
        vals = torch.cat([V, vb.reshape(bs, T, HKV, D)], dim=1)
        out = sdpa(q.reshape(bs, T, H, D), keys, vals, mask, scale)
        # A row that sees no key (padding) is NaN under SDPA; the Triton kernel gives zeros.
        out = torch.where(mask.any(-1).view(bs, T, 1, 1), out, torch.zeros_like(out))
        return out.reshape(n, H, D)

    def silu_mul(self, gu):
        g, u = gu.chunk(2, dim=-1)
        return F.silu(g) * u

    def linear(self, x, w, b=None):
        return F.linear(x, w, b)


class TritonOps(_Ops):
    """The fused Triton kernels: capturable in CUDA graphs."""

    name = "triton"
    graphable = True

    def __init__(self):
        from orthrus_runtime.worker import triton_kernels as tk

        self.tk = tk

    def add_rmsnorm(self, x, res, w, eps):
        return self.tk.add_rmsnorm(x, res, w, eps)

    def qk_norm_rope(self, qkv, cos, sin, qw, kw, H, HKV, D, eps, kc=None, vc=None, slots=None):
        return self.tk.qk_norm_rope(qkv, cos, sin, qw, kw, H, HKV, D, eps, kc, vc, slots)

    def attention(self, q, kb, vb, kc, vc, bt, start, nvalid, T, scale, causal, meta=None):
        # Small batches spread long prefixes over several programs (triton_kernels.num_splits).
        return self.tk.paged_attention(q, kb, vb, kc, vc, bt, start, nvalid, T, scale, causal)

    def silu_mul(self, gu):
        return self.tk.silu_mul(gu)

    def linear(self, x, w, b=None):
        """A few half-precision rows: the skinny Triton kernels; anything else: cuBLAS."""
        if b is None and self.tk.skinny_linear_applies(x, w):
            return self.tk.skinny_linear(x, w)
        return F.linear(x, w, b)


@dataclass
class _FlashMeta:
    table: torch.Tensor  # [bs, W'] int32, unit stride: the block table, widened for the AR view
    kv_len: torch.Tensor  # [bs] int32: keys read from the cache (AR: start + T; diffusion: start)


class FlashAttnOps(TritonOps):
    """TritonOps with attention through flash-attn 4 (`flash_attn_varlen_func`, batched q of
    [bs, T, H, D], paged K/V through `page_table`, lengths through `seqused_k`), for passes
    of at least `min_tokens` tokens a sequence.

    AR view: qk_norm_rope has already written this pass's K/V into the cache, so one causal
    call over the cache does it. Its causal mask is aligned to the last key, so each
    sequence reads start + T keys (T: the padded pass length): row i then sees keys
    0..start+i, exactly its own prefix; padding rows (i >= nvalid) see slots nothing
    wrote this pass, or zero-filled block-table columns (block 0), whose finite values only
    reach outputs that are discarded. (Telling it nvalid instead, through seqused_q, would
    leave padding rows unwritten: uninitialised memory, possibly NaN.)
    Diffusion view: it must not write the cache, so two calls, each returning its
    log-sum-exp: the cached prefix (start keys, no mask) and the block's own keys (nvalid,
    no mask), merged exactly by `triton_kernels.merge_attention` (padding rows: zeros)."""

    def __init__(self, min_tokens: int = 1):
        """min_tokens: passes of fewer tokens per sequence run the Triton kernel instead."""
        super().__init__()
        from flash_attn.cute import flash_attn_varlen_func

        self.fa = flash_attn_varlen_func
        self.min_tokens = min_tokens
        self.name = "flash-attn4" if min_tokens <= 1 else f"flash-attn4(passes>={min_tokens})+triton"

    def pass_meta(self, start, nvalid, bt, T: int, diff: bool, page: int):
        if T < self.min_tokens:
            return None  # the Triton kernel's pass
        extra = 0 if diff else -(-T // page)  # room for start + T keys: zero columns (block 0)
        return _FlashMeta(F.pad(bt, (0, extra)).contiguous(), start if diff else start + T)

    def attention(self, q, kb, vb, kc, vc, bt, start, nvalid, T, scale, causal, meta=None):
        if meta is None:
            return super().attention(q, kb, vb, kc, vc, bt, start, nvalid, T, scale, causal)
        n, H, D = q.shape
        bs, HKV = start.shape[0], kb.shape[1]
        q4 = q.view(bs, T, H, D)
        if causal:
            out, _ = self.fa(q4, kc, vc, seqused_k=meta.kv_len, page_table=meta.table, softmax_scale=scale,
                             causal=True)
            return out.view(n, H, D)
        o1, l1 = self.fa(q4, kc, vc, seqused_k=meta.kv_len, page_table=meta.table, softmax_scale=scale,
                         return_lse=True)
        o2, l2 = self.fa(q4, kb.view(bs, T, HKV, D), vb.view(bs, T, HKV, D), seqused_k=nvalid,
                         softmax_scale=scale, return_lse=True)
        return self.tk.merge_attention(o1, l1, o2, l2, nvalid).view(n, H, D)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_supports(model: DualViewModel) -> bool:
    """The kernels need a power-of-two head size (tile shapes) of at least 16 (tl.dot)."""
    d = model.cfg.head_dim
    return d >= 16 and d & (d - 1) == 0


def flash_attn_unsupported(device: torch.device, model: DualViewModel) -> Optional[str]:
    """Why flash-attn 4 cannot run this model here (None: it can)."""
    if device.type != "cuda":
        return f"flash-attn needs CUDA (the device is {device})"
    # The dtype first: for a float32 model, installing flash-attn would not help.
    dtype = model.lm_head.weight.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        return f"flash-attn 4 computes in bfloat16/float16, not {dtype}"
    if not triton_available() or not triton_supports(model):
        return "flash-attn runs beside the Triton kernels, which need triton and a power-of-two head size"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn 4 is not installed (pip install flash-attn-4)"
    try:
        from flash_attn.cute import flash_attn_varlen_func  # noqa: F401
    except Exception as e:  # noqa: BLE001  (flash-attn 2 alone, or a broken CuTe DSL install)
        return f"flash-attn 4 does not import ({type(e).__name__}: {e})"
    major = torch.cuda.get_device_capability(device)[0]
    if major not in (9, 10):
        return f"flash-attn 4 paged attention needs Hopper or Blackwell (compute capability {major}.x here)"
    d = model.cfg.head_dim
    if d % 8 or not 8 <= d <= (256 if major == 9 else 128):
        return f"flash-attn 4 does not support head size {d} on compute capability {major}.x"
    return None


# "auto" leaves passes of up to 64 tokens a sequence (every decode pass: verify, draft, AR
# step) to the Triton kernel. Measured on an H200 (8B shape, bf16; benchmarks/engine.py's
# attention section): in graphed decode flash-attn 4 ties it at batch 1 and 32 but is 8 %
# slower at batch 128 (AR step 7.06 vs 6.52 ms), and a 32-token draft over an 8192-token
# context takes 20.5 vs 13.7 ms (no split-KV on SM90 in flash-attn 4); prefill passes are
# where it is as fast or faster.
AUTO_FLASH_MIN_TOKENS = 65


def make_ops(backend: str, device: torch.device, model: DualViewModel):
    """The fast path's op set. auto: flash-attn 4 for prefill-sized passes where it runs this
    model (AUTO_FLASH_MIN_TOKENS), the Triton kernels otherwise on CUDA, else plain torch;
    flash_attn: flash-attn 4 for every pass. A backend named explicitly that cannot run is an error."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return TorchOps()
    if backend in ("auto", "flash_attn"):
        why = flash_attn_unsupported(device, model)
        if why is None:
            return FlashAttnOps(AUTO_FLASH_MIN_TOKENS if backend == "auto" else 1)
        if backend == "flash_attn":
            raise ValueError(f"attention_backend 'flash_attn': {why}")
    triton_ok = device.type == "cuda" and triton_available() and triton_supports(model)
    if backend == "triton" and not triton_ok:
        raise ValueError("attention_backend 'triton' needs CUDA, triton and a power-of-two head size of at least 16")
    return TritonOps() if triton_ok else TorchOps()


@dataclass
class _View:
    w_qkv: torch.Tensor
    b_qkv: Optional[torch.Tensor]
    w_o: torch.Tensor
    b_o: Optional[torch.Tensor]
    q_norm: Optional[torch.Tensor]
    k_norm: Optional[torch.Tensor]


@dataclass
class _Layer:
    ar: _View
    diff: _View
    ln1: torch.Tensor
    ln2: torch.Tensor
    w_gu: torch.Tensor
    b_gu: Optional[torch.Tensor]
    w_down: torch.Tensor
    b_down: Optional[torch.Tensor]


def _pack(mods: list[torch.nn.Linear]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Concatenate the modules' weights (and biases) and make each module's parameter a
    view of the result, so the packed copy is the only copy."""
    w = torch.cat([m.weight.data for m in mods])
    b = torch.cat([m.bias.data for m in mods]) if mods[0].bias is not None else None
    off = 0
    for m in mods:
        r = m.weight.shape[0]
        m.weight.data = w[off: off + r]
        if b is not None:
            m.bias.data = b[off: off + r]
        off += r
    return w, b


class FastForward:
    def __init__(self, model: DualViewModel, kv: KVCache, ops=None):
        self.model, self.kv = model, kv
        dev = model.lm_head.weight.device
        self.ops = ops if ops is not None else make_ops("auto", dev, model)
        c = model.cfg
        self.H, self.HKV, self.D, self.eps = c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps
        self.page = kv.page_size
        self.layers = []
        with torch.no_grad():
            for layer in model.model.layers:
                att, mlp = layer.self_attn, layer.mlp
                views = []
                for s in ("", "_diff"):
                    w, b = _pack([getattr(att, p + "_proj" + s) for p in "qkv"])
                    o = getattr(att, "o_proj" + s)
                    qn = getattr(att, "q_norm" + s).weight if c.qk_norm else None
                    kn = getattr(att, "k_norm" + s).weight if c.qk_norm else None
                    views.append(_View(w, b, o.weight, o.bias, qn, kn))
                w_gu, b_gu = _pack([mlp.gate_proj, mlp.up_proj])
                self.layers.append(_Layer(views[0], views[1], layer.input_layernorm.weight,
                                          layer.post_attention_layernorm.weight, w_gu, b_gu,
                                          mlp.down_proj.weight, mlp.down_proj.bias))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, h] -> float32 logits [n, V] (the model's lm_head through ops.linear)."""
        head = self.model.lm_head
        return self.ops.linear(hidden, head.weight, head.bias).float()

    def slots(self, start: torch.Tensor, nvalid: torch.Tensor, bt: torch.Tensor, T: int) -> torch.Tensor:
        """Flat cache slot of every token of the pass; -1 for padding (not written)."""
        t = torch.arange(T, device=start.device)
        pos = start.long().unsqueeze(1) + t.unsqueeze(0)
        pidx = torch.div(pos, self.page, rounding_mode="floor").clamp(max=bt.shape[1] - 1)
        s = bt.gather(1, pidx).long() * self.page + pos % self.page
        return torch.where(t.unsqueeze(0) < nvalid.long().unsqueeze(1), s, torch.full_like(s, -1)).reshape(-1)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, start: torch.Tensor, nvalid: torch.Tensor, bt: torch.Tensor,
                diff: bool) -> torch.Tensor:
        """ids [bs, T] int64; start/nvalid [bs] int32; bt [bs, W] int32 -> final-normed hidden [bs*T, hidden].
        diff=False: AR view (writes K/V, causal); diff=True: diffusion view (writes nothing)."""
        m, ops = self.model, self.ops
        bs, T = ids.shape
        H, HKV, D, eps = self.H, self.HKV, self.D, self.eps
        pos = start.long().unsqueeze(1) + torch.arange(T, device=ids.device).unsqueeze(0)
        cos, sin = m.rotary.cos_sin(pos.reshape(-1), m.lm_head.weight.dtype)
        slots = None if diff else self.slots(start, nvalid, bt, T)
        meta = ops.pass_meta(start, nvalid, bt, T, diff, self.page)
        delta = m.embed(ids).reshape(bs * T, -1)
        res = None
        for i, L in enumerate(self.layers):
            v = L.diff if diff else L.ar
            h, res = ops.add_rmsnorm(delta, res, L.ln1, eps)
            qkv = ops.linear(h, v.w_qkv, v.b_qkv)
            kc, vc = self.kv.k[i], self.kv.v[i]
            q, k = ops.qk_norm_rope(qkv, cos, sin, v.q_norm, v.k_norm, H, HKV, D, eps,
                                    None if diff else kc, None if diff else vc, slots)
            vb = qkv[:, (H + HKV) * D:].view(bs * T, HKV, D)
            a = ops.attention(q, k, vb, kc, vc, bt, start, nvalid, T, m.scale, causal=not diff, meta=meta)
            delta = ops.linear(a.reshape(bs * T, H * D), v.w_o, v.b_o)
            h, res = ops.add_rmsnorm(delta, res, L.ln2, eps)
            delta = ops.linear(ops.silu_mul(ops.linear(h, L.w_gu, L.b_gu)), L.w_down, L.b_down)
        h, _ = ops.add_rmsnorm(delta, res, m.model.norm.weight, eps)
        return h
