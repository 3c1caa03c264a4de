"""Paged KV-cache decode attention: reference, backend choice, launcher and custom op.

Layers (see DESIGN.md): the CUDA C++ kernel in ``csrc/paged_decode*.cu[h]`` (built at first use by
:mod:`hf_efficient.ops.jit`), the Triton fallback in :mod:`.paged_decode_triton`, the plain
PyTorch reference below (CPU path and test oracle), the custom op ``hf_efficient::paged_decode``
(with a fake for torch.compile) and the public :func:`paged_decode`.

Semantics: ``q`` holds the ``q_len`` newest tokens of each sequence, already written to the cache;
query ``i`` sits at position ``cache_seqlens[b] - q_len + i`` (bottom-right aligned) and, when
causal, sees keys up to that position. A decode step is CUDA-graph capturable: no host sync, no
``.item()``; the split-KV heuristic uses host ints only (``max_seqlen_k``, default: the cache
capacity).
"""

import functools
import math
import warnings

import torch

from .. import tuning
from ._common import check_scalars, new_output, num_sms, pdl_enabled, window_pair
from .jit import Extension, JitSpec, Unit, arch_tag, cache_root

MAX_KERNEL_Q_LEN = 16
KERNEL_HEAD_DIMS = (64, 128, 256)
KERNEL_VARIANTS = tuning.choices("paged_decode_variant")  # (0, 3): see plan_launch
_FORCED = "forced by the paged_decode_backend knob (HF_EFFICIENT_PAGED_DECODE_BACKEND)"

SPEC = JitSpec(
    name="paged_decode",
    cuda_units=tuple(Unit("paged_decode.cu", (f"HFE_HEAD_DIM={d}",)) for d in KERNEL_HEAD_DIMS),
    host_units=(Unit("paged_decode.cu", ("HFE_TORCH_BINDING",)),),
    headers=("paged_decode.cuh", "paged_decode_kernel.cuh"),
)
EXTENSION = Extension(SPEC, "hf_efficient_C")
_warned = False


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------
def paged_decode_reference(q, k_cache, v_cache, cache_seqlens, block_table=None, cache_batch_idx=None,
                           cache_leftpad=None, alibi_slopes=None, softmax_scale=None, softcap=0.0,
                           window_left=-1, window_right=0, compute_dtype=torch.float32):
    """Plain PyTorch paged attention: gathers the pages and computes in ``compute_dtype``.

    Shapes as :func:`paged_decode`. With ``compute_dtype`` float32/float64 it is the oracle; with
    the input dtype it is "plain PyTorch in the same precision" for error budgets.
    Returns out (batch, q_len, nheads, head_dim) in q.dtype and lse (batch, nheads, q_len) fp32.
    """
    B, Tq, H, D = q.shape
    Hk = k_cache.shape[2]
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    if block_table is not None:
        # Columns past a sequence's length may hold anything (-1 padding included): they are gathered from a
        # clamped id and masked below. Columns it uses must hold valid ids (check_paged_values raises).
        idx = block_table.long().clamp(0, max(k_cache.shape[0] - 1, 0))
        K = k_cache[idx].flatten(1, 2)
        V = v_cache[idx].flatten(1, 2)
    else:
        rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(B, device=q.device)
        K, V = k_cache[rows], v_cache[rows]
    S, G = K.shape[1], H // Hk
    qg = q.to(compute_dtype).view(B, Tq, Hk, G, D)
    scores = torch.einsum("btkgd,bskd->bkgts", qg, K.to(compute_dtype)).reshape(B, H, Tq, S) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    L = cache_seqlens.long().view(B, 1, 1)
    kpos = torch.arange(S, device=q.device).view(1, 1, S)
    qpos = L - Tq + torch.arange(Tq, device=q.device).view(1, Tq, 1)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(compute_dtype).expand(B, H) if alibi_slopes.dim() == 1 else alibi_slopes
        bias = (qpos - kpos).abs().unsqueeze(1).to(compute_dtype)  # (B, 1, Tq, S)
        scores = scores - slopes.to(compute_dtype).view(B, H, 1, 1) * bias
    start = cache_leftpad.long().view(B, 1, 1) if cache_leftpad is not None else 0
    valid = (kpos < L) & (kpos >= start)
    V = V.masked_fill(~valid.view(B, S, 1, 1), 0.0)  # slots past the sequence may hold anything, NaN included
    if window_left >= 0:
        valid = valid & (kpos >= qpos - window_left)
    if window_right >= 0:
        valid = valid & (kpos <= qpos + window_right)
    scores = scores.masked_fill(~valid.unsqueeze(1), -math.inf)
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows without keys -> 0
    pg = probs.to(compute_dtype).view(B, Hk, G, Tq, S)
    out = torch.einsum("bkgts,bskd->btkgd", pg, V.to(compute_dtype)).reshape(B, Tq, H, D)
    return out.to(q.dtype), lse


