"""Log-probabilities of chosen tokens under the model's own distribution (pure tensor functions).

Shared by the sampler (``logprobs="raw"``) and the fused step kernels' reference, below both.
"""

from __future__ import annotations

import torch

__all__ = ["raw_logprobs"]


def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits.float())[row, tokens[row]]`` as float32 ``(B,)`` (the model's own logprob).

    logits ``(B, V)`` any float dtype; tokens ``(B,)`` int64."""
    x = logits.to(torch.float32)
    return (x.gather(1, tokens[:, None]) - torch.logsumexp(x, dim=-1, keepdim=True)).squeeze(1)
