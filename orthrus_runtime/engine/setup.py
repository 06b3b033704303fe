"""Engine setup: EngineArgs -> a loaded, warmed-up LLMEngine. Shared by the async front
(a Serve replica) and the synchronous tools (generate, eval-acceptance, distill)."""
from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch

from orthrus_runtime.defaults import CPU_KV_CACHE_BYTES
from orthrus_runtime.engine.args import EngineArgs
from orthrus_runtime.engine.llm_engine import EngineConfig, LLMEngine
from orthrus_runtime.model.loader import load_model
from orthrus_runtime.types import StatLogger
from orthrus_runtime.worker.compile_watch import kernel_compiles, use_cache_dir
from orthrus_runtime.worker.cuda_graphs import BATCH_SIZES, TOKEN_SIZES
from orthrus_runtime.worker.kv_cache import bytes_per_block

log = logging.getLogger(__name__)


def engine_config_from_args(args: EngineArgs, loaded: Any) -> EngineConfig:
    m = loaded.model
    max_len = args.max_model_len or min(m.cfg.max_position_embeddings, 8192)
    dev = m.lm_head.weight.device
    kv_bytes = args.kv_cache_bytes
    if kv_bytes is None:
        if dev.type == "cuda":
            free, total = torch.cuda.mem_get_info(dev)
            used = total - free
            # Room for activations: logits and probabilities of a full draft+verify batch dominate;
            # plus a reserve for the CUDA graphs' pool.
            act = 6 * args.max_num_seqs * loaded.block_size * m.cfg.vocab_size * 4 + 2**30
            if args.cuda_graphs:
                act += 2 * 2**30
            kv_bytes = int(args.gpu_memory_utilization * total) - used - act
        else:
            kv_bytes = CPU_KV_CACHE_BYTES
    per_block = bytes_per_block(m.cfg, args.kv_page_size, m.lm_head.weight.dtype)
    return EngineConfig(
        block_size=loaded.block_size, mask_token_id=loaded.mask_token_id, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
        kv_page_size=args.kv_page_size, num_kv_blocks=max(0, kv_bytes // per_block), seed=args.seed,
        model_id=loaded.model_id, verify_policy=args.verify_policy, default_mode=args.default_mode,
        diffusion_view=loaded.diffusion_source,
        cuda_graphs=args.cuda_graphs if dev.type == "cuda" else False,
        async_scheduling=args.async_scheduling, attention_backend=args.attention_backend,
    )


# Prefill chunk lengths the warm-up runs: with T x G query rows (G query heads a KV head) they
# reach every row-tile size of the attention kernel (16, 32, 64) for any G up to 16.
_WARM_CHUNKS = (1, 2, 4, 8, 16, 32, 64)


def warm_prefill(engine: LLMEngine) -> int:
    """On CUDA, run one eager prefill pass per attention specialisation that serving can reach
    (row tile from the chunk length, with and without prefix splits: from position 0 and from
    2 x SPLIT_MIN_KEYS), so that no user's first prompt of a new length compiles a kernel.
    They write K/V into free pages, which a sequence overwrites before it reads them. Returns
    the passes run (0 on the CPU)."""
    from orthrus_runtime.worker.triton_kernels import SPLIT_MIN_KEYS

    runner, cfg = engine.runner, engine.cfg
    if runner.device.type != "cuda":
        return 0
    page, n = engine.kv.page_size, 0
    for T in _WARM_CHUNKS:
        if T > cfg.max_num_batched_tokens:
            break
        for start in (0, 2 * SPLIT_MIN_KEYS):
            pages = -(-(start + T) // page)
            if start + T > cfg.max_model_len or pages > engine.kv.num_blocks:
                continue
            runner.run_ar([list(range(pages))], [[0] * T], [start], [[T - 1]])
            n += 1
    torch.cuda.synchronize(runner.device)
    return n


def warm_up(engine: LLMEngine, timings: Optional[dict] = None) -> int:
    """Build the prefill kernels (warm_prefill) and capture the CUDA graphs of the decode
    passes before serving (not on a user's first request): every padded batch size up to max_num_seqs, one-token (AR) and full-block
    passes, and every pass length the planner may choose (a capture in the
    middle of serving stalls every running request). Returns the number of graphs held (0 on
    the CPU)."""
    runner = engine.runner
    t0 = time.perf_counter()
    warm_prefill(engine)
    if timings is not None:
        timings["warm_prefill"] = round(time.perf_counter() - t0, 2)
    if runner.graphs is None:
        return 0
    sizes = [b for b in BATCH_SIZES if b <= max(1, engine.cfg.max_num_seqs)]
    lengths = sorted({1, engine.cfg.block_size} | engine.planner.pass_lengths())
    t0 = time.perf_counter()
    n = runner.capture_graphs(sizes, lengths, engine.cfg.mask_token_id)
    # Prefill chunks (ModelRunner.prefill_graph_lengths): verify graphs of the longest pass length
    # at the batch sizes whose prefill replays them; larger batches chunk at the decode's lengths.
    longest = TOKEN_SIZES[-1]
    n = runner.capture_graphs([b for b in sizes if b * longest <= runner.graphed_prefill_tokens], [longest],
                              engine.cfg.mask_token_id, kinds=("verify",))
    if timings is not None:
        timings["capture_graphs"] = round(time.perf_counter() - t0, 2)
    log.info("captured %d CUDA graphs (batch sizes %s, pass lengths %s)", n, sizes, lengths)
    return n


def load(args: EngineArgs) -> Any:
    """The model, tokenizer and block settings that args name (orthrus_runtime.model.loader)."""
    return load_model(args.model, dtype=args.dtype, device=args.device, block_size=args.block_size,
                      mask_token_id=args.mask_token_id, diffusion_weights=args.diffusion_weights,
                      cache_dir=args.compile_cache_dir)


def build_engine(args: EngineArgs, stat_logger: Optional[StatLogger] = None) -> LLMEngine:
    """Load and configure an engine, then warm it up (graphs captured before the first request);
    kernel compilations count as "after ready" from the end of the warm-up."""
    t0 = time.perf_counter()
    cache = use_cache_dir(args.compile_cache_dir)  # before anything compiles
    compiles = kernel_compiles()
    before = compiles.count
    loaded = load(args)
    t_load = time.perf_counter()
    engine = LLMEngine(loaded.model, engine_config_from_args(args, loaded), loaded.tokenizer,
                       stat_logger=stat_logger)
    t_engine = time.perf_counter()
    timings: dict[str, float] = {}
    warm_up(engine, timings)
    engine.mark_ready()
    # Where a replica's start-up time goes (health() reports it): seconds per phase.
    engine.startup_s = {"load_model": round(t_load - t0, 2), "kv_cache_and_runner": round(t_engine - t_load, 2),
                        **timings, "total": round(time.perf_counter() - t0, 2)}
    log.info("engine ready: %d Triton kernel specialisation(s) built while loading and warming up "
             "(cache %s); seconds: %s", compiles.count - before, cache, engine.startup_s)
    return engine
