"""The CPU path of attn_implementation="hf_efficient": SDPA-based, equal to transformers' sdpa (eager for gemma2),
not slower than it, and with memory linear in the sequence length."""

import statistics
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import hf_efficient  # noqa: F401  (registers the attention)
from hf_efficient.models.tiny import tiny_model


def _reference(family):
    return "eager" if family == "gemma2" else "sdpa"  # transformers serves gemma2 (softcap) with eager only


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen2"])
@pytest.mark.parametrize("padding", ["left", "right", "none"])
def test_padded_batches_match_sdpa(family, padding):
    ours = tiny_model(family, attn_implementation="hf_efficient", seed=1)
    ref = tiny_model(family, attn_implementation=_reference(family), seed=1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 200, (3, 41), generator=g)  # longer than mistral's window of 8
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[0, :13], mask[1, :2] = 0, 0
    elif padding == "right":
        mask[0, 30:], mask[2, 39:] = 0, 0
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen2"])
def test_packed_batch_matches_separate_sequences(family):
    ours = tiny_model(family, attn_implementation="hf_efficient", seed=3)
    ref = tiny_model(family, attn_implementation=_reference(family), seed=3)
    g = torch.Generator().manual_seed(4)
    lengths = [17, 5, 23]
    seqs = [torch.randint(3, 200, (1, n), generator=g) for n in lengths]
    packed = torch.cat(seqs, 1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = ours(input_ids=packed, position_ids=position_ids).logits
        want = torch.cat([ref(input_ids=s).logits for s in seqs], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_with_cache_matches_sdpa():
    ours = tiny_model("mistral", attn_implementation="hf_efficient", seed=5)
    ref = tiny_model("mistral", attn_implementation="sdpa", seed=5)
    ids = torch.randint(3, 200, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kw), ref.generate(ids, **kw))


@pytest.mark.parametrize("padded", [False, True])
def test_not_slower_than_sdpa(padded):
    """Forward of a small model at a few hundred tokens: median time ratio hf_efficient / sdpa, in one process,
    runs interleaved."""
    ours = tiny_model("llama", attn_implementation="hf_efficient", seed=6)
    ref = tiny_model("llama", attn_implementation="sdpa", seed=6)
    ids = torch.randint(3, 200, (2, 384))
    mask = torch.ones_like(ids)
    mask[1, :100] = 0
    kw = dict(input_ids=ids, attention_mask=mask) if padded else dict(input_ids=ids[:1])
    times = {id(ours): [], id(ref): []}
    with torch.no_grad():
        for _ in range(3):  # warm up
            ours(**kw), ref(**kw)
        for _ in range(15):
            for m in (ours, ref):
                start = time.perf_counter()
                m(**kw)
                times[id(m)].append(time.perf_counter() - start)
    ratio = statistics.median(times[id(ours)]) / statistics.median(times[id(ref)])
    assert ratio <= 1.3, f"hf_efficient / sdpa forward time ratio {ratio:.2f}"


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    import hf_efficient  # noqa: F401
    from hf_efficient.attention.compute import attention

    case, n = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    b, h, hk, d = 2, 4, 2, 64
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hk, n, d), torch.randn(b, hk, n, d)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, : n // 3] = False
    module = torch.nn.Module()
    module.is_causal = True
    kw = dict(sliding_window=512) if case == "window" else dict(softcap=30.0) if case == "softcap" else {}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, _ = attention(module, q, k, v, mask, scaling=d**-0.5, **kw)
    assert torch.isfinite(out).all()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
    """
)


@pytest.mark.parametrize("case", ["padded", "window", "softcap"])
def test_peak_memory_is_linear_in_length(case):
    """8k tokens, batch 2, 4 heads: one float32 score matrix of the whole batch is 2 GiB; the call's peak
    resident memory grows by far less (about 100-200 MiB measured; in a fresh process, without the Triton
    interpreter)."""
    n = 8192
    quadratic = 2 * 4 * n * n * 4
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, case, str(n)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew = int(proc.stdout.strip().splitlines()[-1])
    assert grew < quadratic / 8, f"peak memory grew by {grew / 2**20:.0f} MiB (quadratic size {quadratic / 2**20:.0f})"
