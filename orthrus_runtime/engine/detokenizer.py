"""Incremental detokenization with stop strings.

Decoding token by token is wrong for byte-level BPE (a character can span
tokens) and for tokenizers that merge spaces: text is taken as the difference
between decoding a small window with and without the new tokens, and held back
while it ends in an incomplete character. Text that could still turn into a stop
string is held back too, so a stop string never reaches the client.
"""
from __future__ import annotations

from typing import Any, Optional


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Optional[Any], prompt_ids: list[int], stop: list[str]):
        self.tok = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        # Start the window on the prompt's last tokens so that the first generated
        # token gets its leading space right (sentencepiece-style tokenizers).
        self.ids = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # stable output text so far
        self.sent = 0  # characters of self.text already emitted
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> bool:
        """Append one token; returns True when a stop string completed (text truncated)."""
        if self.tok is None or self.stopped:
            return False
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            start = len(self.text)
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            if self.stop:
                # A new match must end inside the new text; search from where it could begin.
                lo = max(0, start - self.hold)
                best = -1
                for s in self.stop:
                    i = self.text.find(s, lo)
                    if i != -1 and (best == -1 or i < best):
                        best = i
                if best != -1:
                    self.text = self.text[:best]
                    self.stopped = True
                    return True
        return False

    def flush(self) -> None:
        """At the end: whatever the window still holds (an incomplete character decodes as U+FFFD)."""
        if self.tok is None or self.stopped or self.read_offset == len(self.ids):
            return
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.text += full[len(prefix) :]
        self.prefix_offset = self.read_offset = len(self.ids)

    def take(self, finished: bool) -> str:
        """The text increment that is safe to send now (everything when finished)."""
        end = len(self.text) if finished else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out
