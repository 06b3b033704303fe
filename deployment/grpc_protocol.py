"""Conversions between the orthrus.v1 protobuf messages and the engine's data classes."""
from __future__ import annotations

import uuid
from typing import Optional

from orthrus_runtime.defaults import DEFAULT_MAX_TOKENS
from orthrus_runtime.proto import orthrus_pb2 as pb
from orthrus_runtime.types import (
    AcceptanceStats,
    GenerateDelta,
    GenerateRequest,
    ModelInfo,
    SamplingParams,
    Usage,
)

from .errors import checked, invalid

_MODES = {pb.MODE_ORTHRUS: "orthrus", pb.MODE_AR: "ar"}
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def to_generate_request(msg: pb.GenerateRequest, default_max_tokens: int = DEFAULT_MAX_TOKENS) -> GenerateRequest:
    """Validate the message's shape and build the engine request (ApiError 400 when malformed)."""
    inputs = [name for name, present in (
        ("prompt", msg.HasField("prompt")),
        ("messages", len(msg.messages) > 0),
        ("prompt_token_ids", len(msg.prompt_token_ids) > 0),
    ) if present]
    if len(inputs) != 1:
        raise invalid(
            "exactly one of prompt, messages, prompt_token_ids must be set"
            + (f" (got {', '.join(inputs)})" if inputs else ""),
            param="prompt",
        )
    if msg.mode not in (pb.MODE_UNSPECIFIED, *_MODES):
        raise invalid(f"unknown mode {msg.mode}", param="mode")

    params = SamplingParams(
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens,
        max_tokens_defaulted=not msg.HasField("max_tokens"),
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_k=msg.top_k if msg.HasField("top_k") else -1,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=list(msg.stop),
    )
    req = GenerateRequest(params=params, request_id=msg.request_id or f"grpc-{uuid.uuid4().hex}")
    if msg.HasField("prompt"):
        req.prompt = msg.prompt
    elif msg.messages:
        req.messages = [{"role": m.role, "content": m.content} for m in msg.messages]
    else:
        req.prompt_token_ids = list(msg.prompt_token_ids)
    if msg.mode in _MODES:
        req.mode = _MODES[msg.mode]
    return checked(req)  # the same rules and messages as over HTTP


def _usage(u: Optional[Usage]) -> pb.Usage:
    u = u or Usage()
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, total_tokens=u.total_tokens)


def _stats(s: Optional[AcceptanceStats]) -> pb.AcceptanceStats:
    s = s or AcceptanceStats()
    return pb.AcceptanceStats(
        num_cycles=s.num_cycles,
        num_draft_tokens=s.num_draft_tokens,
        num_accepted_tokens=s.num_accepted_tokens,
        accepted_per_position=s.accepted_per_position,
        mean_accepted_length=s.mean_accepted_length,
        acceptance_rate=s.acceptance_rate,
    )


def delta_to_response(d: GenerateDelta) -> pb.GenerateResponse:
    r = pb.GenerateResponse(request_id=d.request_id, text=d.text, token_ids=d.token_ids)
    if d.finished:
        r.finished = True
        r.finish_reason = FINISH_REASONS.get(d.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED)
        r.usage.CopyFrom(_usage(d.usage))
        r.stats.CopyFrom(_stats(d.stats))
        r.queue_time_s = d.queue_time_s or 0.0
    return r


def final_response(request_id: str, text: str, token_ids: list[int], last: GenerateDelta) -> pb.GenerateResponse:
    """The Complete answer: the whole output plus the last delta's accounting."""
    r = delta_to_response(last)
    r.request_id = request_id
    r.text = text
    del r.token_ids[:]
    r.token_ids.extend(token_ids)
    return r


def model_info_response(info: ModelInfo, served_model_id: str) -> pb.ModelInfoResponse:
    return pb.ModelInfoResponse(
        model_id=served_model_id,
        architecture=info.architecture,
        block_size=info.block_size,
        max_model_len=info.max_model_len,
        vocab_size=info.vocab_size,
        modes=list(info.modes),
        mask_token_id=info.mask_token_id,
        eos_token_ids=list(info.eos_token_ids),
    )
