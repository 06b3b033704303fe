"""OutputProcessor: the engine core's token deltas -> the client's deltas (text, stop strings).

The core emits token ids and knows only token-level stops (EOS, stop_token_ids, max_tokens);
text is made here, on the front's side (a Serve replica's process, not the process that
steps the GPU), as vLLM v1's output processor does. A request whose text completes a stop
string (or whose text the tokenizer fails on) is ended here: its tokens after that point
are dropped, and `take_finishing` names it so that the caller finishes it in the core
(`LLMEngine.finish`), which frees its KV blocks and answers with the final accounting
(acceptance statistics, queue time). Until that answer comes the request's last text is
held, so that the client still gets exactly one final delta, with the stop.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from orthrus_runtime.engine.detokenizer import IncrementalDetokenizer
from orthrus_runtime.types import GenerateDelta, SamplingParams, Usage

log = logging.getLogger(__name__)


@dataclass
class _RequestText:
    detok: IncrementalDetokenizer
    num_prompt_tokens: int
    num_tokens: int = 0  # output tokens handed to the client
    held: Optional[GenerateDelta] = None  # ended here, waiting for the core's final delta
    reason: Optional[str] = None


class OutputProcessor:
    """Used from one thread (the async front's output thread, or the synchronous caller);
    `add` may come from another, before the request reaches the core."""

    def __init__(self, tokenizer: Optional[Any]):
        self.tokenizer = tokenizer
        self._reqs: dict[str, _RequestText] = {}
        self._finishing: list[tuple[str, str, int]] = []

    def __len__(self) -> int:
        return len(self._reqs)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        self._reqs[request_id] = _RequestText(IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop),
                                              len(prompt_ids))

    def drop(self, request_id: str) -> None:
        """Forget a request that ends without a final delta (refused, or the core died)."""
        self._reqs.pop(request_id, None)

    def take_finishing(self) -> list[tuple[str, str, int]]:
        """(request_id, finish reason, output tokens to keep) of the requests ended here since
        the last call: the core must finish each (LLMEngine.finish)."""
        out, self._finishing = self._finishing, []
        return out

    def process(self, d: GenerateDelta) -> Optional[GenerateDelta]:
        """The client's delta for one core delta (d itself, its text set), or None while a
        request ended here waits for the core's final delta."""
        st = self._reqs.get(d.request_id)
        if st is None:
            return d
        if st.held is not None:  # the core's output past the stop: dropped
            if not d.finished:
                return None
            del self._reqs[d.request_id]
            return self._final(st.held, st, d)
        keep, reason = len(d.token_ids), None
        if d.finish_reason != "error":
            for i, t in enumerate(d.token_ids):
                try:
                    if st.detok.add(t):
                        keep, reason = i + 1, "stop"
                        break
                except Exception:
                    log.exception("request %s failed in the detokenizer; ending it alone", d.request_id)
                    keep, reason = i + 1, "error"
                    break
            if reason is None and d.finished:
                try:
                    st.detok.flush()
                except Exception:
                    log.exception("request %s failed in the detokenizer; ending it alone", d.request_id)
                    reason = "error"
        st.num_tokens += keep
        if reason is None:
            d.text = "" if d.finish_reason == "error" else st.detok.take(d.finished)
            if d.finished:
                del self._reqs[d.request_id]
            return d
        ended = GenerateDelta(d.request_id, token_ids=d.token_ids[:keep],
                              text=st.detok.take(True) if reason == "stop" else "",
                              logprobs=d.logprobs[:keep] if d.logprobs is not None and reason == "stop" else None,
                              prompt_logprobs=d.prompt_logprobs)
        st.reason = reason
        if d.finished:  # the core ended it in the same delta: nothing to finish there
            del self._reqs[d.request_id]
            return self._final(ended, st, d)
        st.held = ended
        self._finishing.append((d.request_id, reason, st.num_tokens))
        return None

    @staticmethod
    def _final(ended: GenerateDelta, st: _RequestText, core_final: GenerateDelta) -> GenerateDelta:
        ended.finished = True
        ended.finish_reason = st.reason
        ended.usage = Usage(st.num_prompt_tokens, st.num_tokens)
        ended.stats = core_final.stats
        ended.queue_time_s = core_final.queue_time_s
        return ended
