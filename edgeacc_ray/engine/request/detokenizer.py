"""Incremental detokenization that never emits a broken UTF-8 character, with stop strings."""

from __future__ import annotations

from typing import Any

_CONTEXT_TOKENS = 5  # prompt tokens decoded along with the output so word boundaries come out right


class IncrementalDetokenizer:
    """Feeds on one token at a time; `emit()` returns the text that is safe to hand out so far."""

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
    ) -> None:
        self._decode = _fast_decoder(tokenizer, skip_special_tokens)
        self.tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.matched_stop: str | None = None

    def add(self, token_id: int) -> None:
        """Append a token; sets `matched_stop` (and cuts the text before it) when a stop string appears."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete UTF-8 sequence: wait for the next token
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        search_from = max(0, len(self.text) - self.holdback)
        self.text += delta
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at != -1:
                self.matched_stop = stop
                self.text = self.text[:at]
                return

    def emit(self, finished: bool) -> str:
        """New text since the last call; while running, hold back what could begin a stop string."""
        end = (
            len(self.text)
            if finished or not self.stop
            else max(self.emitted, len(self.text) - self.holdback)
        )
        out = self.text[self.emitted : end]
        self.emitted = end
        return out


def _fast_decoder(tokenizer: Any, skip_special_tokens: bool):
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
