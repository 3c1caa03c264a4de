"""The engine's output side: tokens read back from the device become request output, and requests finish.

A request finishes on an end token (its ``stop_token_ids``, unless ``ignore_eos``), on a stop string (the output is
cut where the string begins; needs a tokenizer), or at ``max_tokens``. Tokens the device produced after a request
finished (a window of steps runs between host reads) are dropped here.

A request also finishes, alone, with ``finish_reason`` starting ``"error: "`` when its logits were not finite (the
device computed a NaN log-probability for its token; the token is dropped) or when checking it raised (e.g. the
tokenizer failed to decode its output for a stop string); the other requests go on.
"""

from __future__ import annotations

from collections.abc import Sequence

from .request import Request
from .sampling import SamplingParams, StopStringMatcher


class OutputProcessor:
    """Appends tokens to requests and decides when they finish.

    Args:
        tokenizer: used for stop strings (detokenising the output tail); ``None`` when no request has any.
    """

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self._matchers: dict[tuple, StopStringMatcher] = {}

    def check_params(self, params: SamplingParams, tokenizer=None) -> None:
        """Raise before any work when a request needs something this processor lacks."""
        if params.stop and (tokenizer or self.tokenizer) is None:
            raise ValueError(
                f"stop={list(params.stop)!r} needs a tokenizer: DecodeEngine(model, tokenizer=...) or "
                "generate(..., tokenizer=...)"
            )

    def append(self, req: Request, tokens: Sequence[int], logprobs: Sequence[float], tokenizer=None) -> int:
        """Append ``tokens`` (with their log-probabilities) until the request finishes; returns tokens kept."""
        kept = 0
        for t, p in zip(tokens, logprobs):
            if req.finished:
                break
            if p != p:  # NaN: the logits of this step were not finite
                req.finish_reason = f"error: non-finite logits at output token {len(req.output)}"
                break
            req.output.append(t)
            req.logprobs.append(p)
            kept += 1
            try:
                self._check_finished(req, tokenizer)
            except Exception as err:  # this request fails alone
                req.finish_reason = f"error: {type(err).__name__}: {err}"
        return kept

    def _check_finished(self, req: Request, tokenizer) -> None:
        p = req.params
        last = req.output[-1]
        if not p.ignore_eos and last in p.stop_token_ids:
            req.finish_reason = "stop"
        elif p.stop and (cut := self._matcher(p, tokenizer).check(req.output)) is not None:
            del req.output[cut:], req.logprobs[cut:]
            req.finish_reason = "stop"
        elif len(req.output) >= p.max_tokens:
            req.finish_reason = "length"

    def _matcher(self, p: SamplingParams, tokenizer) -> StopStringMatcher:
        tok = tokenizer if tokenizer is not None else self.tokenizer
        key = (id(tok), tuple(p.stop))
        matcher = self._matchers.get(key)
        if matcher is None or matcher.tokenizer is not tok:
            matcher = self._matchers[key] = StopStringMatcher(tok, list(p.stop))
        return matcher
