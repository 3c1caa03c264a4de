"""Stop strings: host-side detection in the detokenized output of a request (:class:`StopStringMatcher`), decoding
only the tail, and where a stop string completed (:class:`StopMatch`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["StopMatch", "StopStringMatcher"]


@dataclass(frozen=True)
class StopMatch:
    """Where a stop string completed.

    ``num_tokens``: tokens to keep (up to and including the one that completed the stop string).
    ``trailing_chars``: characters of ``decode(ids[:num_tokens])`` after the end of the stop string, so the text
    without the stop string is ``text[: len(text) - trailing_chars - len(stop)]``.
    """

    stop: str
    num_tokens: int
    trailing_chars: int


class StopStringMatcher:
    """Detects stop strings in the detokenized output of a request, decoding only its tail.

    ``check(ids)`` after each new token costs two decodes of about ``max(len(stop)) + 8`` tokens, whatever the
    output length. The text is ``tokenizer.decode(ids, skip_special_tokens=...)`` of the generated ids (the
    prompt is not part of it); a stop string may span several tokens.

    Args:
        tokenizer: a transformers tokenizer (anything with ``decode(ids, skip_special_tokens=...)``).
        stops: the stop strings.
        skip_special_tokens: decode as the user sees the output.
    """

    _MARGIN = 4  # characters a window start may garble (stripped leading space, partial UTF-8 bytes)

    def __init__(self, tokenizer: Any, stops: Sequence[str], *, skip_special_tokens: bool = True):
        if isinstance(stops, str):
            stops = [stops]
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        self.tokenizer = tokenizer
        self.stops = tuple(dict.fromkeys(stops))
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.skip_special_tokens = skip_special_tokens

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _earliest(self, text: str, new_from: int) -> tuple[int, int, str] | None:
        """The stop occurrence of ``text`` ending after position ``new_from`` that ends first: (end, start, stop)."""
        best = None
        for stop in self.stops:
            i = text.find(stop, max(0, new_from - len(stop) + 1))
            if i >= 0:
                cand = (i + len(stop), i, stop)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        return best

    def find(self, token_ids: Sequence[int] | torch.Tensor, num_new: int = 1) -> StopMatch | None:
        """The first stop string completed by one of the last ``num_new`` tokens of ``token_ids``, or ``None``.

        Earlier tokens are assumed checked already (call it after each step with the tokens added since the
        previous call); ``num_new=len(token_ids)`` scans everything.
        """
        if not self.stops or num_new <= 0:
            return None
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        n = len(ids)
        first_new = n - min(num_new, n)
        need = self.max_len - 1 + self._MARGIN
        ctx = self.max_len + 8
        while True:
            start = max(0, first_new - ctx)
            old = self._decode(ids[start:first_new])
            if start == 0 or len(old) >= need:
                break
            ctx *= 2
        full = self._decode(ids[start:n])
        p = len(old) if full.startswith(old) else _common_prefix(old, full)
        hit = self._earliest(full, p)
        if hit is None:
            return None
        end = n
        if n - first_new > 1:  # which new token completes it: the shortest prefix containing a match
            lo, hi = first_new + 1, n
            while lo < hi:
                mid = (lo + hi) // 2
                h = self._earliest(self._decode(ids[start:mid]), p)
                if h is not None:
                    hi, hit = mid, h
                else:
                    lo = mid + 1
            end = lo
            if end != n:
                full = self._decode(ids[start:end])
                hit = self._earliest(full, p) or hit
        return StopMatch(stop=hit[2], num_tokens=end, trailing_chars=len(full) - hit[0])

    def check(self, token_ids: Sequence[int] | torch.Tensor, num_new: int = 1) -> int | None:
        """Like :meth:`find` but returns only the number of tokens to keep (``StopMatch.num_tokens``) or ``None``."""
        m = self.find(token_ids, num_new)
        return None if m is None else m.num_tokens

    def truncate(self, text: str) -> tuple[str, str | None]:
        """``text`` cut before the first stop string that ends in it, and that stop string (``None`` if none)."""
        hit = self._earliest(text, 0)
        if hit is None:
            return text, None
        return text[: hit[1]], hit[2]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
