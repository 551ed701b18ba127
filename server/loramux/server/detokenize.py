"""Turning a growing list of token ids into text deltas, and spotting stop strings.

Decoding only a short window of recent tokens keeps each step O(1); text that may still
change (an incomplete UTF-8 sequence, or the start of a stop string) is held back until
it is certain, so a streamed reply never shows characters the final reply lacks.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

_WINDOW = 6  # tokens of left context re-decoded so that spaces/merges come out right


class IncrementalText:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop: Sequence[str] = (),
        *,
        skip_special_tokens: bool = True,
        include_stop: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop  # keep the matched stop string (vLLM's option)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # all decoded text so far
        self.emitted = 0  # characters of `text` already handed out
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens))

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return (text safe to emit now, whether a stop string matched)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.ids[self._prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return self._release(final=False), False  # incomplete character: wait
        self.text += full[len(prefix) :]
        self._prefix_offset = max(0, len(self.ids) - _WINDOW)
        self._read_offset = len(self.ids)
        if self.stop:
            search_from = max(0, self.emitted - self.hold)
            hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
            if hits:
                at, stop = min(hits)
                self.text = self.text[: at + len(stop) if self.include_stop else at]
                return self._release(final=True), True
        return self._release(final=False), False

    def _release(self, final: bool) -> str:
        limit = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted : limit]
        self.emitted = limit
        return delta

    def flush(self) -> str:
        """Everything not yet emitted (the request is finishing)."""
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
