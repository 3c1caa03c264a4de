"""Host -> device copies of small host lists without a stream sync (:func:`h2d`), through reusable pinned buffers.

Used by the sampler (a request's parameters and prompt when it gets a slot) and the decode engine (prefill inputs,
slot rows, block-table updates).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["h2d"]

_STAGING: dict[int, list] = {}
_STAGING_MAX = 64


def h2d(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without a stream sync: on CUDA the values go through reusable pinned buffers
    (a copy from pageable memory waits for all queued work; pinning a fresh block each time costs host time). A
    buffer is reused once the copy that last read it has run (its event); while all are in flight a new one is
    added (up to ``_STAGING_MAX``, then the oldest is waited for)."""
    host = torch.as_tensor(values, dtype=dtype).contiguous()
    if device.type != "cuda":
        return host.to(device)
    if torch.cuda.is_current_stream_capturing():
        return host.pin_memory().to(device, non_blocking=True)
    index = device.index if device.index is not None else torch.cuda.current_device()
    pool = _STAGING.setdefault(index, [])  # [buffer, event of the copy that last read it], oldest use first
    nbytes = host.numel() * host.element_size()
    i = next((j for j, e in enumerate(pool) if e[0].numel() >= nbytes and e[1].query()), None)
    if i is None and len(pool) >= _STAGING_MAX:
        i = 0
        pool[0][1].synchronize()
    if i is None:
        entry = [torch.empty(max(nbytes, 1 << 12), dtype=torch.uint8, pin_memory=True), None]
    else:
        entry = pool.pop(i)
        if entry[0].numel() < nbytes:
            entry[0] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    staged = entry[0][:nbytes].view(dtype).view(host.shape)
    staged.copy_(host)
    out = torch.empty(host.shape, dtype=dtype, device=device)
    out.copy_(staged, non_blocking=True)
    entry[1] = torch.cuda.Event()
    entry[1].record(torch.cuda.current_stream(device))
    pool.append(entry)
    return out
