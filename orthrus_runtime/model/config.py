"""ModelConfig: the shape of a dual-view model, read from a Hugging Face config dict.

Accepts Qwen3 (`model_type` qwen3, q/k RMSNorm), Llama (llama; SmolLM2) and upstream
Orthrus checkpoints (`model_type: "orthrus"`, a Qwen3 config plus `block_size` and
`mask_token_id`). Configs written by transformers 5 carry `rope_parameters` where
older ones carry `rope_theta` / `rope_scaling`: both are read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the field."""


ARCHITECTURES = {"qwen3": "qwen3", "orthrus": "qwen3", "llama": "llama"}


@dataclass
class ModelConfig:
    arch: str  # "qwen3" or "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool = False
    hidden_act: str = "silu"
    # Orthrus fields (None when the config is a plain base model's).
    block_size: Optional[int] = None
    mask_token_id: Optional[int] = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: Optional[int] = None
    is_orthrus: bool = False

    @property
    def qk_norm(self) -> bool:
        return self.arch == "qwen3"

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in ARCHITECTURES:
            raise CheckpointError(
                f"{source}: field 'model_type' is {mt!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
            )

        def need(key: str) -> Any:
            if key not in d or d[key] is None:
                raise CheckpointError(f"{source}: missing field '{key}'")
            return d[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(d.get("num_key_value_heads") or heads)
        head_dim = int(d.get("head_dim") or hidden // heads)
        rope_params = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is None and rope_params:
            kind = rope_params.get("rope_type", rope_params.get("type", "default"))
            if kind != "default":
                rope_scaling = dict(rope_params)
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            if kind == "default":
                rope_scaling = None
            elif kind not in ("linear", "llama3", "dynamic", "yarn"):
                raise CheckpointError(f"{source}: field 'rope_scaling' has unsupported rope_type {kind!r}")
        eos = d.get("eos_token_id")
        eos_ids = [int(e) for e in eos] if isinstance(eos, list) else ([int(eos)] if eos is not None else [])
        cfg = cls(
            arch=ARCHITECTURES[mt],
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            hidden_act=str(d.get("hidden_act", "silu")),
            block_size=d.get("block_size"),
            mask_token_id=d.get("mask_token_id"),
            eos_token_ids=eos_ids,
            bos_token_id=d.get("bos_token_id"),
            is_orthrus=(mt == "orthrus"),
        )
        if cfg.num_heads % cfg.num_kv_heads:
            raise CheckpointError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        if cfg.hidden_act not in ("silu", "swish"):
            raise CheckpointError(f"{source}: field 'hidden_act' is {cfg.hidden_act!r}; only silu is supported")
        if cfg.is_orthrus:
            if cfg.block_size is None:
                raise CheckpointError(f"{source}: missing field 'block_size' (model_type orthrus)")
            if cfg.mask_token_id is None:
                raise CheckpointError(f"{source}: missing field 'mask_token_id' (model_type orthrus)")
        return cfg
