"""The counter-based generator: the device hash equals its host reference, and its numbers are uniform."""

from __future__ import annotations

import torch
from sampling_reference import chi2_pvalue  # tests/generation is on sys.path (rootdir import mode)

from hf_efficient.generation.sampling import counter_uniform, counter_uniform_reference, stream_key


def test_counter_uniform_matches_reference_and_is_uniform():
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(-(2**63), 2**63 - 1, (64,), generator=g, dtype=torch.int64)
    steps = torch.randint(0, 2**40, (64,), generator=g, dtype=torch.int64)
    got = counter_uniform(keys, steps)
    want = [counter_uniform_reference(int(k), int(s)) for k, s in zip(keys, steps)]
    assert got.dtype == torch.float64 and got.tolist() == want
    assert stream_key(5, 0) != stream_key(5, 1) != stream_key(6, 0)
    # Uniformity over keys x steps (consecutive steps of consecutive seeds: the worst case for a weak hash).
    k = torch.tensor([stream_key(s) for s in range(200)]).repeat_interleave(250)
    t = torch.arange(250).repeat(200)
    u = counter_uniform(k, t)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.bincount((u * 50).long(), minlength=50).tolist()
    assert chi2_pvalue(counts, [1 / 50] * 50) > 1e-3
    lag = (u[1:] - 0.5) * (u[:-1] - 0.5)  # serial correlation along a stream
    assert abs(float(lag.mean())) < 0.005