# ---------------------------------------------------------------------------------------------
# Split-KV heuristic
# ---------------------------------------------------------------------------------------------
def plan_rows(q_len: int, group: int) -> tuple[int, int]:
    """(row chunks, MMA row tiles) of the CUDA kernel: rows = q_len * group, <= 128 per block."""
    rows = q_len * group
    chunks = -(-rows // 128)
    per_chunk = -(-rows // chunks)
    tiles = -(-per_chunk // 16)
    return chunks, next(m for m in (1, 2, 4, 8) if m >= tiles)


# Wave model of the memory-bound kernel, fitted to variant x split sweeps (``bench decode --sweep``) on an H100 and an
# H200; only ratios matter much.
_BW = 3.0e12          # device bandwidth (bytes/s) when the device does not report its memory clock and bus width
# What one thread block streams when it has an SM to itself, bytes/s, by head dim (H200 sweeps: 128 -> ~23 GB/s,
# 64 -> ~14.5 GB/s; measured, cause not isolated -- a d64 tile of the same 32 KB holds twice the keys and pages).
_BLOCK_RATE = {64: 14.5e9}
_BLOCK_RATE_DEFAULT = 23e9
_WAVE_RAMP = 2.0e-6   # first-tile latency of each wave, s
_MERGE = 2.0e-6       # split-merge kernel, s
MAX_SPLITS = 256
MIN_TILES_PER_SPLIT = 4  # fewer tiles per split lost at long context, batch 1 (docs/benchmarks/NOTES.md, run 5)


@functools.lru_cache(maxsize=4096)
def choose_num_splits(work_blocks: int, max_seqlen: int, tile_keys: int, num_sms: int, blocks_per_sm: int,
                      head_dim: int = 128, avg_seqlen: int | None = None, max_splits: int = MAX_SPLITS,
                      bandwidth: float = _BW) -> int:
    """Number of KV splits for ``work_blocks`` = batch * kv_heads * row chunks thread blocks.

    Equal lengths: one split when the blocks already fill every slot (``num_sms * blocks_per_sm``); otherwise
    minimise a wave model -- blocks stream at min(bandwidth / resident blocks, one block's rate), each wave pays a
    ramp, splitting pays the merge. Batch 1 x 32k with 8 kv heads gets ~32 splits; batch 16 x 4k gets 2. Varying
    lengths (``avg_seqlen`` well below ``max_seqlen``): ~4 waves of blocks that have work, >= 16 tiles each, so
    long sequences do not finish alone.
    """
    n_tiles = max(1, -(-max_seqlen // tile_keys))
    slots = max(1, num_sms * max(1, blocks_per_sm))
    if avg_seqlen is not None and 0 < avg_seqlen < 0.9 * max_seqlen:
        cap = max(1, min(max_splits, n_tiles // 16))
        frac = avg_seqlen / max_seqlen
        return next((s for s in range(1, cap + 1) if work_blocks * (frac * s + 0.5) >= 4 * slots), cap)
    if work_blocks >= slots:  # blocks start as slots free up, so a partial last wave costs less than modelled
        return 1
    rate = _BLOCK_RATE.get(head_dim, _BLOCK_RATE_DEFAULT)
    best, best_t = 1, math.inf
    for s in range(1, max(1, min(max_splits, n_tiles // MIN_TILES_PER_SPLIT)) + 1):
        tps = -(-n_tiles // s)
        if -(-n_tiles // tps) != s:  # same runs as a smaller split count
            continue
        block_bytes = tps * tile_keys * 4 * head_dim
        n = work_blocks * s
        full, rest = divmod(n, slots)
        t = full * (block_bytes / min(bandwidth / slots, rate) + _WAVE_RAMP)
        if rest:
            t += block_bytes / min(bandwidth / rest, rate) + _WAVE_RAMP
        t += _MERGE if s > 1 else 0.0
        if t < best_t * (1 - 1e-6):
            best, best_t = s, t
    return best


def plan_launch(batch: int, nheads_k: int, q_len: int, group: int, head_dim: int, bf16: bool, max_seqlen: int,
                avg_seqlen: int | None, num_splits: int, device_index: int) -> tuple[int, int, int]:
    """(kernel variant, num_splits, tiles_per_split) of the CUDA kernel for one call.

    The kernel has two variants (``KERNEL_VARIANTS``). One row tile at head_dim 64/128 in bf16 (where variant 3 is
    compiled): variant 3 (two-stage ring: more resident blocks per SM -- three at head_dim 64, where its registers
    are capped, two at 128 -- so more bytes in flight per SM) when the grid has more blocks than SMs, else variant
    0 (three-stage ring: more bytes in flight per block when each block has an SM to itself). Other shapes: variant
    0. Splits from :func:`choose_num_splits` with the device's bandwidth. The ``paged_decode_variant`` knob forces
    a variant (``bench decode --sweep``).
    """
    chunks, m_tiles = plan_rows(q_len, group)
    base = batch * nheads_k * chunks
    sms = num_sms(device_index)
    forced = tuning.get().paged_decode_variant
    variant = 0
    if forced is not None:
        variant = forced
    elif m_tiles == 1 and bf16 and head_dim in (64, 128):
        if _kernel_info(device_index, head_dim, m_tiles, bf16, 3)[1] > 0:
            variant = 3
    tile_keys, per_sm = _kernel_info(device_index, head_dim, m_tiles, bf16, variant)[:2]
    n_tiles = max(1, -(-max_seqlen // tile_keys))
    if num_splits <= 0:
        num_splits = choose_num_splits(base, max_seqlen, tile_keys, sms, per_sm, head_dim, avg_seqlen,
                                       bandwidth=device_bandwidth(device_index))
    num_splits = max(1, min(num_splits, MAX_SPLITS))
    if forced is None and variant == 3 and base * num_splits <= sms:
        variant = 0  # same tiles, deeper ring
    return variant, num_splits, -(-n_tiles // num_splits)


@functools.cache
def device_bandwidth(index: int) -> float:
    """~90% of the peak memory bandwidth the device reports (about what a device copy reaches; NOTES.md)."""
    props = torch.cuda.get_device_properties(index)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 0.9 * 2 * clock_khz * 1e3 * bus_bits / 8
    return _BW


@functools.cache
def _kernel_info(index: int, head_dim: int, m_tiles: int, bf16: bool, variant: int) -> tuple[int, ...]:
    return tuple(EXTENSION.load().kernel_info(head_dim, m_tiles, bf16, variant, index))


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _kernel_compatible(q, k_cache, v_cache, block_table) -> str | None:
    """Why the CUDA kernel cannot take these inputs (None if it can)."""
    if q.shape[1] > MAX_KERNEL_Q_LEN:
        return f"q_len {q.shape[1]} > {MAX_KERNEL_Q_LEN} (prefill)"
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} not in {KERNEL_HEAD_DIMS}"
    if block_table is not None and (k_cache.shape[1] & (k_cache.shape[1] - 1)):
        return "block_size is not a power of two"
    for t in (q, k_cache, v_cache):
        if t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:-1]):
            return "tensors not 16-byte aligned"
    return None


def _kernel_fits(q, nheads_k) -> str | None:
    """None if this device can run the kernel configuration (shared memory), else why not."""
    _, m_tiles = plan_rows(q.shape[1], q.shape[2] // nheads_k)
    try:
        variant = tuning.get().paged_decode_variant or 0
        info = _kernel_info(q.device.index, q.shape[-1], m_tiles, q.dtype == torch.bfloat16, variant)
    except RuntimeError as exc:
        return f"kernel configuration unavailable on this device ({str(exc).splitlines()[0]})"
    return None if info[1] > 0 else "kernel configuration does not fit this device's shared memory"


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"hf_efficient paged decode: CUDA kernel unavailable ({reason}); using the Triton kernel",
                      RuntimeWarning, stacklevel=3)


def select_backend(q, k_cache, v_cache, block_table=None) -> tuple[str, str]:
    """(backend, reason) for these inputs; may build the CUDA extension (first CUDA call). The
    ``paged_decode_backend`` knob (``HF_EFFICIENT_PAGED_DECODE_BACKEND``) may force one."""
    forced = tuning.get().paged_decode_backend
    if forced == "reference":
        return "reference", _FORCED
    if q.device.type != "cuda":
        return "reference", "tensors are not on a CUDA device"
    why = _kernel_compatible(q, k_cache, v_cache, block_table)
    if forced != "triton" and why is None:
        if EXTENSION.load(q.device) is not None:
            why = _kernel_fits(q, k_cache.shape[2])
            if why is None:
                return "cuda", "CUDA kernel"
            return ("triton" if _triton_available() else "reference"), why
        why = EXTENSION.failure
        if forced != "cuda":
            _warn_once(why)
    if forced == "cuda":
        raise RuntimeError(f"paged_decode_backend=cuda (HF_EFFICIENT_PAGED_DECODE_BACKEND) but the CUDA kernel "
                           f"cannot run: {why}")
    if _triton_available():
        return "triton", why or _FORCED
    return "reference", f"{why}; triton not installed"


def backend_report() -> dict:
    """Which implementation paged decode (q_len <= 16) will use here, and why. Never builds. Follows the
    ``paged_decode_backend`` knob (``"unavailable"``: forced to ``cuda``, which cannot run here).

    ``{"op": "paged_decode", "impl": "cuda" | "triton" | "reference" | "unavailable", "why": str, "cache_dir": str}``
    """
    report = {"op": "paged_decode", "cache_dir": str(cache_root())}
    forced = tuning.get().paged_decode_backend
    if forced == "reference":
        return {**report, "impl": "reference", "why": _FORCED}
    if not torch.cuda.is_available():
        return {**report, "impl": "reference", "why": "no CUDA device (the PyTorch reference runs on CPU)"}
    ok, reason = EXTENSION.status()
    report["cache_dir"] = str(SPEC.build_dir(arch_tag(torch.cuda.get_device_capability())))
    if ok and forced != "triton":
        return {**report, "impl": "cuda", "why": reason}
    if forced == "cuda":
        return {**report, "impl": "unavailable", "why": f"{_FORCED}, but the CUDA kernel cannot run: {reason}"}
    if _triton_available():
        return {**report, "impl": "triton", "why": _FORCED if forced == "triton" else reason}
    return {**report, "impl": "reference", "why": f"{reason}; triton not installed"}


def _run_cuda(q, k_cache, v_cache, seqlens, block_table, batch_idx, leftpad, alibi, scale, softcap,
              wl, wr, num_splits, max_seqlen_k, avg_seqlen_k):
    ops = EXTENSION.load(q.device)
    B, Tq, H, D = q.shape
    Hk = k_cache.shape[2]
    variant, num_splits, tiles_per_split = plan_launch(
        B, Hk, Tq, H // Hk, D, q.dtype == torch.bfloat16, max_seqlen_k, avg_seqlen_k or None, num_splits,
        q.device.index)
    out = new_output((B, Tq, H, D), q.dtype, q.device)
    lse = new_output((B, H, Tq), torch.float32, q.device)
    op = lp = None
    if num_splits > 1:
        op = new_output((num_splits, B, Tq, H, D), torch.float32, q.device)
        lp = new_output((num_splits, B, Tq, H), torch.float32, q.device)
    args = (q, k_cache, v_cache, seqlens, block_table, batch_idx, leftpad, alibi, out, lse, op, lp, scale, softcap,
            wl, wr, num_splits, tiles_per_split, variant, pdl_enabled(q.device))
    if q.device.index == torch.cuda.current_device():
        ops.paged_decode(*args, torch.cuda.current_stream().cuda_stream)
    else:
        with torch.cuda.device(q.device):
            ops.paged_decode(*args, torch.cuda.current_stream().cuda_stream)
    return out, lse


def check_paged_values(cache_seqlens, block_table, cache_batch_idx, cache_leftpad, k_cache, n_new=0) -> None:
    """Check the *contents* of the index tensors of a paged decode call; raise ``ValueError`` naming the argument.

    cache_seqlens: (batch,) int32 keys per sequence before ``n_new`` more are appended (``paged_decode``: n_new 0).
    Checks: lengths >= 0; lengths + n_new within the cache (``block_table.shape[1] * block_size`` keys when paged,
    ``seqlen_cache`` otherwise); the block-table columns a sequence uses hold ids in ``[0, num_blocks)`` (unused
    columns may hold anything, -1 padding included); ``cache_batch_idx`` in ``[0, batch_cache)``;
    ``cache_leftpad`` >= 0. One device->host transfer on CUDA (a sync): callers skip it while
    tracing or capturing a CUDA graph, where the kernels' own guards keep every access inside the tensors.
    """
    B = cache_seqlens.shape[0]
    if B == 0:
        return
    lens = cache_seqlens.long()
    total = lens + n_new
    stats = [lens.min(), total.max()]
    if block_table is not None:
        bs, cols = k_cache.shape[1], block_table.shape[1]
        if cols:
            used = torch.arange(cols, device=lens.device).view(1, cols) * bs < total.view(B, 1)
            bad = used & ((block_table < 0) | (block_table >= k_cache.shape[0]))
            first_bad = torch.where(bad.any(1), bad.float().argmax(1), -1)  # column of the first bad id per row
            stats += [bad.any().long(), first_bad.max()]
    if cache_batch_idx is not None:
        stats += [cache_batch_idx.min(), cache_batch_idx.max()]
    if cache_leftpad is not None:
        stats += [cache_leftpad.min()]
    vals = [int(x) for x in torch.stack([t.to(torch.int64) for t in stats]).tolist()]
    if vals[0] < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {vals[0]}")
    if block_table is not None:
        capacity = block_table.shape[1] * k_cache.shape[1]
        if vals[1] > capacity:
            new = f" plus {n_new} new keys" if n_new else ""
            raise ValueError(f"cache_seqlens{new} ({vals[1]}) exceed what block_table holds: "
                             f"{block_table.shape[1]} blocks of {k_cache.shape[1]} = {capacity} keys per sequence; "
                             f"give block_table more columns")
        rest = vals[2:]
        if block_table.shape[1] and rest[0]:
            raise ValueError(f"block_table holds a block id outside [0, num_blocks={k_cache.shape[0]}) in a column "
                             f"a sequence uses (e.g. column {rest[1]})")
        rest = rest[2:] if block_table.shape[1] else rest
    else:
        if vals[1] > k_cache.shape[1]:
            new = f" plus {n_new} new keys" if n_new else ""
            raise ValueError(f"cache_seqlens{new} ({vals[1]}) exceed the cache length seqlen_cache = {k_cache.shape[1]}")
        rest = vals[2:]
    if cache_batch_idx is not None:
        lo, hi = rest[:2]
        rest = rest[2:]
        if lo < 0 or hi >= k_cache.shape[0]:
            raise ValueError(f"cache_batch_idx must lie in [0, batch_cache={k_cache.shape[0]}), got [{lo}, {hi}]")
    if cache_leftpad is not None and rest[0] < 0:
        raise ValueError(f"cache_leftpad must be >= 0, got {rest[0]}")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _dispatch(q, k_cache, v_cache, seqlens, block_table, batch_idx, leftpad, alibi, scale, softcap, wl, wr,
              num_splits, max_seqlen_k, avg_seqlen_k):
    backend, _ = select_backend(q, k_cache, v_cache, block_table)
    if backend == "cuda":
        return _run_cuda(q, k_cache, v_cache, seqlens, block_table, batch_idx, leftpad, alibi, scale, softcap,
                         wl, wr, num_splits, max_seqlen_k, avg_seqlen_k)
    if backend == "triton":
        from .paged_decode_triton import paged_decode_triton

        if num_splits <= 0:
            B, Hk, D = q.shape[0], k_cache.shape[2], q.shape[-1]
            chunks = -(-(q.shape[1] * q.shape[2] // Hk) // 64)
            num_splits = choose_num_splits(B * Hk * chunks, max_seqlen_k, 64, num_sms(q.device.index), 2, D,
                                           avg_seqlen_k or None)
        return paged_decode_triton(q, k_cache, v_cache, seqlens, block_table, batch_idx, leftpad, alibi, scale,
                                   softcap, wl, wr, min(num_splits, MAX_SPLITS))
    if not _capturing():  # the reference indexes with the ids: check them (free for CPU tensors)
        check_paged_values(seqlens, block_table, batch_idx, leftpad, k_cache)
    return paged_decode_reference(q, k_cache, v_cache, seqlens, block_table, batch_idx, leftpad, alibi, scale,
                                  softcap, wl, wr)


# ---------------------------------------------------------------------------------------------
# Custom op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("hf_efficient::paged_decode", mutates_args=())
def paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                    block_table: torch.Tensor | None, cache_batch_idx: torch.Tensor | None,
                    cache_leftpad: torch.Tensor | None, alibi_slopes: torch.Tensor | None,
                    softmax_scale: float, softcap: float, window_left: int, window_right: int, num_splits: int,
                    max_seqlen_k: int, avg_seqlen_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs only (see :func:`paged_decode`; avg_seqlen_k 0 = unknown). Returns (out, lse)."""
    return _dispatch(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, cache_leftpad,
                     alibi_slopes, softmax_scale, softcap, window_left, window_right, num_splits, max_seqlen_k,
                     avg_seqlen_k)


@paged_decode_op.register_fake
def _paged_decode_fake(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, cache_leftpad,
                       alibi_slopes, softmax_scale, softcap, window_left, window_right, num_splits, max_seqlen_k,
                       avg_seqlen_k=0):
    B, Tq, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Tq), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Validation and public function
# ---------------------------------------------------------------------------------------------
def _check_index(name, t, batch, device, shape=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    want = shape or (batch,)
    if t.dim() != len(want) or any(w is not None and s != w for s, w in zip(t.shape, want)):
        raise ValueError(f"{name} must have shape {tuple('*' if w is None else w for w in want)}, "
                         f"got {tuple(t.shape)}")


def check_paged_inputs(q, k_cache, v_cache, cache_seqlens, block_table=None, cache_batch_idx=None,
                       cache_leftpad=None, alibi_slopes=None, softmax_scale=None, causal=True,
                       window_size=(-1, -1), softcap=0.0, num_splits=0, max_seqlen_k=None, avg_seqlen_k=None):
    """Validate :func:`paged_decode` arguments; returns the positional arguments of the custom op.

    Raises TypeError (wrong type/dtype) or ValueError (shape, device, unsupported value) naming
    the argument. Never reads device values (no host sync).
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"q must be float16 or bfloat16, got {q.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (batch, seqlen_q, nheads, head_dim), got shape {tuple(q.shape)}")
    B, Tq, H, D = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} dtype {t.dtype} must match q dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(t.shape)}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    if not 1 <= D <= 256:
        raise ValueError(f"head_dim {D} unsupported: must be between 1 and 256 (the CUDA kernel takes "
                         f"{KERNEL_HEAD_DIMS}, the Triton kernel and the reference any other)")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} must equal k_cache shape {tuple(k_cache.shape)}")
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} must equal q head_dim {D}")
    Hk = k_cache.shape[2]
    if Hk == 0 or H % Hk:
        raise ValueError(f"q nheads {H} must be a multiple of k_cache nheads_k {Hk}")
    if Tq < 1 or B < 1:
        raise ValueError(f"q must have batch >= 1 and seqlen_q >= 1, got shape {tuple(q.shape)}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    _check_index("cache_seqlens", cache_seqlens, B, q.device)
    if block_table is not None:
        _check_index("block_table", block_table, B, q.device, (B, None))
        if cache_batch_idx is not None or cache_leftpad is not None:
            raise ValueError("cache_batch_idx and cache_leftpad are not supported with block_table")
        if k_cache.shape[1] < 1:
            raise ValueError("k_cache block_size must be >= 1")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None and k_cache.shape[0] < B:
            raise ValueError(f"k_cache batch {k_cache.shape[0]} < q batch {B} (pass cache_batch_idx or block_table)")
    if cache_batch_idx is not None:
        _check_index("cache_batch_idx", cache_batch_idx, B, q.device)
    if cache_leftpad is not None:
        _check_index("cache_leftpad", cache_leftpad, B, q.device)
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dtype != torch.float32:
            raise TypeError("alibi_slopes must be a float32 tensor")
        if tuple(alibi_slopes.shape) not in ((H,), (B, H)) or alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes must be ({H},) or ({B}, {H}) on {q.device}, "
                             f"got {tuple(alibi_slopes.shape)} on {alibi_slopes.device}")
        alibi_slopes = alibi_slopes.contiguous()
    # The kernels index these with unit stride (no copies when already contiguous).
    cache_seqlens = cache_seqlens.contiguous()
    block_table = block_table.contiguous() if block_table is not None else None
    cache_batch_idx = cache_batch_idx.contiguous() if cache_batch_idx is not None else None
    cache_leftpad = cache_leftpad.contiguous() if cache_leftpad is not None else None
    if Tq > capacity:
        raise ValueError(f"q seqlen {Tq} exceeds the cache capacity {capacity}")
    window_size = window_pair(window_size)
    check_scalars(softmax_scale, softcap)
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    scale = float(softmax_scale) if softmax_scale is not None else D ** -0.5
    wl, wr = window_size[0], (0 if causal else window_size[1])
    max_k = int(max_seqlen_k) if max_seqlen_k is not None else int(capacity)
    if max_k < 1 or (avg_seqlen_k is not None and not 0 < avg_seqlen_k):
        raise ValueError(f"max_seqlen_k and avg_seqlen_k must be positive ints, got {max_seqlen_k!r}, {avg_seqlen_k!r}")
    return (q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, cache_leftpad, alibi_slopes,
            scale, float(softcap), wl, wr, num_splits, max_k, int(avg_seqlen_k or 0))


def paged_decode(q, k_cache, v_cache, cache_seqlens, block_table=None, *, cache_batch_idx=None,
                 cache_leftpad=None, alibi_slopes=None, softmax_scale=None, causal=True, window_size=(-1, -1),
                 softcap=0.0, num_splits=0, max_seqlen_k=None, avg_seqlen_k=None, return_softmax_lse=False):
    """Attention of the newest tokens over a paged (or contiguous) KV cache.

    Arguments:
        q: (batch, q_len, nheads, head_dim), float16/bfloat16, head_dim 1..256 (the CUDA kernel takes 64, 128
            and 256; other sizes run the Triton kernel); the q_len newest tokens, whose K/V are
            already in the cache. q_len <= 16 runs the CUDA kernel (decode, speculative verify);
            longer q (prefill) runs the Triton kernel.
        k_cache, v_cache: paged (num_blocks, block_size, nheads_k, head_dim) with ``block_table``, or
            contiguous (batch_cache, seqlen_cache, nheads_k, head_dim) without. nheads % nheads_k == 0.
        cache_seqlens: (batch,) int32, keys per sequence including the q_len new ones.
        block_table: (batch, max_blocks_per_seq) int32 page indices (any order), or None.
        cache_batch_idx: (batch,) int32 rows of a contiguous cache (default arange(batch)).
        cache_leftpad: (batch,) int32 first valid key of a contiguous cache (default 0).
        alibi_slopes: (nheads,) or (batch, nheads) fp32; adds -slope * |i + L - q_len - j|.
        softmax_scale: default head_dim ** -0.5. softcap: > 0 applies cap * tanh(s / cap).
        causal / window_size: (left, right) sliding window, -1 unbounded; causal sets right = 0. Any int-like
            pair (tuple/list of ints, numpy integers, integer tensors of two elements).
        num_splits: split-KV factor (<= 256), 0 = heuristic from batch * nheads_k vs SMs and max_seqlen_k.
        max_seqlen_k: host int bound on cache_seqlens for the heuristic (default: cache capacity). A
            sequence longer than this is still computed exactly (its splits just grow).
        avg_seqlen_k: optional host int, mean of cache_seqlens: with varying lengths the heuristic
            splits finer so long sequences do not finish alone.
    Returns:
        out (batch, q_len, nheads, head_dim) in q.dtype, and lse (batch, nheads, q_len) fp32 (natural
        log; -inf for rows that see no key) if ``return_softmax_lse``.
    """
    args = check_paged_inputs(q, k_cache, v_cache, cache_seqlens, block_table, cache_batch_idx, cache_leftpad,
                              alibi_slopes, softmax_scale, causal, window_size, softcap, num_splits, max_seqlen_k,
                              avg_seqlen_k)
    out, lse = paged_decode_op(*args)
    return (out, lse) if return_softmax_lse else out


# The name the HF attention integration (PagedCache decode path) looks up.
paged_decode_attention = paged_decode
