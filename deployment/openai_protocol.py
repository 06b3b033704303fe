"""OpenAI-compatible request parsing and response shaping (no Ray, no I/O).

parse_completion / parse_chat turn a decoded JSON body into a GenerateRequest
plus the response options, raising ApiError(400) with the offending field in
`param` for anything malformed. The *_response / *_chunk helpers build the
OpenAI JSON shapes; Orthrus's acceptance statistics ride along in an extension
field `orthrus` on the final response or chunk.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from orthrus_runtime import validation
from orthrus_runtime.types import (
    AcceptanceStats,
    GenerateRequest,
    SamplingParams,
    TokenLogprob,
    Usage,
)

from .errors import ApiError, checked, invalid

# OpenAI's own default for /v1/completions is 16 tokens; chat has no small default,
# so it takes the server's (AppArgs.default_max_tokens).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
CHAT_ROLES = validation.CHAT_ROLES
# Request bodies beyond this are refused with 413 (AppArgs.max_request_bytes).
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
# JSON nesting deeper than this, or integers of more digits, are refused with 400 (a
# 100,000-deep body or a 5,000-digit integer made json.loads raise a plain-text 500).
MAX_JSON_DEPTH = 32
MAX_JSON_INT_DIGITS = 40
# Accepted only at their neutral value: the engine implements none of them.
_NEUTRAL = {
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


# OpenAI's completions API takes logprobs 0..5 (chat's top_logprobs: 0..validation.MAX_LOGPROBS).
COMPLETIONS_MAX_LOGPROBS = 5


@dataclass
class ResponseOptions:
    stream: bool
    include_usage: bool
    request_id: str
    created: int
    model: str
    n: int = 1  # choices, each its own engine request (validation.derive_seed gives its seed)
    logprobs: bool = False  # the response carries log-probabilities
    echo: bool = False  # completions: the prompt (text, and log-probs with logprobs) comes first


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise invalid(f"request body holds an integer of {len(digits.lstrip('-'))} digits; "
                      f"at most {MAX_JSON_INT_DIGITS} are allowed", code="invalid_json")
    return int(digits)


def _depth_ok(raw: bytes) -> bool:
    """Whether brackets nest at most MAX_JSON_DEPTH deep (outside strings), in one pass."""
    depth, in_str, esc = 0, False, False
    for b in raw:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:  # backslash
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return False
        elif b in (0x5D, 0x7D):
            depth -= 1
    return True


def parse_json_body(raw: bytes) -> dict[str, Any]:
    if not _depth_ok(raw):
        raise invalid(f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="invalid_json")
    try:
        body = json.loads(raw, parse_int=_parse_int)
    except ApiError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise invalid(f"request body is not valid JSON: {e}", code="invalid_json") from None
    except (ValueError, RecursionError):
        raise invalid("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt(body: dict, name: str, check, what: str) -> Any:
    v = body.get(name)
    if v is None:
        return None
    if not check(v):
        raise invalid(f"'{name}' must be {what}, got {json.dumps(v)[:80]}", param=name, code="invalid_type")
    return v


def _check_model(body: dict, model_id: str) -> None:
    model = _opt(body, "model", lambda v: isinstance(v, str), "a string")
    if model is not None and model != model_id:
        # The issue asks for 400 here (OpenAI itself answers 404); the code is OpenAI's.
        raise invalid(f"model '{model}' does not exist; this server serves '{model_id}'", param="model", code="model_not_found")


def _check_neutral(body: dict, endpoint_only: tuple[str, ...] = ()) -> None:
    """Refuse the fields this server does not implement (unless at their neutral value), and the
    `endpoint_only` fields, which belong to the other endpoint (neutral: null or false)."""
    for name, neutral in [*_NEUTRAL.items(), *((n, (None, False)) for n in endpoint_only)]:
        if name in body and body[name] not in neutral:
            where = "on this endpoint" if name in endpoint_only else "by this server"
            raise invalid(f"'{name}' is not supported {where}", param=name, code="unsupported_parameter")


def _sampling(body: dict, default_max_tokens: int) -> SamplingParams:
    """The sampling fields as sent; their ranges are checked by `checked` (validation.py)."""
    max_tokens = body.get("max_tokens")
    mct = body.get("max_completion_tokens")
    if mct is not None:
        if max_tokens is not None and max_tokens != mct:
            raise invalid("'max_tokens' and 'max_completion_tokens' disagree", param="max_completion_tokens")
        max_tokens = mct

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise invalid("'stop' must be a string or a list of strings", param="stop", code="invalid_type")

    def given(name: str, default: Any) -> Any:
        v = body.get(name)
        return default if v is None else v

    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        max_tokens_defaulted=max_tokens is None,
        temperature=given("temperature", 1.0),
        top_k=given("top_k", -1),
        top_p=given("top_p", 1.0),
        seed=body.get("seed"),
        stop=list(stop),
    )


def _mode(body: dict) -> Optional[str]:
    return _opt(body, "mode", lambda v: isinstance(v, str), "a string")


def _stream_options(body: dict) -> tuple[bool, bool]:
    stream = _opt(body, "stream", lambda v: isinstance(v, bool), "a boolean") or False
    so = _opt(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    include_usage = False
    if so is not None:
        if not stream:
            raise invalid("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        iu = so.get("include_usage")
        if iu is not None and not isinstance(iu, bool):
            raise invalid("'stream_options.include_usage' must be a boolean", param="stream_options", code="invalid_type")
        include_usage = bool(iu)
    return stream, include_usage


def _prompt(body: dict) -> tuple[Optional[str], Optional[list[int]]]:
    if "prompt" not in body or body["prompt"] is None:
        raise invalid("'prompt' is required", param="prompt", code="missing_required_parameter")
    p = body["prompt"]
    # OpenAI also takes a batch ([str] / [[int]]): one prompt per request is supported.
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return p, None
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        return None, list(p)
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise invalid("only one prompt per request is supported", param="prompt")
    raise invalid("'prompt' must be a string, a non-empty list of token ids, or a list holding one of those",
                  param="prompt", code="invalid_type")


def _content(v: Any, i: int) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list):  # content parts: only text parts can be served
        parts = []
        for part in v:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise invalid(f"messages[{i}].content: only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"messages[{i}].content must be a string or a list of text parts", param="messages", code="invalid_type")


def _messages(body: dict) -> list[dict[str, Any]]:
    """The messages with content parts joined; roles and text are checked by validation.py."""
    msgs = body.get("messages")
    if msgs is None:
        raise invalid("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise invalid("'messages' must be a non-empty list", param="messages", code="invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", param="messages", code="invalid_type")
        out.append({"role": m.get("role"), "content": _content(m.get("content"), i)})
    return out


def _options(body: dict, prefix: str, model_id: str) -> ResponseOptions:
    stream, include_usage = _stream_options(body)
    n = body.get("n")
    if n is not None:
        try:
            validation.check_choices(n)
        except validation.InvalidRequestError as e:
            raise invalid(str(e), param="n") from None
    return ResponseOptions(
        stream=stream,
        include_usage=include_usage,
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model_id,
        n=1 if n is None else n,
    )


def parse_completion(body: dict, model_id: str) -> tuple[GenerateRequest, ResponseOptions]:
    """OpenAI's completions: logprobs (0..5 alternatives), echo; echo with max_tokens 0 scores
    the prompt alone (what lm-evaluation-harness sends for log-likelihoods)."""
    _check_model(body, model_id)
    _check_neutral(body, endpoint_only=("top_logprobs",))
    prompt, ids = _prompt(body)
    params = _sampling(body, COMPLETIONS_DEFAULT_MAX_TOKENS)
    logprobs = _opt(body, "logprobs", _is_int, "an integer")
    if logprobs is not None and not 0 <= logprobs <= COMPLETIONS_MAX_LOGPROBS:
        raise invalid(f"'logprobs' must be in [0, {COMPLETIONS_MAX_LOGPROBS}], got {logprobs}", param="logprobs")
    echo = bool(_opt(body, "echo", lambda v: isinstance(v, bool), "a boolean"))
    params.logprobs = logprobs
    if echo and (logprobs is not None or params.max_tokens == 0):
        params.prompt_logprobs = logprobs or 0  # scored by the prefill (a prompt alone with max_tokens 0)
    opts = _options(body, "cmpl", model_id)
    opts.logprobs, opts.echo = logprobs is not None, echo
    req = GenerateRequest(prompt=prompt, prompt_token_ids=ids, params=params, request_id=opts.request_id,
                          mode=_mode(body))
    return checked(req), opts


def parse_chat(body: dict, model_id: str, default_max_tokens: int) -> tuple[GenerateRequest, ResponseOptions]:
    """OpenAI's chat completions: logprobs (a boolean) and top_logprobs (0..20 alternatives)."""
    _check_model(body, model_id)
    _check_neutral(body, endpoint_only=("echo",))
    messages = _messages(body)
    params = _sampling(body, default_max_tokens)
    logprobs = bool(_opt(body, "logprobs", lambda v: isinstance(v, bool), "a boolean"))
    top = _opt(body, "top_logprobs", _is_int, "an integer")
    if top is not None:
        if not logprobs:
            raise invalid("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        if not 0 <= top <= validation.MAX_LOGPROBS:
            raise invalid(f"'top_logprobs' must be in [0, {validation.MAX_LOGPROBS}], got {top}", param="top_logprobs")
    params.logprobs = (top or 0) if logprobs else None
    opts = _options(body, "chatcmpl", model_id)
    opts.logprobs = logprobs
    req = GenerateRequest(messages=messages, params=params, request_id=opts.request_id, mode=_mode(body))
    return checked(req), opts


def parse_tokenize(body: dict, model_id: str) -> GenerateRequest:
    """/tokenize (vLLM's): exactly one of prompt (str, with add_special_tokens) or messages (with
    add_generation_prompt); both flags default to true, as the engine serves requests."""
    _check_model(body, model_id)
    flags = {name: _opt(body, name, lambda v: isinstance(v, bool), "a boolean")
             for name in ("add_special_tokens", "add_generation_prompt")}
    flags = {k: v for k, v in flags.items() if v is not None}
    if ("prompt" in body) == ("messages" in body):
        raise invalid("send exactly one of 'prompt' or 'messages'", param="prompt")
    if "messages" in body:
        return checked(GenerateRequest(messages=_messages(body), **flags))
    if not isinstance(body["prompt"], str):
        raise invalid("'prompt' must be a string", param="prompt", code="invalid_type")
    return checked(GenerateRequest(prompt=body["prompt"], **flags))


def parse_detokenize(body: dict, model_id: str) -> list[int]:
    """/detokenize (vLLM's): {"tokens": [int, ...]}; the engine checks the vocabulary."""
    _check_model(body, model_id)
    tokens = body.get("tokens")
    if not (isinstance(tokens, list) and all(_is_int(t) for t in tokens)):
        raise invalid("'tokens' must be a list of token ids", param="tokens", code="invalid_type")
    if len(tokens) > validation.MAX_TEXT_CHARS:
        raise invalid(f"at most {validation.MAX_TEXT_CHARS} tokens", param="tokens")
    return tokens


# --------------------------------------------------------------------------- responses


def usage_dict(u: Optional[Usage]) -> dict[str, int]:
    u = u or Usage()
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def stats_dict(s: Optional[AcceptanceStats]) -> dict[str, Any]:
    return (s or AcceptanceStats()).to_dict()


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(lps: Optional[list[TokenLogprob]]) -> Optional[dict[str, Any]]:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}."""
    if lps is None:
        return None
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": _bytes(t.token),
                         "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": _bytes(a.token)}
                                          for a in t.top]} for t in lps],
            "refusal": None}


def completion_logprobs(lps: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """OpenAI's completions shape: parallel lists; text_offset counts characters of the choice's
    text from `offset` (token texts laid end to end); a prompt's first token has null entries.
    top_logprobs maps each alternative's text to its log-prob (and holds the chosen token too,
    as the OpenAI API and vLLM do)."""
    tokens, values, tops, offsets = [], [], [], []
    for t in lps:
        tokens.append(t.token)
        values.append(t.logprob)
        if t.logprob is None:
            tops.append(None)
        else:
            top = {a.token: a.logprob for a in t.top}
            top.setdefault(t.token, t.logprob)
            tops.append(top)
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def completion_choice(index: int, text: str, finish_reason: Optional[str],
                      logprobs: Optional[dict[str, Any]]) -> dict[str, Any]:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def chat_choice(index: int, text: str, finish_reason: Optional[str], lps: Optional[list[TokenLogprob]]) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
            "logprobs": chat_logprobs(lps)}


def completion_response(opts: ResponseOptions, choices: list[dict[str, Any]], usage: Usage,
                        stats: AcceptanceStats) -> dict[str, Any]:
    return {
        "id": opts.request_id,
        "object": "text_completion",
        "created": opts.created,
        "model": opts.model,
        "choices": choices,
        "usage": usage_dict(usage),
        "orthrus": stats_dict(stats),
    }


def chat_response(opts: ResponseOptions, choices: list[dict[str, Any]], usage: Usage,
                  stats: AcceptanceStats) -> dict[str, Any]:
    return {
        "id": opts.request_id,
        "object": "chat.completion",
        "created": opts.created,
        "model": opts.model,
        "choices": choices,
        "usage": usage_dict(usage),
        "orthrus": stats_dict(stats),
    }


def _chunk(opts: ResponseOptions, obj: str, choice: Optional[dict]) -> dict[str, Any]:
    c: dict[str, Any] = {
        "id": opts.request_id,
        "object": obj,
        "created": opts.created,
        "model": opts.model,
        "choices": [choice] if choice is not None else [],
    }
    if opts.include_usage:
        c["usage"] = None  # per OpenAI: null on every chunk but the trailing usage chunk
    return c


def completion_chunk(opts: ResponseOptions, text: str, finish_reason: Optional[str] = None, index: int = 0,
                     logprobs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return _chunk(opts, "text_completion", completion_choice(index, text, finish_reason, logprobs))


def chat_chunk(opts: ResponseOptions, delta: dict[str, Any], finish_reason: Optional[str] = None, index: int = 0,
               lps: Optional[list[TokenLogprob]] = None) -> dict[str, Any]:
    return _chunk(opts, "chat.completion.chunk",
                  {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": chat_logprobs(lps)})


def usage_chunk(opts: ResponseOptions, obj: str, usage: Usage) -> dict[str, Any]:
    c = _chunk(opts, obj, None)
    c["usage"] = usage_dict(usage)
    return c


def sse(data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


SSE_DONE = sse("[DONE]")
