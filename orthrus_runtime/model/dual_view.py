"""The dual-view transformer: one frozen base (Qwen3 or Llama) with two sets of
attention projections per layer.

The AR view (q/k/v/o_proj, q/k_norm) is the base model; it writes the KV cache.
The diffusion view (q/k/v/o_proj_diff, q/k_norm_diff) drafts a block
[anchor, MASK x (B-1)] in one pass: its queries read the AR view's cached keys
and values of the prefix plus its own block's keys and values (bidirectional
inside the block) and it writes nothing. Embeddings, MLPs, norms and lm_head are
shared. Parameter names follow the upstream Orthrus checkpoint layout.

How a pass reads and writes keys/values is decided by an `Attend` strategy
(paged cache for the engine, dense tensors for the reference decoder), so the
projection and layer code exists once.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from orthrus_runtime.model.config import ModelConfig
from orthrus_runtime.model.rope import Rotary, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [bs, T, H, d], k/v [bs, T, Hkv, d] (this pass's, rotated) -> out [bs, T, H, d]."""


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [bs, T, H, d]; k/v [bs, S, Hkv, d]; mask [bs, T, S] bool (True = visible) -> [bs, T, H, d]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask.unsqueeze(1),
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


class DualAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, kv, d, hid, b = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.attention_bias
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, d
        for suffix in ("", "_diff"):
            setattr(self, "q_proj" + suffix, nn.Linear(hid, h * d, bias=b))
            setattr(self, "k_proj" + suffix, nn.Linear(hid, kv * d, bias=b))
            setattr(self, "v_proj" + suffix, nn.Linear(hid, kv * d, bias=b))
            setattr(self, "o_proj" + suffix, nn.Linear(h * d, hid, bias=b))
            if cfg.qk_norm:
                setattr(self, "q_norm" + suffix, RMSNorm(d, cfg.rms_norm_eps))
                setattr(self, "k_norm" + suffix, RMSNorm(d, cfg.rms_norm_eps))
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, layer: int, attend: Attend, diff: bool) -> torch.Tensor:
        s = "_diff" if diff else ""
        bs, T, _ = x.shape
        q = getattr(self, "q_proj" + s)(x).view(bs, T, self.num_heads, self.head_dim)
        k = getattr(self, "k_proj" + s)(x).view(bs, T, self.num_kv_heads, self.head_dim)
        v = getattr(self, "v_proj" + s)(x).view(bs, T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = getattr(self, "q_norm" + s)(q)
            k = getattr(self, "k_norm" + s)(k)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = attend(layer, q, k, v)
        return getattr(self, "o_proj" + s)(out.reshape(bs, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = DualAttention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, layer: int, attend: Attend, diff: bool) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, attend, diff)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Where every id of the base vocabulary is taken (SmolLM2), the mask token is one
        # extra row owned by the diffusion view: id == vocab_size.
        self.register_parameter("mask_embedding", None)


class DualViewModel(nn.Module):
    """Weights plus the two forward views. Stateless: caches live outside."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rotary: Optional[Rotary] = None
        self.scale = cfg.head_dim**-0.5

    # -- helpers ---------------------------------------------------------------
    @property
    def rotary(self) -> Rotary:
        dev = self.lm_head.weight.device
        if self._rotary is None or self._rotary.inv_freq.device != dev:
            self._rotary = Rotary(self.cfg, dev)
        return self._rotary

    def add_mask_embedding(self, init: Optional[torch.Tensor] = None) -> int:
        """Give the diffusion view its own mask row (id == vocab_size); returns the id."""
        emb = self.model.embed_tokens.weight
        row = init if init is not None else emb.detach().float().mean(0)
        self.model.mask_embedding = nn.Parameter(row.reshape(1, -1).to(emb.dtype).to(emb.device).clone())
        return self.cfg.vocab_size

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [bs, T] -> [bs, T, hidden]."""
        table = self.model.embed_tokens.weight
        extra = self.model.mask_embedding
        if extra is None:
            return F.embedding(ids, table)
        is_mask = ids == self.cfg.vocab_size
        h = F.embedding(ids.clamp(max=self.cfg.vocab_size - 1), table)
        return torch.where(is_mask.unsqueeze(-1), extra.to(h.dtype).expand_as(h), h)

    # -- forward ---------------------------------------------------------------
    def forward_hidden(self, ids: torch.Tensor, positions: torch.Tensor, attend: Attend, diff: bool) -> torch.Tensor:
        """ids/positions [bs, T] -> final-normed hidden states [bs, T, hidden]."""
        x = self.embed(ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, i, attend, diff)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden] -> float32 logits [..., vocab]."""
        return self.lm_head(hidden).float()


# ---------------------------------------------------------------------------
# Attend strategies over dense per-sequence tensors (the reference decoder and training).


PastKV = Optional[list[tuple[torch.Tensor, torch.Tensor]]]  # per layer (k, v) [bs, S, Hkv, d]


def _after_past(past: PastKV, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This pass's k/v appended to the layer's dense past, if any."""
    if past is None:
        return k, v
    pk, pv = past[layer]
    return torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)


class DenseAR:
    """AR view over dense past K/V of one batch of equal-length sequences; appends its K/V."""

    def __init__(self, past: PastKV, scale: float):
        self.past = past
        self.new: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.scale = scale

    def __call__(self, layer, q, k, v):
        k, v = _after_past(self.past, layer, k, v)
        self.new.append((k, v))
        T, S = q.shape[1], k.shape[1]
        qpos = torch.arange(S - T, S, device=q.device)
        mask = (torch.arange(S, device=q.device)[None, :] <= qpos[:, None]).expand(q.shape[0], T, S)
        return sdpa(q, k, v, mask, self.scale)


class DenseDraft:
    """Diffusion view: reads the AR view's dense past K/V plus its own block, writes nothing."""

    def __init__(self, past: PastKV, scale: float):
        self.past = past
        self.scale = scale

    def __call__(self, layer, q, k, v):
        k, v = _after_past(self.past, layer, k, v)
        mask = torch.ones(q.shape[0], q.shape[1], k.shape[1], dtype=torch.bool, device=q.device)
        return sdpa(q, k, v, mask, self.scale)
