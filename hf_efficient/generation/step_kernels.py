"""Fused bookkeeping of the engine's decode step (on by default; the ``fused_step`` knob turns it off).

Around the model's forward a decode step runs ~25 tiny PyTorch kernels: the K/V write slots and lengths from the
positions (~9), the greedy token and its log-probability (~10), the sampler's step counter and seen set (2), and
the step's commit -- next input token, position, history columns (~5). Each moves a few bytes and costs its launch.
Two Triton kernels do the same work:

* :func:`step_inputs` -- ``seqlens = pos + 1``; ``slots = table[row, pos // block_size] * block_size +
  pos % block_size``.
* :func:`greedy_commit` -- for the sampler's greedy fast path (every row greedy, no repetition penalty): the first
  argmax of each row, its raw log-probability ``x[token] - logsumexp(x) = -log(sum(exp(x - max)))``, the row's step
  counter + 1, ``seen[row, token] = True``, then the commit: ``tokens[row] = token``, ``positions[row] +=
  active[row]``, ``history[row, h] = token``, ``history_lp[row, h] = logprob`` and, once every row has read it,
  ``h += 1``.

Both match the PyTorch ops they replace: same tokens, slots and lengths; log-probabilities to float32 rounding.
Each has a plain-PyTorch reference (the engine's own ops) that the tests compare against under the interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import tuning
from ..ops import precompile
from ..ops._common import interpreting
from .logprobs import raw_logprobs

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Linux installs carry triton
    triton = None

__all__ = ["enabled", "usable", "step_inputs", "step_inputs_reference", "StepCommit", "greedy_commit",
           "greedy_commit_reference"]


def enabled() -> bool:
    """The fused step kernels run unless the ``fused_step`` knob is off (``HF_EFFICIENT_FUSED_STEP=0``); they
    shorten the captured step (docs/benchmarks/NOTES.md). Read when an engine is built."""
    return tuning.get().fused_step


def usable(device: torch.device) -> bool:
    """Triton can run these kernels on ``device``: CUDA, or CPU under the interpreter."""
    return triton is not None and (device.type == "cuda" or (device.type == "cpu" and interpreting()))


# ----------------------------------------------------------------------------------------------
# References (the engine's PyTorch ops)
# ----------------------------------------------------------------------------------------------


def step_inputs_reference(positions, block_table, block_size: int, seqlens_out, slots_out) -> None:
    seqlens_out.copy_(positions + 1)
    blk = block_table.gather(1, (positions // block_size)[:, None]).squeeze(1).long()
    slots_out.copy_(blk * block_size + positions % block_size)


@dataclass
class StepCommit:
    """Where a decode step's sampled tokens go (the engine's buffers, first B rows): the next input ``tokens`` and
    ``positions`` (advanced by ``active``), and the ``history`` / ``history_lp`` column ``hist_idx``, which then
    advances. ``counter``: one int32, zero between calls (the fused kernel's arrival counter)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    active: torch.Tensor
    history: torch.Tensor
    history_lp: torch.Tensor
    hist_idx: torch.Tensor
    counter: torch.Tensor

    def apply(self, tok: torch.Tensor, lp: torch.Tensor) -> None:
        """The commit in PyTorch ops (the engine's path for every sampler mode but the fused greedy one)."""
        b = tok.shape[0]
        self.tokens.copy_(tok)
        self.positions += self.active
        self.history.scatter_(1, self.hist_idx.expand(b, 1), tok[:, None])
        self.history_lp.scatter_(1, self.hist_idx.expand(b, 1), lp[:, None].float())
        self.hist_idx += 1


def greedy_commit_reference(logits, steps, seen, commit: StepCommit) -> None:
    """The sampler's greedy fast path (argmax, step counter, seen set; raw logprob) then ``commit.apply``."""
    tok = logits.to(torch.float32).argmax(dim=-1)
    steps += 1
    seen.index_put_((torch.arange(tok.shape[0], device=tok.device), tok), torch.ones_like(tok, dtype=torch.bool))
    commit.apply(tok, raw_logprobs(logits, tok))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit(do_not_specialize=["B"])
    def _step_inputs_kernel(POS, TABLE, SEQ, SLOTS, B, stride_t, ncols, BS: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.arange(0, BLOCK)
        ok = r < B
        pos = tl.load(POS + r, mask=ok, other=0)
        tl.store(SEQ + r, (pos + 1).to(tl.int32), mask=ok)
        col = tl.minimum(pos // BS, ncols - 1)  # in range by the engine's reservation; clamped for memory safety
        blk = tl.load(TABLE + r * stride_t + col, mask=ok, other=0).to(tl.int64)
        tl.store(SLOTS + r, blk * BS + pos % BS, mask=ok)

    @triton.jit(do_not_specialize=["B"])
    def _greedy_commit_kernel(X, sx, V, STEPS, s_steps, SEEN, s_seen, TOK, POS, ACTIVE, HIST, HLP, s_hist, HIDX,
                              CNT, B, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        idx = tl.zeros([], tl.int64)
        for start in range(0, V, BLOCK):
            cols = start + offs
            x = tl.load(X + r * sx + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            bm = tl.max(x, 0)
            bi = tl.argmax(x, 0, tie_break_left=True).to(tl.int64)
            new_m = tl.maximum(m, bm)
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), 0)
            idx = tl.where(bm > m, start + bi, idx)  # strictly greater: the first maximum wins, as in argmax
            m = new_m
        lp = -tl.log(s)
        step = tl.load(STEPS + r * s_steps)
        tl.store(STEPS + r * s_steps, step + 1)
        tl.store(SEEN + r * s_seen + idx, tl.full([], 1, tl.uint8))
        tl.store(TOK + r, idx)
        tl.store(POS + r, tl.load(POS + r) + tl.load(ACTIVE + r))
        h = tl.load(HIDX)
        tl.store(HIST + r * s_hist + h, idx)
        tl.store(HLP + r * s_hist + h, lp)
        # the history column advances once, after every row has read it
        old = tl.atomic_add(CNT, 1, sem="acq_rel")
        if old == B - 1:
            tl.store(HIDX, h + 1)
            tl.atomic_xchg(CNT, 0)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def step_inputs(positions, block_table, block_size: int, seqlens_out, slots_out) -> None:
    """``seqlens_out = positions + 1`` (int32) and ``slots_out`` (int64) = the flat cache slot of each row's next
    token, from ``block_table`` (rows x max_blocks int32). One kernel for up to 1024 rows."""
    b = positions.shape[0]
    if b == 0:
        return
    if b > 1024 or block_table.stride(1) != 1:
        return step_inputs_reference(positions, block_table, block_size, seqlens_out, slots_out)
    precompile.run(_step_inputs_kernel, (1,), positions, block_table, seqlens_out, slots_out, b,
                   block_table.stride(0), block_table.shape[1], BS=block_size,
                   BLOCK=max(16, triton.next_power_of_2(b)), num_warps=1)


def greedy_commit(logits, steps, seen, commit: StepCommit) -> None:
    """The greedy fast path of a step and its commit in one kernel (see the module docstring); called by
    :meth:`BatchSampler.sample_commit <hf_efficient.generation.sampling.BatchSampler.sample_commit>`.

    logits ``(B, V)`` float; steps ``(>= B,)`` int64 view (any stride): the sampler's step counters; seen
    ``(>= B, V)`` bool; the commit's tokens / positions / active ``(>= B,)`` int64, history ``(>= B, W)`` int64
    and history_lp ``(>= B, W)`` float32 with equal strides."""
    b, v = logits.shape
    if b == 0:
        return
    c = commit
    if not (logits.stride(1) == 1 and seen.stride(1) == 1 and c.history.stride() == c.history_lp.stride()
            and c.history.stride(1) == 1):
        raise ValueError("greedy_commit: logits, seen and the history buffers need a unit last stride, and "
                         "history / history_lp equal strides")
    _greedy_commit_kernel[(b,)](
        logits, logits.stride(0), v, steps, steps.stride(0), seen.view(torch.uint8), seen.stride(0), c.tokens,
        c.positions, c.active, c.history, c.history_lp, c.history.stride(0), c.hist_idx, c.counter, b,
        BLOCK=min(16384, triton.next_power_of_2(v)), num_warps=16 if v > 4096 else 4,
    )
