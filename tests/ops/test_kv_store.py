"""store_kv: one-launch write of new K/V tokens into paged pools, vs index_copy_ (interpreter on CPU)."""

import pytest
import torch

from hf_efficient.ops.kv_store import store_kv, store_kv_reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("b,hk,t,d,dv", [(3, 2, 1, 16, 16), (2, 3, 5, 24, 40)])
def test_store_kv_matches_reference_with_strided_inputs(dtype, b, hk, t, d, dv, device):
    blocks, bs = 16, 4
    # inputs as attention modules produce them: (B, T, Hk, D) projections viewed as (B, Hk, T, D)
    key = torch.randn(b, t, hk, d, dtype=dtype, device=device).transpose(1, 2)
    value = torch.randn(b, t, hk, dv, dtype=dtype, device=device).transpose(1, 2)
    slots = torch.randperm(blocks * bs, device=device)[: b * t]
    slots[1] = -1  # a skipped (padding) token
    pools = [torch.randn(blocks, bs, hk, x, dtype=dtype, device=device) for x in (d, dv)]
    ref = [p.clone() for p in pools]
    store_kv(key, value, pools[0], pools[1], slots)
    store_kv_reference(key, value, ref[0], ref[1], slots)
    assert torch.equal(pools[0], ref[0]) and torch.equal(pools[1], ref[1])


def test_store_kv_rejects_bad_slots():
    key = torch.randn(2, 1, 3, 8)
    pool = torch.randn(4, 4, 1, 8)
    with pytest.raises(ValueError, match="slots"):
        store_kv(key, key, pool, pool, torch.zeros(6, dtype=torch.int32))
