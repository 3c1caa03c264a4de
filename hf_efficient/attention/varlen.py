"""How a padded or packed transformers batch maps to flash-attn's variable-length layout.

:class:`Varlen` describes the mapping (which flattened tokens are real, ``cu_seqlens``, longest sequences);
:func:`varlen_from_mask` builds it from a 2-D padding mask, :func:`packed_varlen` from a padding-free packed batch
(``cu_seq_lens_*`` kwargs or resets in ``position_ids``). Every layer of one forward receives the same mask /
``position_ids`` tensor, so both are memoised per tensor.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

__all__ = ["Varlen", "cu_from_lengths", "packed_varlen", "varlen_from_mask"]


@dataclass
class Varlen:
    """How a padded or packed batch maps to flash-attn's varlen layout."""

    idx_q: torch.Tensor | None  # (total_q,) indices into the flattened (batch * seqlen_q) queries; None = all
    idx_k: torch.Tensor | None  # (total_k,) indices into the flattened (batch * seqlen_k) keys; None = all
    cu_q: torch.Tensor  # int32 (batch + 1,)
    cu_k: torch.Tensor  # int32 (batch + 1,)
    max_q: int
    max_k: int
    kv_len: int  # keys beyond this column are unused slots (static caches) and are dropped
    # None: cu_q/cu_k came from the caller and their contents must be checked. True/False: built here, valid by
    # construction (non-decreasing, inside the token counts, max_q/max_k exact), and whether the sequences cover
    # every selected token (cu[0] == 0 and cu[-1] == total, for q and k).
    covers: bool | None = None


class _Memo:
    """Per-forward memo: every layer receives the same mask / position_ids tensor, so compute once.

    Keeps a few entries (models alternating full and sliding-window layers pass two masks per forward).
    """

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple] = []

    @staticmethod
    def _version(tensor: torch.Tensor) -> int:
        # Inference tensors keep no version counter; within one forward they are not modified in place.
        return -1 if tensor.is_inference() else tensor._version

    def get(self, tensor: torch.Tensor, extra):
        for ref, key, value in self.entries:
            if ref() is tensor and key == (self._version(tensor), extra):
                return value
        return None

    def put(self, tensor: torch.Tensor, extra, value):
        self.entries = [e for e in self.entries if e[0]() is not None][-(self.size - 1) :]
        self.entries.append((weakref.ref(tensor), (self._version(tensor), extra), value))
        return value


_mask_memo, _pos_memo = _Memo(), _Memo()


def cu_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Sequence lengths (batch,) -> int32 offsets (batch + 1,) starting at 0."""
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def varlen_from_mask(mask: torch.Tensor, seqlen_q: int, seqlen_k: int) -> Varlen:
    """Padding mask ``(batch, L)`` bool -> varlen description. Queries are the last ``seqlen_q`` used positions."""
    given = mask
    hit = _mask_memo.get(given, (seqlen_q, seqlen_k))
    if hit is not None:
        return hit
    batch = mask.shape[0]
    kv_len = min(mask.shape[1], seqlen_k)
    mask = mask[:, :kv_len]
    if seqlen_q != kv_len and seqlen_q > 1:
        # Keys past the last used column are empty static-cache slots: queries end at the last used column.
        cols = torch.arange(kv_len, device=mask.device)
        kv_len = int(torch.where(mask, cols + 1, 0).max())
        mask = mask[:, :kv_len]
    if seqlen_q == 1:
        q_mask = torch.ones(batch, 1, dtype=torch.bool, device=mask.device)
    else:
        q_mask = mask[:, kv_len - seqlen_q : kv_len]
    len_q, len_k = q_mask.sum(1, dtype=torch.int32), mask.sum(1, dtype=torch.int32)
    # Key indices are into (batch, seqlen_k) flattened; mask columns index the first kv_len keys.
    full_k = torch.zeros(batch, seqlen_k, dtype=torch.bool, device=mask.device)
    full_k[:, :kv_len] = mask
    info = Varlen(
        idx_q=q_mask.reshape(-1).nonzero().view(-1),
        idx_k=full_k.reshape(-1).nonzero().view(-1),
        cu_q=cu_from_lengths(len_q),
        cu_k=cu_from_lengths(len_k),
        max_q=int(len_q.max()),
        max_k=int(len_k.max()),
        kv_len=kv_len,
        covers=True,  # the selected rows are exactly the masked-in tokens, sequence after sequence
    )
    return _mask_memo.put(given, (seqlen_q, seqlen_k), info)


def packed_varlen(position_ids: torch.Tensor | None, kwargs: dict, total: int) -> Varlen | None:
    """Padding-free packed batch (batch 1): from ``cu_seq_lens_*`` kwargs or from resets in ``position_ids``
    ``(1, total)``. None when the batch is one plain sequence."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        max_q = kwargs.get("max_length_q")
        max_k = kwargs.get("max_length_k")
        max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        return Varlen(None, None, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, total)
    if position_ids is None or position_ids.shape[0] != 1 or position_ids.shape[-1] <= 1:
        return None
    hit = _pos_memo.get(position_ids, total)
    if hit is not None:
        return hit if hit != "dense" else None
    pos = position_ids.reshape(-1)
    starts = (pos == pos.min()).nonzero().view(-1)
    if starts.numel() <= 1:
        _pos_memo.put(position_ids, total, "dense")
        return None
    cu = torch.cat([starts.to(torch.int32), torch.tensor([pos.numel()], dtype=torch.int32, device=pos.device)])
    max_len = int((cu[1:] - cu[:-1]).max())
    # valid by construction; tokens before the first reset (if any) belong to no sequence
    varlen = Varlen(None, None, cu, cu, max_len, max_len, total, covers=False)
    return _pos_memo.put(position_ids, total, varlen)
