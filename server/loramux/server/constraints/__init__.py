"""Structured outputs: a per-request constraint on what the model may generate (issue 26).

`spec` says what a request asked (a JSON schema, a regex, a choice, a grammar) and checks its
size before anything is compiled; `compiler` turns a spec into an xgrammar grammar for the
engine's tokenizer, off the engine thread, with a bounded time and a bounded LRU cache;
`masks` holds a row's matcher and applies the rows' token bitmasks to a step's logits.
"""

from loramux.server.constraints.spec import ConstraintKind, ConstraintSpec

__all__ = ["ConstraintKind", "ConstraintSpec"]
