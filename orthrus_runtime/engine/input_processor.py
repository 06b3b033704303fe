"""InputProcessor: a request -> its prompt token ids, checked against the model.

It needs the tokenizer and the model's limits only, not the model: the async front runs it
on its tokenizer thread, in the replica's process, while the engine core steps elsewhere
(engine/core_client.py); the synchronous LLMEngine runs the same one in line.
"""
from __future__ import annotations

from typing import Any, Optional

from orthrus_runtime.types import MODES, GenerateRequest, InvalidRequestError
from orthrus_runtime.validation import ModelLimits, check_request


def _is_id_list(ids: Any) -> bool:
    return isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)


class InputProcessor:
    def __init__(self, tokenizer: Optional[Any], vocab_size: int, max_model_len: int, default_mode: str):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.default_mode = default_mode
        self.limits = ModelLimits(vocab_size, max_model_len)

    def tokenize(self, req: GenerateRequest) -> list[int]:
        given = [x is not None for x in (req.prompt, req.messages, req.prompt_token_ids)]
        if sum(given) != 1:
            raise InvalidRequestError("exactly one of prompt, messages or prompt_token_ids must be given")
        if req.prompt_token_ids is not None:
            if not _is_id_list(req.prompt_token_ids):
                raise InvalidRequestError("prompt_token_ids must be a list of integers")
            return list(req.prompt_token_ids)
        if self.tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer: send prompt_token_ids")
        if req.messages is not None:
            msgs = req.messages
            if not isinstance(msgs, list) or not msgs:
                raise InvalidRequestError("messages must be a non-empty list")
            for m in msgs:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise InvalidRequestError("each message needs string fields 'role' and 'content'")
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequestError("this model has no chat template: send a prompt instead")
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=req.add_generation_prompt)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        if not isinstance(req.prompt, str):
            raise InvalidRequestError("prompt must be a string")
        if req.prompt == "":
            raise InvalidRequestError("prompt must not be empty")
        return list(self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens))

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ids (special tokens kept: the inverse of tokenize)."""
        if not _is_id_list(ids):
            raise InvalidRequestError("tokens must be a list of integers", param="tokens")
        bad = [t for t in ids if not (0 <= t < self.vocab_size)]
        if bad:
            raise InvalidRequestError(f"unknown token id(s) {bad[:5]} (vocabulary size {self.vocab_size})",
                                      param="tokens")
        if self.tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer")
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def validate(self, req: GenerateRequest) -> list[int]:
        """Check a request (setting its mode and fitting a defaulted max_tokens in place);
        returns its prompt ids. Raises InvalidRequestError. Request-id uniqueness is the
        caller's to check: it knows which requests are live."""
        check_request(req, self.limits)
        if req.mode is None:
            req.mode = self.default_mode
        if req.mode not in MODES:
            raise InvalidRequestError(f"mode must be one of {', '.join(MODES)}, got {req.mode!r}")
        ids = self.tokenize(req)
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        V = self.vocab_size
        bad = [t for t in ids if not (0 <= t < V)]
        if bad:
            raise InvalidRequestError(f"unknown token id(s) {bad[:5]} (vocabulary size {V})")
        bad = [t for t in req.params.stop_token_ids if not (0 <= t < V)]
        if bad:
            raise InvalidRequestError(f"unknown stop token id(s) {bad[:5]} (vocabulary size {V})")
        if req.params.max_tokens_defaulted and len(ids) < self.max_model_len:
            req.params.max_tokens = min(req.params.max_tokens, self.max_model_len - len(ids))
        total = len(ids) + req.params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) plus max_tokens ({req.params.max_tokens}) = {total} exceeds "
                f"max_model_len {self.max_model_len}"
            )
        return ids
