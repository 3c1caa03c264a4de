"""Host->device staging (h2d) through reusable pinned buffers."""

from __future__ import annotations

import pytest
import torch

from hf_efficient.generation import staging


@pytest.mark.gpu
def test_h2d_staging_reuses_buffers_only_after_their_copy():
    """Many host->device copies queued behind GPU work: each arrives with its own values (a staging buffer is not
    rewritten while a queued copy still reads it), and the staging pool stays bounded."""
    dev = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=dev)
    outs = []
    for i in range(3 * staging._STAGING_MAX):
        if i % 16 == 0:
            busy = busy @ busy / 64  # keep the stream busy so copies queue up
        outs.append(staging.h2d([i, i + 1, i + 2], torch.long, dev))
    torch.cuda.synchronize()
    for i, out in enumerate(outs):
        assert out.tolist() == [i, i + 1, i + 2]
    assert len(staging._STAGING[torch.cuda.current_device()]) <= staging._STAGING_MAX
