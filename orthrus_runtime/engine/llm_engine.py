"""LLMEngine: the synchronous core. `add_request` queues, `step` runs one
scheduling step (prefill chunks + one draft/verify cycle for every decoding
sequence) and returns the deltas it produced.

One Orthrus cycle for a sequence with L cached tokens and anchor x_L (emitted,
not yet cached):
  1. draft:  diffusion view over [x_L, MASK x (B-1)] at positions L..L+B-1 -> q_0..q_{B-2};
             d_i ~ q_i;
  2. verify: AR view over [x_L, d_0..d_{K-2}] at L..L+K-1 (writes K/V) -> p_0..p_{K-1};
  3. accept: rejection sampling -> a accepted drafts plus one recovered/bonus token;
  4. emit d_0..d_{a-1} and the new anchor; roll the cache back to L+a+1 tokens.
ar mode is the same with K = 1 and no draft pass.

Each step starts by asking the planner (handed in, or made from `verify_policy`) for the
step's verify plan (K, D); the scheduler reserves that lookahead, and every orthrus
cycle of the step runs it. The runner, the planner and the acceptance rule are all
constructor arguments: one engine, whatever drives it.

Pipelined decoding (`EngineConfig.async_scheduling`, on with CUDA graphs): a step
queues the next cycle before it waits for the current one. The next cycle's start
positions and anchors are the current one's device outputs (start + accepted + 1,
the final token), so the GPU runs cycle after cycle while the host commits the
previous one (emission, rollback, token-level stop checks). It needs K/V room for
two cycles. Admissions and prefill chunks ride along: a pipelined step queues the next
cycle, commits the current one, then runs its prefill chunks in the pages left, behind the
queued cycle on the device; a sequence whose prompt is done joins the following cycle. It
stops for a step only when two modes decode at once, when the next cycle needs a
preemption, or when its verify length is not yet known (a sequence within one cycle of
max_tokens sits that cycle out). Output is the same token for token:
the next cycle is exactly the one the synchronous engine would run, and the work of a
sequence that turns out to have finished is dropped. Blocks freed while a cycle is in
flight are safe to hand out: all device work is ordered on one stream.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from orthrus_runtime.engine.block_manager import BlockManager
from orthrus_runtime.engine.input_processor import InputProcessor
from orthrus_runtime.engine.output_processor import OutputProcessor
from orthrus_runtime.engine.scheduler import Scheduler
from orthrus_runtime.defaults import CPU_KV_CACHE_BYTES
from orthrus_runtime.engine.sequence import Sequence, SeqStatus
from orthrus_runtime.model.dual_view import DualViewModel
from orthrus_runtime.spec.cycle import Chain, LaunchedCycle, RejectionSampling, SamplingBatch, launch_cycle
from orthrus_runtime.spec.logprobs import logprob_table, to_logprobs
from orthrus_runtime.spec.planner import Planner, VerifyPlan, make_planner
from orthrus_runtime.spec.sampling import sample_inverse_cdf
from orthrus_runtime.worker.compile_watch import kernel_compiles
from orthrus_runtime.worker.kv_cache import KVCache, bytes_per_block
from orthrus_runtime.worker.runner import ModelRunner
from orthrus_runtime.types import (
    MODES,
    AcceptanceStats,
    CycleRecord,
    EngineStats,
    GenerateDelta,
    GenerateRequest,
    InvalidRequestError,
    ModelInfo,
    RequestRecord,
    StatLogger,
    StepRecord,
    TokenLogprob,
    Usage,
    merge_deltas,
)

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Two kinds of block: the draft block (`block_size`, B tokens a diffusion pass drafts) and
    the KV block, a page of `kv_page_size` token slots of the paged cache (`num_kv_blocks`)."""
    block_size: int  # the draft block B
    mask_token_id: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    kv_page_size: int = 16  # token slots per KV block (page)
    num_kv_blocks: Optional[int] = None  # KV pages; None: from kv_cache_bytes
    kv_cache_bytes: int = CPU_KV_CACHE_BYTES
    seed: int = 0
    model_id: str = "orthrus"
    default_mode: str = "orthrus"
    # Where the diffusion view's weights came from (LoadedModel.diffusion_source): "checkpoint",
    # "ar-copy" (untrained: drafts are poor) or the overlaid view file.
    diffusion_view: str = ""
    cuda_graphs: Optional[bool] = None  # None: on for CUDA (see ModelRunner)
    verify_policy: str = "full"
    # Pipelined decoding (see the module docstring). None: on where CUDA graphs run.
    async_scheduling: Optional[bool] = None
    # Attention: auto (flash-attn 4 where it runs, else the Triton kernels on CUDA, torch on the
    # CPU), flash_attn, triton, or torch (see fast_forward.make_ops).
    attention_backend: str = "auto"


