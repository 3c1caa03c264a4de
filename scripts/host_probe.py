"""Host microseconds per flash-attention call, split by stage (GPU machine; tiny inputs).

    python scripts/host_probe.py [OUT_JSON]
"""
import json
import sys

import torch

from hf_efficient import tuning
from hf_efficient.attention.flash_api import flash_attn_func
from hf_efficient.bench.attention import host_us_per_call
from hf_efficient.ops import flash_attn as fa
from hf_efficient.ops import flash_fwd as ff


def per_call_us(fn):
    return host_us_per_call(fn, n=500, warmup=30)


def main():
    q, k, v = (torch.randn(1, 128, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    res = {}
    res["full_fwd_grad"] = per_call_us(lambda: flash_attn_func(q, k, v, causal=True))
    with torch.no_grad():
        res["full_fwd_no_grad"] = per_call_us(lambda: flash_attn_func(q, k, v, causal=True))
        res["flash_fwd_launcher"] = per_call_us(lambda: ff.flash_fwd(q, k, v, softmax_scale=0.1, causal=True))
        res["check_inputs"] = per_call_us(lambda: fa.check_inputs(q, k, v))
        res["two_cuda_empty"] = per_call_us(lambda: (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                                                     torch.empty((1, 2, 128), device=q.device)))
        import torch.nn.functional as F
        res["sdpa_fwd_no_grad"] = per_call_us(lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True))
        saved = ff.launch
        ff.launch = lambda *a, **kw: None
        res["flash_fwd_without_launch"] = per_call_us(lambda: ff.flash_fwd(q, k, v, softmax_scale=0.1, causal=True))
        ff.launch = saved
        with tuning.override(direct_launch=False):
            res["flash_fwd_triton_launcher"] = per_call_us(
                lambda: ff.flash_fwd(q, k, v, softmax_scale=0.1, causal=True))
    res["direct_launches"] = dict(ff.DIRECT_LAUNCHES)
    print(json.dumps(res))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
