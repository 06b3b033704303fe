"""Plain data classes passed between the engine and everything that calls it.

Nothing here imports torch: the Serve layer, the gRPC client and the metrics
code depend on these without loading the model stack.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from orthrus_runtime.defaults import DEFAULT_MAX_TOKENS

Mode = Literal["orthrus", "ar"]
MODES: tuple[str, ...] = ("orthrus", "ar")
# "error": the request failed inside the engine and ended alone (its KV blocks freed).
FinishReason = Literal["stop", "length", "abort", "error"]


class InvalidRequestError(ValueError):
    """A request the engine refuses before queueing it (maps to HTTP 400 / INVALID_ARGUMENT).

    param: the request field at fault, when there is one."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # keeps param across pickling (Ray)
        return (type(self), (str(self), self.param))


class RequestRefusedError(RuntimeError):
    """The engine refused or ended a request for a reason other than its content: its
    queue deadline passed, or the engine is shutting down (HTTP 503 / gRPC status).

    reason: "queue_timeout" or "shutting_down"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):
        return (type(self), (str(self), self.reason))


class EngineDeadError(RuntimeError):
    """The engine's step loop has died; no request can be served any more."""


@dataclass
class SamplingParams:
    """How to pick tokens. temperature == 0 means greedy."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k filtering
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # max_tokens is only a default the client did not choose: the engine shrinks it to the
    # room left in max_model_len instead of refusing a long prompt (vLLM's behaviour).
    max_tokens_defaulted: bool = False
    # Log-probabilities (see TokenLogprob): None: none; k in 0..MAX_LOGPROBS: each output
    # token's, with the k most likely alternatives. prompt_logprobs: the same for every prompt
    # token (the first has none). max_tokens = 0 with prompt_logprobs scores a prompt alone.
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Check (and normalise) in place; the rules live in orthrus_runtime.validation."""
        from orthrus_runtime.validation import check_sampling

        check_sampling(self)


