"""Paged decode attention: reference, Triton kernel (CPU interpreter), CUDA kernel (gpu), API.

Error rule (flash-attention's): |ours - ref64| <= 2 * |plain PyTorch in the same precision - ref64|
(+ a rounding floor of one output ulp), on fresh random inputs with shuffled block tables and
NaN-poisoned outputs (tests/ops/conftest.py turns the ``poison_outputs`` knob on).
"""

import contextlib
import os

import torch

if not torch.cuda.is_available():  # before triton is imported (conftest does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hf_efficient import tuning  # noqa: E402
from hf_efficient.attention.kvcache_api import apply_rotary, flash_attn_with_kvcache  # noqa: E402
from hf_efficient.ops import paged_decode as pd  # noqa: E402
from hf_efficient.ops.paged_decode import KERNEL_VARIANTS  # noqa: E402

CUDA = torch.cuda.is_available()


# Also defined by tests/ops/conftest.py; repeated so this file runs on its own (GPU script).
@pytest.fixture
def device():
    return "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs():
    with tuning.override(poison_outputs=True):
        yield


@pytest.fixture
def tune():
    with contextlib.ExitStack() as stack:
        yield lambda **fields: stack.enter_context(tuning.override(**fields))


def make_cache(lens, Hk, D, bs, dtype, device, spare_blocks=3, gen=None):
    """Random paged cache whose block table scatters each sequence over a shuffled pool."""
    B = len(lens)
    max_blocks = max(-(-n // bs) for n in lens) + 1
    num_blocks = B * max_blocks + spare_blocks
    k = torch.randn(num_blocks, bs, Hk, D, generator=gen).to(dtype).to(device)
    v = torch.randn(num_blocks, bs, Hk, D, generator=gen).to(dtype).to(device)
    perm = torch.randperm(num_blocks, generator=gen)[: B * max_blocks]
    table = perm.view(B, max_blocks).to(torch.int32).to(device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    return k, v, table, seqlens


def oracle(q, k, v, seqlens, table, **kw):
    """(float64 reference output, error of plain PyTorch in q's precision against it)."""
    q, k, v, seqlens = q.cpu(), k.cpu(), v.cpu(), seqlens.cpu()
    table = table.cpu() if table is not None else None
    kw = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    ref = pd.paged_decode_reference(q.double(), k.double(), v.double(), seqlens, table,
                                    compute_dtype=torch.float64, **kw)[0]
    pt, _ = pd.paged_decode_reference(q, k, v, seqlens, table, compute_dtype=q.dtype, **kw)
    return ref, (pt.double() - ref).abs().max().item(), q.dtype


def check(out, orc):
    ref, plain, dtype = orc
    out = out.cpu()
    assert not out.isnan().any(), "unwritten (NaN) output elements"
    ours = (out.double() - ref).abs().max().item()
    floor = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
    assert ours <= 2 * plain + floor, f"error {ours:.3e} > 2 x plain PyTorch {plain:.3e}"


def errors(out, q, k, v, seqlens, table, **kw):
    """(our error, plain-PyTorch error) against the float64 reference."""
    ref, plain, _ = oracle(q, k, v, seqlens, table, **kw)
    assert not out.isnan().any(), "unwritten (NaN) output elements"
    return (out.cpu().double() - ref).abs().max().item(), plain


def assert_close(out, q, k, v, seqlens, table, **kw):
    check(out, oracle(q, k, v, seqlens, table, **kw))


# ---------------------------------------------------------------------------------------------
# Reference (oracle of the oracle: a per-sequence loop over the real keys)
# ---------------------------------------------------------------------------------------------
def naive(q, k, v, seqlens, table, scale, softcap=0.0, wl=-1, wr=0):
    B, Tq, H, D = q.shape
    bs, Hk = k.shape[1], k.shape[2]
    out = torch.zeros(B, Tq, H, D, dtype=torch.float64)
    for b in range(B):
        L = int(seqlens[b])
        pos = torch.arange(L)
        kk = k[table[b, pos // bs].long(), pos % bs].double()
        vv = v[table[b, pos // bs].long(), pos % bs].double()
        for t in range(Tq):
            qpos = L - Tq + t
            ok = torch.ones(L, dtype=torch.bool)
            if wr >= 0:
                ok &= pos <= qpos + wr
            if wl >= 0:
                ok &= pos >= qpos - wl
            for h in range(H):
                s = kk[:, h // (H // Hk)] @ q[b, t, h].double() * scale
                if softcap:
                    s = softcap * torch.tanh(s / softcap)
                s[~ok] = -float("inf")
                out[b, t, h] = torch.softmax(s, 0) @ vv[:, h // (H // Hk)]
    return out


def _nan_outside(k, v, table, seqlens):
    """Pool copies whose slots outside every sequence hold NaN (unwritten cache memory may hold anything)."""
    bs = k.shape[1]
    keep = torch.zeros(k.shape[0] * bs, dtype=torch.bool, device=k.device)
    for b, n in enumerate(seqlens.tolist()):
        pos = torch.arange(n, device=k.device)
        keep[table[b, pos // bs].long() * bs + pos % bs] = True
    nan = torch.tensor(float("nan"), dtype=k.dtype, device=k.device)
    mask = keep.view(k.shape[0], bs, 1, 1)
    return torch.where(mask, k, nan), torch.where(mask, v, nan)


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_slots_past_the_sequence_are_never_read(backend, device, tune):
    if backend == "cuda" and device != "cuda":
        pytest.skip("needs a CUDA GPU")
    tune(paged_decode_backend=backend)
    dtype = torch.float16
    gen = torch.Generator().manual_seed(5)
    k, v, table, seqlens = make_cache([1, 6, 16, 17, 40], 2, 64, 16, dtype, device, gen=gen)
    k_nan, v_nan = _nan_outside(k, v, table, seqlens)
    q = torch.randn(5, 1, 6, 64, generator=gen).to(dtype).to(device)
    if backend == "reference":
        out = pd.paged_decode_reference(q, k_nan, v_nan, seqlens, table)[0]
    else:
        out = pd.paged_decode(q, k_nan, v_nan, seqlens, table)
    assert_close(out, q, k, v, seqlens, table, window_right=0)


@pytest.mark.parametrize("softcap,window", [(0.0, (-1, 0)), (30.0, (5, 0)), (0.0, (-1, -1))])
def test_reference_matches_naive_loop(softcap, window):
    g = torch.Generator().manual_seed(0)
    k, v, table, seqlens = make_cache([1, 5, 16, 33], 2, 16, 8, torch.float32, "cpu", gen=g)
    q = torch.randn(4, 2, 6, 16, generator=g)
    seqlens = seqlens.clamp(min=2)
    out, lse = pd.paged_decode_reference(q, k, v, seqlens, table, softmax_scale=0.3, softcap=softcap,
                                         window_left=window[0], window_right=window[1], compute_dtype=torch.float64)
    want = naive(q, k, v, seqlens, table, 0.3, softcap, *window)
    torch.testing.assert_close(out.double(), want, atol=1e-6, rtol=1e-6)
    assert lse.shape == (4, 6, 2) and torch.isfinite(lse).all()


def test_reference_paged_equals_contiguous():
    g = torch.Generator().manual_seed(1)
    k, v, table, seqlens = make_cache([7, 20, 13], 2, 16, 4, torch.float32, "cpu", gen=g)
    q = torch.randn(3, 1, 4, 16, generator=g)
    kc = k[table.long()].flatten(1, 2)
    vc = v[table.long()].flatten(1, 2)
    a, _ = pd.paged_decode_reference(q, k, v, seqlens, table)
    b, _ = pd.paged_decode_reference(q, kc, vc, seqlens)
    torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# Triton kernel (CPU interpreter: fp16, small shapes)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group,q_len,bs,splits", [(1, 1, 16, 1), (3, 2, 16, 3), (8, 1, 32, 2), (3, 16, 16, 1)])
def test_triton_paged_matches_reference(group, q_len, bs, splits, device):
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    Hk, D = 2, 64
    lens = sorted({max(q_len, n) for n in (1, bs - 1, bs, bs + 1, 3 * bs + 1)})
    k, v, table, seqlens = make_cache(lens, Hk, D, bs, dtype, device)
    q = torch.randn(len(lens), q_len, Hk * group, D, device=device).to(dtype)
    from hf_efficient.ops.paged_decode_triton import paged_decode_triton

    out, lse = paged_decode_triton(q, k, v, seqlens, table, softmax_scale=D ** -0.5, window_left=-1,
                                   window_right=0, num_splits=splits)
    assert_close(out.cpu(), q.cpu(), k.cpu(), v.cpu(), seqlens.cpu(), table.cpu(), window_right=0)
    _, lse_ref = pd.paged_decode_reference(q.cpu(), k.cpu(), v.cpu(), seqlens.cpu(), table.cpu(), window_right=0)
    torch.testing.assert_close(lse.cpu(), lse_ref, atol=2e-3, rtol=1e-3)


def test_triton_every_length(device):
    """Every cache length 1 .. 3 blocks + 1 in one batch (page boundaries, partial tiles)."""
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    bs = 16
    lens = list(range(1, 3 * bs + 2))
    k, v, table, seqlens = make_cache(lens, 1, 64, bs, dtype, device)
    q = torch.randn(len(lens), 1, 3, 64, device=device).to(dtype)
    from hf_efficient.ops.paged_decode_triton import paged_decode_triton

    out, _ = paged_decode_triton(q, k, v, seqlens, table, softmax_scale=0.125, window_right=0, num_splits=2)
    assert_close(out.cpu(), q.cpu(), k.cpu(), v.cpu(), seqlens.cpu(), table.cpu(), softmax_scale=0.125,
                 window_right=0)


def test_triton_prefill_rows(device):
    """q_len > 16 (prefill over pages) runs the Triton kernel in 64-row chunks."""
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    k, v, table, seqlens = make_cache([40, 57], 2, 64, 16, dtype, device)
    q = torch.randn(2, 40, 4, 64, device=device).to(dtype)
    from hf_efficient.ops.paged_decode_triton import paged_decode_triton

    out, _ = paged_decode_triton(q, k, v, seqlens, table, softmax_scale=0.125, window_right=0, num_splits=1)
    assert_close(out, q, k, v, seqlens, table, softmax_scale=0.125, window_right=0)


@pytest.mark.parametrize("feature", ["softcap", "window", "alibi", "contiguous", "noncausal"])
def test_triton_features(feature, device):
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    Hk, G, D, bs = 2, 2, 64, 16
    lens = [3, 40, 70]
    k, v, table, seqlens = make_cache(lens, Hk, D, bs, dtype, device)
    q = torch.randn(3, 2, Hk * G, D, device=device).to(dtype)
    kw = dict(window_left=-1, window_right=0)
    extra = {}
    if feature == "softcap":
        kw["softcap"] = 5.0
    elif feature == "window":
        kw["window_left"] = 20
    elif feature == "alibi":
        extra["alibi_slopes"] = torch.rand(3, Hk * G, device=device)
    elif feature == "noncausal":
        kw["window_right"] = -1
    elif feature == "contiguous":
        k, v = k[table.long()].flatten(1, 2), v[table.long()].flatten(1, 2)
        table = None
        extra["cache_batch_idx"] = torch.tensor([2, 0, 1], dtype=torch.int32, device=device)
        k, v = k[[1, 2, 0]], v[[1, 2, 0]]
        extra["cache_leftpad"] = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    from hf_efficient.ops.paged_decode_triton import paged_decode_triton

    out, _ = paged_decode_triton(q, k, v, seqlens, table, softmax_scale=D ** -0.5, num_splits=2, **kw, **extra)
    cpu = {n: t.cpu() for n, t in extra.items()}
    assert_close(out.cpu(), q.cpu(), k.cpu(), v.cpu(), seqlens.cpu(), None if table is None else table.cpu(),
                 **kw, **cpu)


# ---------------------------------------------------------------------------------------------
# flash_attn_with_kvcache: append semantics, rotary, validation (CPU: reference backend)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("paged", [True, False])
@pytest.mark.parametrize("rotary", [None, "interleaved", "neox"])
def test_kvcache_append_then_attend(paged, rotary, device):
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    B, Hk, G, D, bs, n_new = 3, 2, 2, 64, 16, 2
    before = [5, 16, 30]
    k, v, table, _ = make_cache([n + n_new for n in before], Hk, D, bs, dtype, device)
    seqlens = torch.tensor(before, dtype=torch.int32, device=device)
    if not paged:
        k, v = k[table.long()].flatten(1, 2).contiguous(), v[table.long()].flatten(1, 2).contiguous()
    k0, v0 = k.clone(), v.clone()
    q = torch.randn(B, n_new, Hk * G, D, device=device).to(dtype)
    kn = torch.randn(B, n_new, Hk, D, device=device).to(dtype)
    vn = torch.randn(B, n_new, Hk, D, device=device).to(dtype)
    cos = sin = None
    if rotary:
        ang = torch.rand(64, 16, device=device) * 6.28
        cos, sin = ang.cos(), ang.sin()
    out, lse = flash_attn_with_kvcache(q, k, v, kn, vn, cos, sin, cache_seqlens=seqlens,
                                       block_table=table if paged else None, causal=True,
                                       rotary_interleaved=rotary == "interleaved", return_softmax_lse=True)
    # Expected: manual rotary, manual writes, reference attention.
    pos = seqlens.long()[:, None] + torch.arange(n_new, device=device)
    if rotary:
        q = apply_rotary(q, cos, sin, pos, rotary == "interleaved")
        kn = apply_rotary(kn, cos, sin, pos, rotary == "interleaved")
    for b in range(B):
        for i in range(n_new):
            p = int(pos[b, i])
            if paged:
                k0[table[b, p // bs], p % bs], v0[table[b, p // bs], p % bs] = kn[b, i], vn[b, i]
            else:
                k0[b, p], v0[b, p] = kn[b, i], vn[b, i]
    assert torch.equal(k, k0) and torch.equal(v, v0), "cache not updated exactly at cache_seqlens.."
    total = seqlens + n_new
    assert_close(out.cpu(), q.cpu(), k0.cpu(), v0.cpu(), total.cpu(), table.cpu() if paged else None,
                 window_right=0)
    assert lse.shape == (B, Hk * G, n_new)


def test_rotary_matches_complex_rotation():
    x = torch.randn(2, 3, 4, 32, dtype=torch.float64)
    ang = torch.rand(10, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    got = apply_rotary(x, ang.cos(), ang.sin(), pos, interleaved=True).double()
    z = torch.view_as_complex(x[..., :16].reshape(2, 3, 4, 8, 2).contiguous())
    want = torch.view_as_real(z * torch.polar(torch.ones_like(ang[pos]), ang[pos]).unsqueeze(2)).flatten(-2)
    torch.testing.assert_close(got[..., :16], want.float().double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[..., 16:], x[..., 16:])


def _args(dtype=torch.float16):
    k, v, table, seqlens = make_cache([4, 9], 2, 64, 16, dtype, "cpu")
    q = torch.randn(2, 1, 4, 64).to(dtype)
    return q, k, v, seqlens, table


@pytest.mark.parametrize(
    "mutate,exc,word",
    [
        (lambda a: a.update(q=a["q"].float()), TypeError, "q"),
        (lambda a: a.update(k_cache=a["k_cache"].bfloat16()), TypeError, "k_cache"),
        (lambda a: a.update(q=a["q"][..., :60]), ValueError, "head_dim"),
        (lambda a: a.update(q=a["q"][0]), ValueError, "q"),
        (lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()), TypeError, "cache_seqlens"),
        (lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]), ValueError, "cache_seqlens"),
        (lambda a: a.update(block_table=a["block_table"].long()), TypeError, "block_table"),
        (lambda a: a.update(block_table=a["block_table"][:1]), ValueError, "block_table"),
        (lambda a: a.update(q=torch.randn(2, 40, 4, 64).half()), ValueError, "capacity"),
        (lambda a: a.update(q=torch.randn(2, 1, 3, 64).half()), ValueError, "nheads"),
        (lambda a: a.update(window_size=(-2, 0)), ValueError, "window_size"),
        (lambda a: a.update(softcap=-1.0), ValueError, "softcap"),
        (lambda a: a.update(k=torch.randn(2, 1, 2, 64).half()), ValueError, "k and v"),
        (lambda a: a.update(rotary_cos=torch.ones(8, 8)), ValueError, "rotary"),
        (lambda a: a.update(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
        (lambda a: a.update(cache_leftpad=torch.zeros(2, dtype=torch.int32)), ValueError, "block_table"),
    ],
)
def test_validation_errors_name_the_argument(mutate, exc, word):
    q, k, v, seqlens, table = _args()
    a = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=seqlens, block_table=table)
    mutate(a)
    with pytest.raises(exc, match=word):
        flash_attn_with_kvcache(**a)


def test_custom_op_fake_and_backend_on_cpu():
    q, k, v, seqlens, table = _args()
    args = pd.check_paged_inputs(q, k, v, seqlens, table)
    torch.library.opcheck(pd.paged_decode_op, args)
    if not CUDA:
        assert pd.select_backend(q, k, v, table)[0] == "reference"
        rep = pd.backend_report()
        assert rep["impl"] == "reference" and "no CUDA" in rep["why"]


def test_split_heuristic():
    # batch 1 x 32k, 8 kv heads, 64-key tiles, 132 SMs x 2 blocks: the grid fills the GPU.
    s = pd.choose_num_splits(8, 32768, 64, 132, 2)
    assert 8 * s >= 200 and 8 * s <= 264
    assert pd.choose_num_splits(64 * 8, 4096, 64, 132, 2) == 1  # already ~2 full waves
    # 128 blocks: below one block per SM's rate at the H200's bandwidth -> 2 splits (sweep: 3.78 vs 2.91 TB/s)
    assert pd.choose_num_splits(16 * 8, 4096, 64, 132, 3, bandwidth=4.4e12) == 2
    assert pd.choose_num_splits(64 * 8, 4096, 64, 132, 3, bandwidth=4.4e12) == 1  # fills all 396 slots
    assert pd.choose_num_splits(8, 64, 64, 132, 2) == 1  # one tile: nothing to split
    # Head dim 64 (SmolLM2's 3 kv heads, 128-key tiles, 3 blocks per SM): a block alone streams less, so splits
    # pay off sooner (H200 sweep: 64 x 4k 3.63 TB/s at 2 splits vs 2.79 at 1; 16 x 4k 2.37 at 8 vs 2.03 at 4).
    assert pd.choose_num_splits(64 * 3, 4096, 128, 132, 3, 64, bandwidth=4.33e12) == 2
    assert pd.choose_num_splits(16 * 3, 4096, 128, 132, 3, 64, bandwidth=4.33e12) == 8
    assert pd.choose_num_splits(256 * 3, 1024, 128, 132, 3, 64, bandwidth=4.33e12) == 1
    # Varying lengths (mean well below max): finer splits so long sequences do not finish alone.
    assert pd.choose_num_splits(512, 8192, 64, 132, 2, 128, avg_seqlen=4160) == 4
    assert pd.plan_rows(1, 4) == (1, 1) and pd.plan_rows(16, 8) == (1, 8) and pd.plan_rows(16, 32) == (4, 8)


# ---------------------------------------------------------------------------------------------
# CUDA kernel (GPU)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def cuda_backend(tune):
    tune(paged_decode_backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("q_len", [1, 2, 5, 16])
def test_cuda_kernel_matches_reference(dtype, D, group, q_len, cuda_backend):
    bs = {64: 16, 128: 32, 256: 256}[D]
    Hk = 2
    lens = sorted({max(q_len, n) for n in (1, 2, bs - 1, bs, bs + 1, 3 * bs + 1, 700)})
    k, v, table, seqlens = make_cache(lens, Hk, D, bs, dtype, "cuda")
    q = torch.randn(len(lens), q_len, Hk * group, D, device="cuda").to(dtype)
    orc = oracle(q, k, v, seqlens, table, window_right=0)
    _, lse_ref = pd.paged_decode_reference(q, k, v, seqlens, table, window_right=0)
    for splits in (0, 1, 3):
        out, lse = pd.paged_decode(q, k, v, seqlens, table, num_splits=splits, return_softmax_lse=True)
        check(out, orc)
        torch.testing.assert_close(lse, lse_ref, atol=1e-2, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("D,bs,q_len", [(64, 16, 1), (128, 16, 3), (128, 64, 1), (256, 32, 2)])
def test_cuda_kernel_every_length(D, bs, q_len, cuda_backend):
    lens = list(range(q_len, 3 * max(bs, 64) + 2))
    k, v, table, seqlens = make_cache(lens, 2, D, bs, torch.bfloat16, "cuda")
    q = torch.randn(len(lens), q_len, 6, D, device="cuda").to(torch.bfloat16)
    orc = oracle(q, k, v, seqlens, table, window_right=0)
    for splits in (1, 2):
        check(pd.paged_decode(q, k, v, seqlens, table, num_splits=splits), orc)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("feature", ["softcap", "window", "alibi", "contiguous", "noncausal", "bs256", "mqa"])
def test_cuda_kernel_features(feature, cuda_backend):
    dtype, D, Hk, G, bs = torch.bfloat16, 128, 2, 4, 16
    lens = [9, 100, 1000, 2049]
    if feature == "bs256":
        bs = 256
    if feature == "mqa":
        Hk, G = 1, 40  # 40 heads x q_len 4 = 160 rows: two row chunks
    k, v, table, seqlens = make_cache(lens, Hk, D, bs, dtype, "cuda")
    q = torch.randn(len(lens), 4, Hk * G, D, device="cuda").to(dtype)
    kw, extra = dict(causal=True), {}
    ref_kw = dict(window_right=0)
    if feature == "softcap":
        kw["softcap"] = ref_kw["softcap"] = 20.0
    elif feature == "window":
        kw["window_size"] = (300, -1)
        ref_kw["window_left"] = 300
    elif feature == "alibi":
        extra["alibi_slopes"] = torch.rand(Hk * G, device="cuda")
    elif feature == "noncausal":
        kw["causal"] = False
        ref_kw["window_right"] = -1
    elif feature == "contiguous":
        k, v = k[table.long()].flatten(1, 2).contiguous(), v[table.long()].flatten(1, 2).contiguous()
        table = None
        extra["cache_leftpad"] = torch.tensor([0, 3, 500, 7], dtype=torch.int32, device="cuda")
    orc = oracle(q, k, v, seqlens, table, **ref_kw, **extra)
    for splits in (0, 1, 4):
        check(pd.paged_decode(q, k, v, seqlens, table, num_splits=splits, **kw, **extra), orc)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("variant", KERNEL_VARIANTS)
def test_cuda_kernel_variants(D, variant, cuda_backend, tune):
    """Every tile/stage variant the launcher or a sweep can pick."""
    tune(paged_decode_variant=variant)
    k, v, table, seqlens = make_cache([1, 63, 64, 65, 300, 1500], 2, D, 16, torch.bfloat16, "cuda")
    q = torch.randn(6, 1, 8, D, device="cuda").to(torch.bfloat16)
    orc = oracle(q, k, v, seqlens, table, window_right=0)
    for splits in (0, 1, 3):
        check(pd.paged_decode(q, k, v, seqlens, table, num_splits=splits), orc)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_split_plan_hints_never_change_results(cuda_backend):
    """max_seqlen_k below the real lengths (splits grow on device) and the avg_seqlen_k hint."""
    k, v, table, seqlens = make_cache([5, 700, 3000, 90], 2, 128, 16, torch.bfloat16, "cuda")
    q = torch.randn(4, 2, 8, 128, device="cuda").to(torch.bfloat16)
    orc = oracle(q, k, v, seqlens, table, window_right=0)
    for kw in (dict(max_seqlen_k=64, num_splits=3), dict(max_seqlen_k=64), dict(max_seqlen_k=3000, avg_seqlen_k=900),
               dict(num_splits=256)):
        check(pd.paged_decode(q, k, v, seqlens, table, **kw), orc)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("D,group,q_len,variant", [(64, 3, 1, 0), (64, 3, 5, 3), (128, 4, 1, 3), (128, 4, 16, 0)])
def test_cuda_decode_right_after_a_pdl_writer(D, group, q_len, variant, cuda_backend, tune):
    """The engine's decode step: the kernel right before the attention (rotary + K/V write, programmatic dependent
    launch) writes q and the q_len new rows, inside a CUDA graph; before each replay the new rows are poisoned (NaN)
    and q is redrawn, so an attention that reads them before that kernel ends shows NaN or a wrong result."""
    from hf_efficient.ops.decode_linear import rope_store

    tune(paged_decode_variant=variant)
    Hk, bs, dtype = 2, 16, torch.bfloat16
    H = Hk * group
    lens = [q_len, q_len + 1, 17, 130, 300, 1100]
    k, v, table, seqlens = make_cache(lens, Hk, D, bs, dtype, "cuda")
    B = len(lens)
    pos = (seqlens.long()[:, None] - q_len + torch.arange(q_len, device="cuda")).flatten()
    rows = torch.arange(B, device="cuda").repeat_interleave(q_len)
    slots = (table.long()[rows, pos // bs] * bs + pos % bs).contiguous()
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    qkv = torch.empty(B * q_len, (H + 2 * Hk) * D, device="cuda", dtype=dtype)

    def step():
        q = rope_store(qkv, pos, inv_freq, 1.0, H, Hk, k, v, slots)
        return pd.paged_decode(q.view(B, q_len, H, D), k, v, seqlens, table, num_splits=1)

    qkv.normal_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    flat_k, flat_v = k.view(-1, Hk, D), v.view(-1, Hk, D)
    for _ in range(5):
        flat_k[slots] = float("nan")
        flat_v[slots] = float("nan")
        qkv.normal_()
        graph.replay()
        torch.cuda.synchronize()
        q_ref = rope_store(qkv, pos, inv_freq, 1.0, H, Hk, k, v, slots)  # same rows again; q for the oracle
        assert_close(out, q_ref.view(B, q_len, H, D), k, v, seqlens, table, window_right=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_plan_launch():
    idx = torch.cuda.current_device()
    sms = pd.num_sms(idx)
    variant, splits, tps = pd.plan_launch(1, 8, 1, 4, 128, True, 32768, None, 0, idx)
    assert variant == 3 and sms < 8 * splits <= 3 * sms and splits * tps * 64 >= 32768
    variant, splits, _ = pd.plan_launch(64, 8, 1, 4, 128, True, 4096, None, 0, idx)
    assert variant == 3 and splits == 1
    # head dim 64: variant 3's register cap gives three resident blocks per SM (two at 128)
    assert pd._kernel_info(idx, 64, 1, True, 3)[1] == 3 and pd._kernel_info(idx, 128, 1, True, 3)[1] == 2
    assert pd.plan_launch(64, 3, 1, 3, 64, True, 4096, None, 0, idx)[:2] == (3, 2)
    # the engine's batch-1 step (SmolLM2 shape, short context, unsplit): 3 blocks, each with an SM to itself
    assert pd.plan_launch(1, 3, 1, 3, 64, True, 1024, None, 1, idx)[:2] == (0, 1)
    assert pd.plan_launch(1, 8, 1, 4, 128, False, 32768, None, 0, idx)[0] == 0  # fp16: no tuned variants


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_decode_step_is_graph_capturable(cuda_backend):
    dtype, D, Hk, G, bs = torch.bfloat16, 128, 8, 4, 16
    k, v, table, seqlens = make_cache([4000, 100, 3000], Hk, D, bs, dtype, "cuda")
    q = torch.randn(3, 1, Hk * G, D, device="cuda").to(dtype)
    kn = torch.randn(3, 1, Hk, D, device="cuda").to(dtype)
    before = (seqlens - 1).contiguous()
    step = lambda: flash_attn_with_kvcache(q, k, v, kn, kn, cache_seqlens=before, block_table=table, causal=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm up: builds/loads the kernel outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    q.copy_(torch.randn_like(q))
    g.replay()
    torch.cuda.synchronize()
    assert_close(out.cpu(), q.cpu(), k.cpu(), v.cpu(), seqlens.cpu(), table.cpu(), window_right=0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_backend_report_on_gpu():
    rep = pd.backend_report()
    assert rep["impl"] in ("cuda", "triton") and rep["why"]
