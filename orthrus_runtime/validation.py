"""The one set of request rules, shared by the HTTP and gRPC front ends and the engine.

Every field is checked against a range the engine can represent before the request
is queued, with the same message on every path: the router checks what it can
without the model (types, ranges, text), and the engine checks the same rules again
plus what needs the model (vocabulary, max_model_len, on token counts). A request
that passes cannot make the engine build a tensor it cannot hold (an int64 overflow
in the sampling tensors stopped the step loop for everyone).

Torch-free: the Serve layer imports it without the model stack.

Limits (docs/reliability.md lists them for users):
  max_tokens      1 .. MAX_TOKENS_LIMIT (0 with prompt_logprobs: score a prompt alone), and
                  prompt + max_tokens <= max_model_len
  logprobs        None or 0 .. MAX_LOGPROBS alternatives (prompt_logprobs the same)
  temperature     0 .. TEMPERATURE_MAX; 0 < t < TEMPERATURE_FLOOR is greedy (t = 0)
  top_p           (0, 1]
  top_k           -1 or 0 (off), or 1 .. TOP_K_LIMIT; >= the vocabulary keeps every token
  seed            64 bits: -2**63 .. 2**64 - 1
  stop            at most MAX_STOP_STRINGS non-empty strings of MAX_STOP_CHARS characters
  text            valid Unicode (no lone surrogates); at most MAX_TEXT_CHARS characters in
                  all, and max_model_len * MAX_CHARS_PER_TOKEN in the engine
  roles           system, user, assistant, developer (= system)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from orthrus_runtime.types import MODES, GenerateRequest, InvalidRequestError, SamplingParams

MAX_TOKENS_LIMIT = 2**31 - 1
TEMPERATURE_MAX = 2.0
# Below this a temperature divides logits into overflow (1e-38 gave NaN probabilities and
# garbage text) long before it differs from greedy; vLLM treats t < 1e-5 as greedy too.
TEMPERATURE_FLOOR = 1e-5
TOP_K_LIMIT = 2**31 - 1
SEED_MIN, SEED_END = -(2**63), 2**64
# Alternatives per position in log-probabilities (OpenAI's top_logprobs limit; its completions
# API allows 5, checked at that door).
MAX_LOGPROBS = 20
# Choices per request (`n`): each is its own engine request.
MAX_CHOICES = 16
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
TOKEN_ID_LIMIT = 2**31  # ids at the door; the engine checks them against its vocabulary
# Bound the tokenizer's work per request (prompt, messages and stop strings together): at
# the door MAX_TEXT_CHARS; in the engine also max_model_len * MAX_CHARS_PER_TOKEN, text so
# long that it cannot fit max_model_len tokens (real tokenizers average 3-5 characters a
# token), so only the token-count check refuses real prompts.
MAX_TEXT_CHARS = 1 << 20
MAX_CHARS_PER_TOKEN = 32
MAX_MESSAGES = 4096
MAX_REQUEST_ID_CHARS = 128
# Accepted roles; `developer` is OpenAI's newer name for the system role.
CHAT_ROLES = ("system", "user", "assistant", "developer")
_ROLE_ALIASES = {"developer": "system"}


@dataclass(frozen=True)
class ModelLimits:
    """What the engine's model adds to the rules (None where unknown: the router's view)."""

    vocab_size: Optional[int] = None
    max_model_len: Optional[int] = None


def _bad(message: str, param: Optional[str]) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_text(value: Any, param: str, what: Optional[str] = None) -> str:
    """A string that encodes to UTF-8 (JSON's \\ud800 escapes can carry lone surrogates)."""
    what = what or f"'{param}'"
    if not isinstance(value, str):
        raise _bad(f"{what} must be a string, got {_show(value)}", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad(f"{what} is not valid Unicode (a lone surrogate at character {e.start})", param) from None
    return value


def _check_int(v: Any, name: str, lo: int, hi: int, what: str) -> int:
    if not is_int(v):
        raise _bad(f"'{name}' must be an integer, got {_show(v)}", name)
    if not (lo <= v <= hi):
        raise _bad(f"'{name}' must be {what}, got {v}", name)
    return v


def _check_float(v: Any, name: str) -> float:
    if not is_number(v):
        raise _bad(f"'{name}' must be a number, got {_show(v)}", name)
    try:
        f = float(v)
    except OverflowError:  # an int beyond the double range
        f = math.inf
    if not math.isfinite(f):
        raise _bad(f"'{name}' must be finite, got {v}", name)
    return f


def check_sampling(p: SamplingParams) -> None:
    """Check p in place; normalises temperature (floats, the greedy floor) and top_p."""
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(p, name) is not None:
            _check_int(getattr(p, name), name, 0, MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]")
    scoring_only = p.max_tokens == 0 and p.prompt_logprobs is not None  # a prompt scored (echo), no output
    if not scoring_only:
        _check_int(p.max_tokens, "max_tokens", 1, MAX_TOKENS_LIMIT, f"in [1, {MAX_TOKENS_LIMIT}]")
    t = _check_float(p.temperature, "temperature")
    if not (0.0 <= t <= TEMPERATURE_MAX):
        raise _bad(f"'temperature' must be in [0, {TEMPERATURE_MAX:g}], got {p.temperature}", "temperature")
    p.temperature = 0.0 if t < TEMPERATURE_FLOOR else t
    top_p = _check_float(p.top_p, "top_p")
    if not (0.0 < top_p <= 1.0):
        raise _bad(f"'top_p' must be in (0, 1], got {p.top_p}", "top_p")
    p.top_p = top_p
    _check_int(p.top_k, "top_k", -1, TOP_K_LIMIT, f"-1 or 0 (off) or in [1, {TOP_K_LIMIT}]")
    if p.seed is not None:
        _check_int(p.seed, "seed", SEED_MIN, SEED_END - 1, "in [-2**63, 2**64 - 1] (64 bits)")
    if not isinstance(p.stop, list):
        raise _bad("'stop' must be a list of strings", "stop")
    if len(p.stop) > MAX_STOP_STRINGS:
        raise _bad(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(p.stop)}", "stop")
    for i, s in enumerate(p.stop):
        check_text(s, "stop", f"stop[{i}]")
        if s == "":
            raise _bad("stop strings must not be empty", "stop")
        if len(s) > MAX_STOP_CHARS:
            raise _bad(f"stop strings must be at most {MAX_STOP_CHARS} characters, got {len(s)}", "stop")
    if not isinstance(p.stop_token_ids, list) or not all(is_int(t) for t in p.stop_token_ids):
        raise _bad("'stop_token_ids' must be a list of integers", "stop_token_ids")
    if len(p.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise _bad(f"at most {MAX_STOP_TOKEN_IDS} stop token ids are allowed", "stop_token_ids")
    if any(not (0 <= t < TOKEN_ID_LIMIT) for t in p.stop_token_ids):
        raise _bad("stop token ids must be non-negative 32-bit integers", "stop_token_ids")
    for name in ("ignore_eos", "max_tokens_defaulted"):
        if not isinstance(getattr(p, name), bool):
            raise _bad(f"'{name}' must be a boolean", name)


def check_choices(n: Any) -> int:
    """`n`, the number of choices: 1 .. MAX_CHOICES."""
    return _check_int(n, "n", 1, MAX_CHOICES, f"in [1, {MAX_CHOICES}]")


def derive_seed(seed: Optional[int], index: int) -> Optional[int]:
    """Choice `index`'s seed from the request's: choice 0 keeps it (n = 1 is unchanged), the
    others get distinct 64-bit seeds from it, so a seeded n > 1 request is reproducible."""
    if seed is None or index == 0:
        return seed
    x = (seed + index * 0x9E3779B97F4A7C15) % 2**64  # splitmix64's increment and finaliser
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return x ^ (x >> 31)


def check_role(role: Any, i: int) -> str:
    """A message's role, with `developer` mapped to `system`."""
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise _bad(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {_show(role)}", "messages")
    return _ROLE_ALIASES.get(role, role)


def check_messages(msgs: Any) -> list[dict[str, str]]:
    """[{"role", "content"}] with valid roles and text; returns the normalised list."""
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list", "messages")
    if len(msgs) > MAX_MESSAGES:
        raise _bad(f"at most {MAX_MESSAGES} messages are allowed, got {len(msgs)}", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", "messages")
        role = check_role(m.get("role"), i)
        content = check_text(m.get("content"), "messages", f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return out


def _text_chars(req: GenerateRequest) -> int:
    n = sum(len(s) for s in req.params.stop)
    if req.prompt is not None:
        n += len(req.prompt)
    if req.messages is not None:
        n += sum(len(m["content"]) + len(m["role"]) for m in req.messages)
    return n


def check_request(req: GenerateRequest, limits: ModelLimits = ModelLimits()) -> None:
    """Check (and normalise in place) a whole request. Raises InvalidRequestError with the
    field at fault in `param`. Idempotent: the router and the engine both call it."""
    if not isinstance(req, GenerateRequest):
        raise _bad("the request must be a GenerateRequest", None)
    if not isinstance(req.params, SamplingParams):
        raise _bad("params must be SamplingParams", None)
    for name in ("add_special_tokens", "add_generation_prompt"):
        if not isinstance(getattr(req, name), bool):
            raise _bad(f"'{name}' must be a boolean", name)
    given = [n for n, v in (("prompt", req.prompt), ("messages", req.messages),
                            ("prompt_token_ids", req.prompt_token_ids)) if v is not None]
    if len(given) != 1:
        raise _bad("exactly one of prompt, messages, prompt_token_ids must be set"
                   + (f" (got {', '.join(given)})" if given else ""), given[0] if given else "prompt")
    if req.prompt is not None:
        check_text(req.prompt, "prompt")
        if req.prompt == "":
            raise _bad("'prompt' must not be empty", "prompt")
    elif req.messages is not None:
        req.messages = check_messages(req.messages)
    else:
        ids = req.prompt_token_ids
        if not isinstance(ids, list) or not ids or not all(is_int(t) for t in ids):
            raise _bad("'prompt_token_ids' must be a non-empty list of integers", "prompt_token_ids")
        bad = [t for t in ids if not (0 <= t < (limits.vocab_size or TOKEN_ID_LIMIT))]
        if bad:
            vocab = f" (vocabulary size {limits.vocab_size})" if limits.vocab_size else ""
            raise _bad(f"unknown token id(s) {bad[:5]}{vocab}", "prompt_token_ids")
        if limits.max_model_len is not None and len(ids) >= limits.max_model_len:
            raise _bad(f"the prompt ({len(ids)} tokens) does not fit max_model_len {limits.max_model_len}",
                       "prompt_token_ids")
    check_sampling(req.params)
    if limits.vocab_size is not None:
        bad = [t for t in req.params.stop_token_ids if t >= limits.vocab_size]
        if bad:
            raise _bad(f"unknown stop token id(s) {bad[:5]} (vocabulary size {limits.vocab_size})", "stop_token_ids")
    if limits.max_model_len is not None and not req.params.max_tokens_defaulted \
            and req.params.max_tokens >= limits.max_model_len:
        raise _bad(f"'max_tokens' ({req.params.max_tokens}) leaves no room for a prompt in max_model_len "
                   f"{limits.max_model_len}", "max_tokens")
    n, cap = _text_chars(req), MAX_TEXT_CHARS
    if limits.max_model_len is not None:
        cap = min(cap, limits.max_model_len * MAX_CHARS_PER_TOKEN)
    if n > cap:
        raise _bad(f"the request's text is {n} characters; at most {cap} are allowed", given[0])
    if req.mode is not None and req.mode not in MODES:
        raise _bad(f"'mode' must be one of {', '.join(MODES)}, got {_show(req.mode)}", "mode")
    if req.request_id is not None:
        check_text(req.request_id, "request_id")
        if len(req.request_id) > MAX_REQUEST_ID_CHARS:
            raise _bad(f"'request_id' must be at most {MAX_REQUEST_ID_CHARS} characters", "request_id")