def num_kv_pages(model: DualViewModel, cfg: EngineConfig) -> int:
    """KV pages of the config's budget; refuses a budget that cannot hold one whole sequence."""
    dtype = model.lm_head.weight.dtype
    n = cfg.num_kv_blocks
    if n is None:
        n = cfg.kv_cache_bytes // bytes_per_block(model.cfg, cfg.kv_page_size, dtype)
    need = -(-(cfg.max_model_len + cfg.block_size) // cfg.kv_page_size)
    if n < need:
        raise ValueError(
            f"KV cache of {n} blocks x {cfg.kv_page_size} tokens cannot hold one sequence of "
            f"max_model_len {cfg.max_model_len} plus a block of {cfg.block_size}: raise the KV budget "
            f"or lower max_model_len"
        )
    return n


def build_runner(model: DualViewModel, cfg: EngineConfig, cuda_graphs: Optional[bool] = None,
                 ops=None) -> ModelRunner:
    """The runner an engine config asks for, with its KV cache; cuda_graphs / ops override the
    config's choice."""
    dev, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    kv = KVCache(model.cfg, num_kv_pages(model, cfg), cfg.kv_page_size, dtype, dev)
    return ModelRunner(model, kv, dev, cuda_graphs=cfg.cuda_graphs if cuda_graphs is None else cuda_graphs,
                       max_model_len=cfg.max_model_len, ops=ops, attention_backend=cfg.attention_backend)


def pipelined_for(cfg: EngineConfig, runner: ModelRunner) -> bool:
    """Whether an engine decodes pipelined: as configured, else wherever CUDA graphs run."""
    return cfg.async_scheduling if cfg.async_scheduling is not None else runner.graphs is not None


@dataclass
class _InFlight:
    """A queued cycle not yet committed, with the sequences of its rows."""
    seqs: list[Sequence]
    cycle: LaunchedCycle


class LLMEngine:
    def __init__(self, model: DualViewModel, cfg: EngineConfig, tokenizer: Any = None,
                 stat_logger: Optional[StatLogger] = None, *, runner: Optional[ModelRunner] = None,
                 planner: Optional[Planner] = None, acceptance: Optional[RejectionSampling] = None):
        """runner: owns the weights and the KV cache (default: `build_runner(model, cfg)`);
        planner: chooses each step's verify plan (default: `make_planner(cfg.verify_policy, ...)`);
        acceptance: the acceptance rule of every cycle (default: `RejectionSampling()`)."""
        if cfg.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {cfg.block_size}")
        self.model = model.eval()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.stat_logger = stat_logger or StatLogger()
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        mcfg = model.cfg
        n_embed = mcfg.vocab_size + (1 if model.model.mask_embedding is not None else 0)
        if not (0 <= cfg.mask_token_id < n_embed):
            raise ValueError(f"mask_token_id {cfg.mask_token_id} is outside the embedding table (size {n_embed})")
        if cfg.verify_policy not in ("full", "adaptive"):
            raise ValueError(f"verify_policy must be 'full' or 'adaptive', got {cfg.verify_policy!r}")
        self.runner = runner if runner is not None else build_runner(model, cfg)
        self.kv = self.runner.kv
        self.blocks = BlockManager(self.kv.num_blocks, self.kv.page_size)
        self.pipelined = pipelined_for(cfg, self.runner)
        self.planner = planner if planner is not None else make_planner(
            cfg.verify_policy, cfg.block_size, self.runner.costs, self.pipelined)
        self.acceptance = acceptance if acceptance is not None else RejectionSampling()
        self._inflight: Optional[_InFlight] = None
        self._last_commit_t = 0.0
        self._last_prefill_t = 0.0
        self.num_chained_steps = 0  # steps that queued a cycle behind the one in flight
        self.num_pipelined_prefills = 0  # of those, steps that ran prefill chunks too
        self.num_batch_cycles = 0  # decode cycles committed (one per batch and mode a step)
        self._sampling: tuple[tuple[str, ...], Optional[SamplingBatch]] = ((), None)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._rng = torch.Generator().manual_seed(cfg.seed)
        self.inputs = InputProcessor(tokenizer, mcfg.vocab_size, cfg.max_model_len, cfg.default_mode)
        self.eos_ids = frozenset(mcfg.eos_token_ids)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_ids = self.eos_ids | {int(tokenizer.eos_token_id)}
        # Cumulative counters.
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.num_finished = 0
        self.finished_by_reason: dict[str, int] = {}
        self.spec = {m: AcceptanceStats(accepted_per_position=[0] * (cfg.block_size - 1)) for m in MODES}
        self.num_steps = 0
        self._token_text: dict[int, str] = {}  # one token's text, for log-probabilities
        self.compiles = kernel_compiles()  # process-wide: every engine of the process counts
        # Seconds per start-up phase, set by setup.build_engine (empty for an engine built otherwise).
        self.startup_s: dict[str, float] = {}
        self.mark_ready()

    def mark_ready(self) -> None:
        """Kernel compilations count as "after ready" from here (build_engine calls it once the
        warm-up is done)."""
        self._compiles_at_ready = self.compiles.count

    @property
    def num_compiles_after_ready(self) -> int:
        return self.compiles.count - self._compiles_at_ready

    def compiles_after_ready(self) -> list[str]:
        """Triton's descriptions of the specialisations built since mark_ready."""
        return self.compiles.since(self._compiles_at_ready)

    # -- requests -----------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        m = self.model.cfg
        return ModelInfo(model_id=self.cfg.model_id, architecture=m.arch, block_size=self.cfg.block_size,
                         max_model_len=self.cfg.max_model_len, vocab_size=m.vocab_size,
                         mask_token_id=self.cfg.mask_token_id, eos_token_ids=sorted(self.eos_ids),
                         default_mode=self.cfg.default_mode, diffusion_view=self.cfg.diffusion_view)

    def tokenize(self, req: GenerateRequest) -> list[int]:
        return self.inputs.tokenize(req)

    def detokenize(self, ids: list[int]) -> str:
        return self.inputs.detokenize(ids)

    def validate(self, req: GenerateRequest) -> list[int]:
        """Check a request (engine/input_processor.py); returns its prompt ids. Raises
        InvalidRequestError."""
        ids = self.inputs.validate(req)
        if req.request_id is not None and (not isinstance(req.request_id, str) or req.request_id in self.seqs):
            raise InvalidRequestError(f"request_id {req.request_id!r} is invalid or already in use")
        return ids

    def add_request(self, req: GenerateRequest, prompt_ids: Optional[list[int]] = None,
                    arrival_time: Optional[float] = None) -> str:
        ids = prompt_ids if prompt_ids is not None else self.validate(req)
        rid = req.request_id or f"req-{next(self._ids)}"
        p = req.params
        gen = None
        if not p.greedy:
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._rng))
            gen = torch.Generator().manual_seed(seed % 2**64)
        eos = frozenset() if p.ignore_eos else self.eos_ids
        seq = Sequence(
            request_id=rid, prompt_token_ids=ids, params=p, mode=req.mode,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            eos_token_ids=eos | frozenset(p.stop_token_ids), generator=gen,
        )
        seq.stats.accepted_per_position = [0] * (self.cfg.block_size - 1)
        self.seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def abort(self, request_id: str) -> Optional[GenerateDelta]:
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, "abort", time.monotonic())

    def finish(self, request_id: str, reason: str, num_tokens: int) -> Optional[GenerateDelta]:
        """End a request that its output processor ended (a stop string, or text the tokenizer
        failed on) after num_tokens output tokens: the ones past that are dropped from its
        output and the counters. Returns its final delta (None: not running any more)."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        extra = len(seq.output_token_ids) - num_tokens
        if extra > 0:
            del seq.output_token_ids[num_tokens:]
            self.generation_tokens -= extra
        return self._finish(seq, reason, time.monotonic())

    def fail(self, request_id: str) -> Optional[GenerateDelta]:
        """End a request with finish_reason "error", returning its KV blocks (the caller
        saw it fail outside a step's own per-request guard)."""
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, "error", time.monotonic())

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    # -- stepping ---------------------------------------------------------------------
    def _choose_plan(self) -> VerifyPlan:
        """This step's verify plan, chosen once from the decoding orthrus sequences. With none
        decoding (a step of admissions), a whole block: what a new sequence's first cycle runs."""
        dec = [s for s in self.scheduler.running if s.mode == "orthrus" and not s.is_prefilling]
        if not dec:
            return VerifyPlan(self.cfg.block_size, self.cfg.block_size)
        return self.planner.choose(len(dec), max(s.remaining for s in dec))

    def step(self) -> list[GenerateDelta]:
        t0 = time.monotonic()
        deltas: list[GenerateDelta] = []
        cycles: list[CycleRecord] = []
        gen_before = self.generation_tokens
        plan = self._choose_plan()
        if self._inflight is not None:
            chained = self._step_chained(plan)
            if chained is not None:
                deltas, cycles, prompt_tokens = chained
                self._log_step(t0, time.monotonic() - t0, prompt_tokens, 0, cycles, gen_before)
                return deltas
            # The batch changes (or the pipeline cannot go on): commit first, then a plain step.
            cycles += self._commit(self._inflight)
            self._inflight = None
            now = time.monotonic()
            for seq in list(self.scheduler.running):
                if seq.finish_reason is not None:
                    deltas.append(self._finish(seq, seq.finish_reason, now))
        sched = self.scheduler.schedule(plan.num_verify)
        prompt_tokens = self._prefill(sched.prefills) if sched.prefills else 0
        t_dec = time.monotonic()
        groups = [g for g in ([s for s in sched.decodes if s.mode == m] for m in MODES) if g]
        for group in groups:
            launched = self._launch_planned(group, plan)
            if self.pipelined and len(groups) == 1:
                self._inflight = launched  # committed by the next step, which queues the cycle after
            else:
                cycles += self._commit(launched)
        decode_s = time.monotonic() - t_dec if sched.decodes else 0.0
        deltas += self._collect_running()
        self._log_step(t0, decode_s, prompt_tokens, sched.num_preempted, cycles, gen_before)
        return deltas

    def _log_step(self, t0: float, decode_s: float, prompt_tokens: int, num_preempted: int,
                  cycles: list[CycleRecord], gen_before: int) -> None:
        self.num_steps += 1
        self.stat_logger.on_step(StepRecord(
            duration_s=time.monotonic() - t0, decode_duration_s=decode_s,
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.blocks.usage, num_preemptions=num_preempted,
            num_prompt_tokens=prompt_tokens, num_generation_tokens=self.generation_tokens - gen_before,
            cycles=cycles,
        ))

    def _step_chained(self, plan: VerifyPlan) -> Optional[tuple[list[GenerateDelta], list[CycleRecord], int]]:
        """A pipelined step: queue the next cycle of the decoding batch from the in-flight one's
        device outputs, commit the in-flight one, then run this step's prefill chunks
        (admissions included) in what the pool has left, behind the queued cycle on the
        device: the pipeline does not stop for a new request. A sequence whose prompt is done
        joins the next step's cycle (a row from host state). Returns (deltas, cycles, prompt
        tokens); None (nothing done) when the batch needs the plain step: two modes decoding,
        no room for the cycle without preempting, or host state not there yet."""
        prev = self._inflight
        running = [s for s in self.scheduler.running if not s.is_prefilling]
        if not running:
            return None
        mode = running[0].mode
        if any(s.mode != mode for s in running):
            return None
        k_plan, D = plan if mode == "orthrus" else (1, 0)
        row_of = {s: i for i, s in enumerate(prev.seqs)}
        seqs, K, rows, starts = [], [], [], []
        for s in sorted(running, key=lambda x: x.admit_order):
            r = row_of.get(s, -1)
            if r >= 0:
                kc = prev.cycle.K[r]
                # This cycle's verify length must be what the synchronous engine would use,
                # min(plan, remaining), while the in-flight cycle's emission (1..kc) is unknown.
                k = k_plan
                if s.remaining - kc < k:
                    continue  # sits this cycle out; back once its host state is current
                start = s.num_cached + kc  # upper bound: the device knows the exact start
            else:
                k, start = s.verify_len(k_plan), s.num_cached
            seqs.append(s)
            K.append(k)
            rows.append(r)
            starts.append(start)
        if not seqs:
            return None
        need = sum(self.blocks.num_new_blocks(s, st + k) for s, st, k in zip(seqs, starts, K))
        if need > self.blocks.num_free:
            return None
        for s, st, k in zip(seqs, starts, K):
            self.blocks.allocate(s, st + k)
        launched = self._launch(seqs, K, D, Chain(prev.cycle, rows), starts)
        cycles = self._commit(prev, ahead={s: k for s, k, r in zip(seqs, K, rows) if r >= 0})
        self._inflight = launched
        self.num_chained_steps += 1
        sched = self.scheduler.schedule_prefills(plan.num_verify)
        prompt_tokens = 0
        if sched.prefills:
            prompt_tokens = self._prefill(sched.prefills)
            self.num_pipelined_prefills += 1
        return self._collect_running(), cycles, prompt_tokens

    def _prefill(self, chunks: list[tuple[Sequence, int]]) -> int:
        """Run a step's prefill chunks; returns the prompt tokens counted for the first time."""
        now = time.monotonic()
        for seq, _ in chunks:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        n = self._run_prefill(chunks)
        # A cycle whose interval held this prefill does not show its own cost (see _commit).
        self._last_prefill_t = time.perf_counter()
        return n

    def _run_prefill(self, chunks: list[tuple[Sequence, int]]) -> int:
        seqs = [s for s, _ in chunks]
        tokens = [[s.token_at(i) for i in range(s.num_cached, s.num_cached + n)] for s, n in chunks]
        starts = [s.num_cached for s in seqs]
        # Logits at the chunk's last row (the first output token), or at every row for a request
        # that scores its prompt (row i predicts the token after it).
        scored = [s.params.prompt_logprobs is not None and s.num_cached < len(s.prompt_token_ids) for s in seqs]
        at = [list(range(len(t))) if sc else [len(t) - 1] for t, sc in zip(tokens, scored)]
        logits = self.runner.run_ar([s.block_table for s in seqs], tokens, starts, at)
        new_prompt = 0
        done_rows, done_seqs = [], []
        for (s, n), lg, sc in zip(chunks, logits, scored):
            if sc:
                self._score_prompt(s, s.num_cached, lg)
            s.num_cached += n
            if not s.prompt_counted and s.num_cached >= len(s.prompt_token_ids):
                s.prompt_counted = True
                new_prompt += len(s.prompt_token_ids)
            if not s.is_prefilling and not s.output_token_ids:
                if s.params.max_tokens == 0:  # scoring a prompt: nothing to generate
                    s.finish_reason = "length"
                    continue
                done_rows.append(lg[-1])
                done_seqs.append(s)
        if done_seqs:
            rows = torch.stack(done_rows)
            probs = SamplingBatch([s.params for s in done_seqs], self.device).probs(rows, 1)
            u = torch.stack([s.uniforms(1)[0] for s in done_seqs]).to(probs.device)
            first_t = sample_inverse_cdf(probs, u)
            first = first_t.tolist()
            n_lp = max((s.params.logprobs for s in done_seqs if s.params.logprobs is not None), default=None)
            tables = logprob_table(rows, first_t, n_lp).tolist() if n_lp is not None else None
            now = time.monotonic()
            for i, (s, t) in enumerate(zip(done_seqs, first)):
                s.first_token_time = now
                self._emit(s, [t], [tables[i]] if tables is not None and s.params.logprobs is not None else None)
        self.prompt_tokens += new_prompt
        return new_prompt

    def _score_prompt(self, s: Sequence, start: int, logits: torch.Tensor) -> None:
        """Prompt log-probs from a prefill chunk at `start` (logits [n, V], row i predicting the
        token at start + i + 1). A recompute after preemption writes the same values again."""
        P = s.prompt_token_ids
        n = min(logits.shape[0], len(P) - 1 - start)  # rows whose next token is a prompt token
        if s.prompt_logprobs is None:
            s.prompt_logprobs = [TokenLogprob(P[0], None, self._text_of(P[0]))] + [None] * (len(P) - 1)
        if n <= 0:
            return
        nxt = torch.tensor(P[start + 1: start + 1 + n], device=logits.device)
        tables = logprob_table(logits[:n], nxt, s.params.prompt_logprobs).tolist()
        k = s.params.prompt_logprobs
        s.prompt_logprobs[start + 1: start + 1 + n] = to_logprobs(tables, k, self._text_of, P[start + 1: start + 1 + n])

    def _text_of(self, token_id: int) -> str:
        t = self._token_text.get(token_id)
        if t is None:
            t = self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""
            self._token_text[token_id] = t
        return t

    def _sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """The batch's sampling tensors, rebuilt only when its sequences change."""
        key = tuple(s.request_id for s in seqs)
        if self._sampling[0] != key or self._sampling[1] is None:
            self._sampling = (key, SamplingBatch([s.params for s in seqs], self.device))
        return self._sampling[1]

    def _launch_planned(self, seqs: list[Sequence], plan: VerifyPlan) -> _InFlight:
        """Queue one cycle for a batch of one mode, with this step's plan."""
        k_plan, draft_len = plan if seqs[0].mode == "orthrus" else (1, 0)
        return self._launch(seqs, [s.verify_len(k_plan) for s in seqs], draft_len)

    def _launch(self, seqs: list[Sequence], K: list[int], draft_len: int, chain: Optional[Chain] = None,
                starts: Optional[list[int]] = None) -> _InFlight:
        B = self.cfg.block_size
        bs, Kmax = len(seqs), max(K)
        speculative = seqs[0].mode == "orthrus"
        anchors = [s.output_token_ids[-1] for s in seqs]  # chained rows: replaced on the device
        # Each request draws the same number of uniforms per cycle whatever the batch and the plan
        # (greedy requests draw none: zeros).
        n_u = 2 * B - 1 if speculative else 1
        u = torch.zeros(bs, n_u) if all(s.generator is None for s in seqs) else \
            torch.stack([s.uniforms(n_u) for s in seqs])
        cycle = launch_cycle(self.runner, [s.block_table for s in seqs],
                             starts if starts is not None else [s.num_cached for s in seqs], anchors, K,
                             max(draft_len, Kmax), B, self.cfg.mask_token_id, self._sampling_batch(seqs), u,
                             self.acceptance, chain)
        return _InFlight(list(seqs), cycle)

    def _commit(self, inflight: _InFlight, ahead: Optional[dict[Sequence, int]] = None) -> list[CycleRecord]:
        """Wait for a launched cycle and apply it: emit, roll back, count. ahead: sequences with
        a later cycle already queued, and its verify length (their K/V room stays)."""
        c, seqs = inflight.cycle, inflight.seqs
        out = c.outcome()
        t_done = time.perf_counter()
        Kmax = max(c.K)
        self.num_batch_cycles += 1
        if seqs[0].mode == "orthrus":
            # Pipelined, a cycle costs the interval between commits, and only a cycle queued
            # before the previous commit shows it: one launched after it (the pipeline restarting
            # after a prefill) adds launch time the pipeline otherwise hides, and would make the
            # AR step look slower than it is.
            # Nor does one whose interval held a prefill (admissions ride along pipelined steps).
            chained = c.t_launch < self._last_commit_t
            clean = self._last_prefill_t < max(c.t_launch, self._last_commit_t)
            if clean and (chained or not self.pipelined):
                self.planner.observe_time(len(seqs), Kmax, c.draft_len if Kmax > 1 else 0,
                                          t_done - max(c.t_launch, self._last_commit_t))
            if Kmax > 1:
                self.planner.observe(c.draft_len, [k - 1 for k in c.K], out.num_accepted)
        self._last_commit_t = t_done
        records = []
        for i, (s, a, f, k, d) in enumerate(zip(seqs, out.num_accepted, out.final, c.K, out.drafts)):
            if s.status is SeqStatus.FINISHED or s.finish_reason is not None:
                continue  # aborted, or finished by the previous cycle, while this one ran
            L = s.num_cached
            lps = out.logprobs[i][: a + 1] if out.logprobs is not None and s.params.logprobs is not None else None
            emitted = self._emit(s, d[:a] + [f], lps)
            # Roll back: keep the anchor and the accepted drafts; the rest of the verify block goes
            # (but not the room of a cycle already queued behind this one).
            s.num_cached = L + a + 1
            self.blocks.truncate(s, s.num_cached + (ahead.get(s, 0) if ahead else 0))
            s.stats.record_cycle(k - 1, a)
            self.spec[s.mode].record_cycle(k - 1, a)
            records.append(CycleRecord(s.mode, k - 1, a, emitted))
        return records

    # -- output -----------------------------------------------------------------------
    def _emit(self, seq: Sequence, tokens: list[int], lp_rows: Optional[list[list[float]]] = None) -> int:
        """Append tokens until a stop; returns how many were appended. lp_rows: the tokens'
        logprobs.logprob_table rows (with params.logprobs)."""
        n = 0
        reason = None
        for i, t in enumerate(tokens):
            seq.output_token_ids.append(t)
            seq.pending_ids.append(t)
            if lp_rows is not None:
                seq.pending_logprobs += to_logprobs([lp_rows[i]], seq.params.logprobs, self._text_of, [t])
            n += 1
            if t in seq.eos_token_ids:
                reason = "stop"
            elif seq.remaining <= 0:
                reason = "length"
            if reason:
                break
        self.generation_tokens += n
        if len(seq.output_token_ids) > n:  # not the first token (that one is TTFT)
            seq.emissions.append((time.monotonic(), n))
        if reason:
            seq.finish_reason = reason
        return n

    def _collect_running(self) -> list[GenerateDelta]:
        """The deltas of every running sequence (finishing those that stopped)."""
        now = time.monotonic()
        return [d for d in (self._collect(s, now) for s in list(self.scheduler.running)) if d is not None]

    def _collect(self, seq: Sequence, now: float) -> Optional[GenerateDelta]:
        if seq.finish_reason is not None:
            return self._finish(seq, seq.finish_reason, now)
        if not seq.pending_ids:
            return None
        d = GenerateDelta(seq.request_id, token_ids=seq.pending_ids)
        self._take_logprobs(seq, d)
        seq.pending_ids = []
        return d

    @staticmethod
    def _take_logprobs(seq: Sequence, d: GenerateDelta) -> None:
        """Move the sequence's pending log-probs (and, once, its prompt's) onto a delta."""
        if seq.params.logprobs is not None:
            d.logprobs, seq.pending_logprobs = seq.pending_logprobs, []
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            d.prompt_logprobs = seq.prompt_logprobs
            seq.prompt_logprobs_sent = True

    def _finish(self, seq: Sequence, reason: str, now: float) -> GenerateDelta:
        self.scheduler.remove(seq)
        self.seqs.pop(seq.request_id, None)
        seq.finish_reason = reason
        self.num_finished += 1
        self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        d = GenerateDelta(
            seq.request_id, token_ids=seq.pending_ids, finished=True,
            finish_reason=reason,
            usage=Usage(len(seq.prompt_token_ids), len(seq.output_token_ids)), stats=seq.stats,
            queue_time_s=(seq.first_scheduled_time - seq.arrival_time) if seq.first_scheduled_time else None,
        )
        if reason != "error":
            self._take_logprobs(seq, d)
        seq.pending_ids = []
        self.stat_logger.on_request_finished(RequestRecord(
            request_id=seq.request_id, mode=seq.mode, finish_reason=reason,
            prompt_tokens=len(seq.prompt_token_ids), completion_tokens=len(seq.output_token_ids),
            arrival_time=seq.arrival_time, first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time, finished_time=now, emissions=list(seq.emissions),
        ))
        return d

    # -- stats ----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """A snapshot: gauges now, counters so far (copies: the engine keeps counting)."""
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.blocks.usage, num_kv_blocks_total=self.blocks.num_blocks,
            num_kv_blocks_free=self.blocks.num_free, num_preemptions=self.scheduler.num_preemptions,
            num_requests_finished=self.num_finished, finished_by_reason=dict(self.finished_by_reason),
            prompt_tokens=self.prompt_tokens, generation_tokens=self.generation_tokens,
            spec={m: dataclasses.replace(a, accepted_per_position=list(a.accepted_per_position))
                  for m, a in self.spec.items()},
            num_steps=self.num_steps,
            num_kernel_compiles=self.compiles.count,
            num_kernel_compiles_after_ready=self.num_compiles_after_ready,
        )

    # -- synchronous use, with text --------------------------------------------------------
    def step_outputs(self, outputs: OutputProcessor) -> list[GenerateDelta]:
        """One step, its deltas through `outputs` (text, stop strings), finishing here the
        requests that it ended: what the async front does across its process boundary, in
        line. Requests must be added to `outputs` as they are added here."""
        res = [c for c in map(outputs.process, self.step()) if c is not None]
        for rid, reason, n in outputs.take_finishing():
            d = self.finish(rid, reason, n)
            if d is not None and (c := outputs.process(d)) is not None:
                res.append(c)
        return res

    def generate(self, requests: list[GenerateRequest]) -> list[GenerateDelta]:
        """Run requests to completion; returns one merged final delta per request, in order."""
        outputs = OutputProcessor(self.tokenizer)
        ids = []
        for r in requests:
            rid = self.add_request(r)
            outputs.add(rid, self.seqs[rid].prompt_token_ids, r.params)
            ids.append(rid)
        merged: dict[str, Optional[GenerateDelta]] = {rid: None for rid in ids}
        while self.has_work():
            for d in self.step_outputs(outputs):
                merged[d.request_id] = merge_deltas(merged[d.request_id], d)
        return [merged[r] for r in ids]
