"""Log-probabilities of tokens, reduced from logits as soon as a pass made them.

One distribution everywhere: log_softmax of the model's raw float32 logits (the bf16
lm_head output, widened), before temperature, penalties, logit_bias, top-k or top-p, as
vLLM returns by default. Generated tokens and prompt tokens are scored alike, so a token
scored as part of a prompt (echo, lm-eval's loglikelihood) gets the number it would have
got had the model generated it.

Prompt positions are reduced chunk by chunk in prefill: the runner hands over the logits
of one chunk of one row that asked ([chunk tokens, vocab]), they become a few floats per
position here, and are dropped, so memory is bounded by the chunk, not by the prompt's
length x the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramux.server.requests import TokenLogprob


def score(
    logits: torch.Tensor,  # [positions, vocab] float32: what the model said at each position
    targets: Sequence[int],  # the token that followed each position
    top: int,  # alternatives wanted per position (0: only the target's own)
) -> list[TokenLogprob]:
    """The targets' log-probabilities and, when `top` > 0, the `top` most likely tokens."""
    if not targets:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [positions, vocab]
    index = torch.tensor(list(targets), dtype=torch.long, device=logprobs.device)
    own = logprobs.gather(1, index[:, None])[:, 0].tolist()
    if top:
        values, ids = torch.topk(logprobs, top, dim=-1)  # [positions, top] each
        tops = [
            tuple(zip(row_ids, row_values, strict=True))
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    else:
        tops = [()] * len(own)
    return [
        TokenLogprob(token_id=int(t), logprob=float(v), top=alt)
        for t, v, alt in zip(targets, own, tops, strict=True)
    ]