@dataclass
class GenerateRequest:
    """One generation request. Exactly one of prompt, messages, prompt_token_ids is set."""

    prompt: Optional[str] = None
    messages: Optional[list[dict[str, str]]] = None  # [{"role": ..., "content": ...}], chat template applied
    prompt_token_ids: Optional[list[int]] = None
    params: SamplingParams = field(default_factory=SamplingParams)
    mode: Optional[str] = None  # "orthrus" or "ar"; None: the engine's default_mode
    request_id: Optional[str] = None
    # Tokenization (vLLM's fields): the tokenizer's special tokens around a prompt text, and the
    # assistant turn's opening after chat messages.
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class AcceptanceStats:
    """Speculative statistics of one request (or, summed, of many).

    num_cycles: decode cycles (one draft + one verify pass each; in ar mode, one AR step each).
    num_draft_tokens: draft tokens that were verified.
    num_accepted_tokens: verified draft tokens that were accepted.
    accepted_per_position[i]: accepted drafts at draft position i (0-based).
    Tokens emitted by the cycles = num_accepted_tokens + num_cycles (each cycle adds one AR token),
    except in a cycle that a stop token cuts short: drafts that verification
    accepted past the stop count as accepted (as vLLM counts acceptance) but are not emitted.
    """

    num_cycles: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per cycle (accepted drafts + the AR token)."""
        if self.num_cycles == 0:
            return 0.0
        return (self.num_accepted_tokens + self.num_cycles) / self.num_cycles

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def record_cycle(self, num_drafts: int, num_accepted: int) -> None:
        """One cycle that verified num_drafts drafts and accepted the first num_accepted."""
        self.num_cycles += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    def add(self, other: "AcceptanceStats") -> None:
        self.num_cycles += other.num_cycles
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        n = max(len(self.accepted_per_position), len(other.accepted_per_position))
        a = self.accepted_per_position + [0] * (n - len(self.accepted_per_position))
        for i, v in enumerate(other.accepted_per_position):
            a[i] += v
        self.accepted_per_position = a

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean_accepted_length"] = self.mean_accepted_length
        d["acceptance_rate"] = self.acceptance_rate
        return d


@dataclass
class TokenLogprob:
    """A token at one position and its log-probability there: the AR view's raw distribution
    (log-softmax of the logits, before temperature, top-k or top-p: vLLM's default), the same
    in both modes, since Orthrus emits only tokens the AR view verified. `top` holds the most
    likely tokens at that position, best first (each with an empty `top`). logprob is None
    only for a prompt's first token, which nothing predicts."""

    token_id: int
    logprob: Optional[float]
    token: str = ""  # the token's text on its own (tokenizer.decode([token_id]))
    top: list["TokenLogprob"] = field(default_factory=list)


@dataclass
class GenerateDelta:
    """One streamed increment of a request's output.

    token_ids are the new ids since the last delta; text is their text increment
    (held back while a multi-byte character or a possible stop string is incomplete).
    The last delta has finished=True with finish_reason, usage and stats set.
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: Optional[str] = None
    usage: Optional[Usage] = None
    stats: Optional[AcceptanceStats] = None
    # Seconds from arrival to being scheduled (set on the final delta).
    queue_time_s: Optional[float] = None
    # finish_reason "error": what the client may be told (no internals; the request id
    # finds the server's log line).
    error: Optional[str] = None
    # With params.logprobs: one per entry of token_ids.
    logprobs: Optional[list[TokenLogprob]] = None
    # With params.prompt_logprobs, on the request's first delta: one per prompt token (the
    # first one's logprob is None: nothing predicts it).
    prompt_logprobs: Optional[list[TokenLogprob]] = None


def merge_deltas(a: Optional[GenerateDelta], b: GenerateDelta) -> GenerateDelta:
    """The delta that says what a then b say (ids, text, log-probs; the prompt's log-probs
    from whichever has them); accounting (finish, usage, stats) is b's."""
    if a is None:
        return b
    lps = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return dataclasses.replace(b, token_ids=a.token_ids + b.token_ids, text=a.text + b.text, logprobs=lps,
                               prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None
                               else b.prompt_logprobs)


@dataclass
class ModelInfo:
    model_id: str
    architecture: str  # "qwen3" or "llama"
    block_size: int
    max_model_len: int
    vocab_size: int
    mask_token_id: int
    modes: list[str] = field(default_factory=lambda: list(MODES))
    eos_token_ids: list[int] = field(default_factory=list)
    default_mode: str = "orthrus"  # the mode of a request that names none
    diffusion_view: str = ""  # where the diffusion view came from (EngineConfig.diffusion_view)


@dataclass
class EngineStats:
    """A snapshot of the engine: gauges plus cumulative counters (never reset)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    num_kv_blocks_total: int = 0
    num_kv_blocks_free: int = 0
    num_preemptions: int = 0
    num_requests_finished: int = 0
    finished_by_reason: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    # Per mode ("orthrus"/"ar") acceptance counters.
    spec: dict[str, AcceptanceStats] = field(default_factory=dict)
    loop_alive: bool = True
    num_steps: int = 0
    # Triton specialisations built in this process (worker/compile_watch.py), in all and since the
    # engine's warm-up ended: each one after ready stalled a step.
    num_kernel_compiles: int = 0
    num_kernel_compiles_after_ready: int = 0
    # The step loop's own counters (engine/core.py): failed steps, requests refused after
    # queue_timeout_s.
    num_step_failures: int = 0
    num_queue_timeouts: int = 0


# ---------------------------------------------------------------------------
# Records the engine hands to a stat logger (see orthrus_runtime/metrics.py).
# The engine calls StatLogger.on_step once per step and on_request_finished once
# per request, from its step-loop thread; a logger must be cheap and never raise.


@dataclass
class CycleRecord:
    """One decode cycle of one sequence in one step."""

    mode: str  # "orthrus" or "ar"
    num_draft_tokens: int  # drafts verified this cycle (0 in ar mode)
    num_accepted_tokens: int  # accepted drafts: positions 0..num_accepted_tokens-1
    num_emitted_tokens: int  # tokens added to the output (accepted + 1, less if a stop cut it)


@dataclass
class StepRecord:
    duration_s: float  # wall time of the whole step
    decode_duration_s: float  # wall time of its draft+verify cycle (0 when no sequence decoded)
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int  # new in this step
    num_prompt_tokens: int  # prompt tokens prefilled in this step (first time only, not recompute)
    num_generation_tokens: int  # tokens emitted in this step
    cycles: list[CycleRecord] = field(default_factory=list)


@dataclass
class RequestRecord:
    request_id: str
    mode: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    arrival_time: float  # time.monotonic() values
    first_scheduled_time: Optional[float]
    first_token_time: Optional[float]
    finished_time: float
    # (time, number of tokens) of each emission after the first token.
    emissions: list[tuple[float, int]] = field(default_factory=list)


class StatLogger:
    """Interface for engine statistics sinks; the default does nothing."""

    def on_step(self, record: StepRecord) -> None:  # noqa: D401
        return None

    def on_request_finished(self, record: RequestRecord) -> None:
        return None
