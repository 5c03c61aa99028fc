"""The text of one generation as it grows: stop strings found, and what is safe to stream so far.

The generated token ids are decoded whole at every step (a few dozen to a
few hundred tokens), which keeps word joins and multi-byte characters right.
Text is held back while it could still be the start of a stop string or ends
in an incomplete UTF-8 character, so a streamed reply never shows text that
the final reply would not contain.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from adapterkit.tasks.generation import cut_at_stop

INCOMPLETE = "\ufffd"  # what decoding shows for the first bytes of an unfinished character


class TextStream:
    """Generated tokens of one choice, their text, and the part of it already sent."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was generated

    def text(self) -> str:
        """The text so far, cut before the first stop string."""
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        return cut_at_stop(full, self.stops) if self.stops else full

    def add(self, token: int) -> str:
        """Take one generated token; returns the new text that may be sent now."""
        self.tokens.append(token)
        full = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.stops and any(stop in full for stop in self.stops):
            self.stopped = True
            return self._send(cut_at_stop(full, self.stops))
        safe = full[:len(full) - self.hold] if self.hold else full
        return self._send(safe.rstrip(INCOMPLETE))

    def finish(self) -> str:
        """The rest of the text, once the generation has ended."""
        return self._send(self.text())

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""  # nothing new (or decoding re-spelled sent text: the final reply still has it all)
        new, self.sent = text[len(self.sent):], text
        return new
