"""Defaults and limits that more than one layer reads, in one place (torch-free: the
Serve layer and the clients import it)."""
from __future__ import annotations

from pathlib import Path

# Shipped data: the embedded default's diffusion view, prompt sets, MT-bench.
DATA_DIR = Path(__file__).resolve().parent / "data"

# KV cache budget of an engine on the CPU (on CUDA the budget follows gpu_memory_utilization).
CPU_KV_CACHE_BYTES = 512 * 2**20
# Batch sizes a decode pass is padded to (one CUDA graph each); the pass-cost table's buckets.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Pass lengths (tokens per sequence) a decode pass is padded to.
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# max_tokens of a request that leaves it unset (chat, gRPC, the engine's SamplingParams);
# /v1/completions keeps OpenAI's own 16.
DEFAULT_MAX_TOKENS = 256
