"""Rotary position embeddings (default, linear, llama3 and yarn scaling), HF convention.

cos/sin are computed for explicit positions, so every sequence of a ragged batch
carries its own offsets.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from orthrus_runtime.model.config import ModelConfig


def _yarn(cfg: ModelConfig, sc: dict[str, Any], dim: int) -> tuple[torch.Tensor, float]:
    base = cfg.rope_theta
    factor = float(sc["factor"])
    orig = int(sc.get("original_max_position_embeddings") or cfg.max_position_embeddings)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = sc.get("attention_factor")
    if attn_factor is None:
        if sc.get("mscale") and sc.get("mscale_all_dim"):
            attn_factor = mscale(factor, sc["mscale"]) / mscale(factor, sc["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)
    beta_fast = float(sc.get("beta_fast") or 32)
    beta_slow = float(sc.get("beta_slow") or 1)

    def corr_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    extra = 1.0 / pos_freqs
    inter = 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extra_factor = 1 - ramp
    inv = inter * (1 - extra_factor) + extra * extra_factor
    return inv.float(), float(attn_factor)


def inverse_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] float32, attention scaling applied to cos/sin)."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc: Optional[dict[str, Any]] = cfg.rope_scaling
    if not sc:
        return inv, 1.0
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return inv / float(sc["factor"]), 1.0
    if kind == "llama3":
        factor = float(sc["factor"])
        low_ff = float(sc["low_freq_factor"])
        high_ff = float(sc["high_freq_factor"])
        old_len = float(sc["original_max_position_embeddings"])
        low_wl = old_len / low_ff
        high_wl = old_len / high_ff
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(is_medium, smoothed, inv_l), 1.0
    if kind == "yarn":
        return _yarn(cfg, sc, dim)
    raise ValueError(f"unsupported rope_type {kind!r}")


class Rotary:
    def __init__(self, cfg: ModelConfig, device: torch.device):
        inv, self.scale = inverse_frequencies(cfg)
        self.inv_freq = inv.to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [*S] int -> cos, sin [*S, head_dim] in dtype."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [bs, T, heads, d]; cos/sin [bs, T, d]."""
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin
