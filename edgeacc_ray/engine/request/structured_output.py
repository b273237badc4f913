"""Constrained decoding with llguidance (the grammar engine SGLang and vLLM also use): JSON schema,
any-JSON, regex and EBNF/Lark grammars compiled against the model's tokenizer into a matcher per
request, whose next-token bitmask the sampler applies to that request's row only.

A grammar may ask to end where the model leaves it (`end_when_left`): at a point where the grammar
is complete, a token it does not allow ends the output instead of being masked away. Tool calls use
it, so that a model that has finished its calls is not forced into another one.

Grammars are validated and cached by (kind, text); building a matcher costs well under a millisecond
for the grammars we have measured, and the async engine builds it off the step loop."""

from __future__ import annotations

import functools
import json
import threading
from dataclasses import dataclass
from typing import Any, Literal

import torch

from edgeacc_ray.engine.request.errors import InvalidRequest

Kind = Literal["json_schema", "json_object", "regex", "ebnf", "lark"]
ANY_JSON_SCHEMA = '{"type": "object"}'  # OpenAI's json_object: some JSON object
CACHE_SIZE = 256
# Compact JSON (as OpenAI's structured outputs): free whitespace lets a model pad forever.
JSON_DEFAULTS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match. `spec` is the schema (JSON text), regex or grammar text."""

    kind: Kind
    spec: str = ""
    end_when_left: bool = False  # where the grammar is complete, a token outside it ends the output


@dataclass(frozen=True)
class GrammarMask:
    """A constrained request's rule for its next token (set before sampling, sent to the prefill
    process with the task): the allowed tokens, and the end-of-sequence token that replaces a
    disallowed one where the grammar is complete and asked to end when left (None otherwise)."""

    bitmask: torch.Tensor  # packed int32 bits over the vocabulary
    end_token: int | None = None

    def allows(self, token: int) -> bool:
        word = int(self.bitmask[token // 32]) if token // 32 < self.bitmask.shape[0] else 0
        return bool((word >> (token % 32)) & 1)


class GrammarCompiler:
    """One per engine (per tokenizer): turns a StructuredOutput into a fresh matcher."""

    def __init__(self, tokenizer: Any) -> None:
        self._hf_tokenizer = tokenizer
        self._lock = threading.Lock()
        self._tokenizer = None

    @property
    def tokenizer(self):
        with self._lock:  # built once, on first use (tens of ms for a 50k vocabulary)
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
            return self._tokenizer

    def matcher(self, so: StructuredOutput):
        """A matcher at the start of the grammar; InvalidRequest(field="structured") when it does not compile."""
        import llguidance

        grammar = self._grammar(so)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise InvalidRequest(
                "structured", f"the {so.kind} cannot be used: {matcher.get_error()}"
            )
        return matcher

    @functools.lru_cache(maxsize=CACHE_SIZE)  # noqa: B019 (one compiler per engine, kept for its life)
    def _grammar(self, so: StructuredOutput) -> str:
        import llguidance

        try:
            if so.kind == "json_schema":
                json.loads(so.spec)
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    so.spec, defaults=JSON_DEFAULTS
                )
            elif so.kind == "json_object":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    ANY_JSON_SCHEMA, defaults=JSON_DEFAULTS
                )
            elif so.kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(so.spec)
            else:  # GBNF ("root ::= ...", SGLang's ebnf) or Lark
                grammar = llguidance.grammar_from(so.kind, so.spec)
        except (
            Exception
        ) as exc:  # what the user wrote does not parse; the converters raise their own types
            raise InvalidRequest("structured", f"invalid {so.kind}: {_first_line(exc)}") from None
        ok, error = _validate(grammar, self.tokenizer)
        if not ok:
            raise InvalidRequest("structured", f"invalid {so.kind}: {error}")
        return grammar


def _validate(grammar: str, tokenizer) -> tuple[bool, str]:
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    return (not error, _first_line(error) if error else "")


def _first_line(error: object) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return " ".join(lines[:3])[:500]


def next_token_mask(
    matcher, vocab_size: int, so: StructuredOutput, eos_token_ids: frozenset[int]
) -> GrammarMask:
    """The matcher's allowed next tokens (a packed int32 bitmask row covering `vocab_size` ids), and
    the end token a disallowed one becomes where `so` asks to end when left and the grammar can end."""
    import llguidance.torch as lt

    bits = lt.allocate_token_bitmask(1, vocab_size)
    lt.fill_next_token_bitmask(matcher, bits, 0)
    mask = GrammarMask(bits[0])
    if so.end_when_left and matcher.is_accepting():
        end = next((t for t in sorted(eos_token_ids) if mask.allows(t)), None)
        mask = GrammarMask(bits[0], end)
    return mask


def apply_bitmasks(logits: torch.Tensor, bitmasks: torch.Tensor) -> None:
    """Set disallowed tokens' logits to -inf, all rows in one pass (`logits` [k, vocab], `bitmasks`
    [k, words]) with llguidance's kernel; ids past the bitmask (padding rows of the embedding) are
    disallowed too."""
    import llguidance.torch as lt

    covered = bitmasks.shape[1] * 32
    if logits.shape[1] <= covered:
        lt.apply_token_bitmask_inplace(logits, bitmasks)
        return
    head = logits[:, :covered].contiguous()
    lt.apply_token_bitmask_inplace(head, bitmasks)
    logits[:, :covered] = head
    logits[:, covered:] = float("-inf")
