"""Tiny random checkpoints for tests and demos (no network: the tokenizer is trained here)."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

from orthrus_runtime.model.config import ModelConfig
from orthrus_runtime.model.loader import build_model, copy_ar_to_diffusion, random_state, save_checkpoint

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Orthrus drafts a block of tokens with a diffusion view and verifies it with the AR view.",
    "def add(a, b):\n    return a + b\n",
    "Continuous batching lets requests join and leave between steps.",
    "Speculative decoding is lossless: the output distribution is the base model's.",
    "Ünïcödé text, emojis 🙂 and numbers 0123456789 must decode correctly.",
] * 20


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 300) -> Any:
    """A byte-level BPE tokenizer with ChatML special tokens, trained on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str = "qwen3", vocab_size: int = 320, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, head_dim: int = 16, tie: bool = True, rope_scaling: Optional[dict] = None,
                eos_token_ids: Optional[list[int]] = None) -> ModelConfig:
    return ModelConfig(
        arch=arch, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=rope_scaling, max_position_embeddings=2048, tie_word_embeddings=tie, attention_bias=False,
        eos_token_ids=eos_token_ids if eos_token_ids is not None else [],
    )


def tiny_model(arch: str = "qwen3", seed: int = 0, diffusion: str = "random", **kw: Any):
    """A DualViewModel with random weights (float32, CPU). diffusion: 'random' or 'ar-copy'."""
    import torch

    cfg = tiny_config(arch, **kw)
    state = random_state(cfg, seed=seed, std=0.08)
    if diffusion == "ar-copy":
        copy_ar_to_diffusion(state, cfg)
    return build_model(cfg, state, torch.float32, torch.device("cpu"), "tiny")


def tiny_checkpoint(folder: str | Path, arch: str = "qwen3", seed: int = 0, block_size: int = 4,
                    diffusion: str = "random", max_shard_bytes: Optional[int] = None, **kw: Any) -> Path:
    """Write a tiny upstream-layout checkpoint with a tokenizer; returns the folder."""
    tok = tiny_tokenizer()
    kw.setdefault("eos_token_ids", [tok.eos_token_id])
    model = tiny_model(arch, seed=seed, diffusion=diffusion, **kw)
    mask_id = len(tok)  # a spare row: the model's vocabulary is larger than the tokenizer's
    folder = Path(folder)
    save_checkpoint(model, folder, block_size, mask_id, max_shard_bytes=max_shard_bytes, tokenizer=tok)
    return folder
