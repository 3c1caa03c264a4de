"""Prefill of admitted prompts: packed into one forward (each group's prompt stored once), natively for short
prompts, or in chunks for a prompt longer than the prefill budget.

Every path returns one row of logits per group (its prompt's last token), from which the runner draws each
sample's first token.
"""

from __future__ import annotations

import itertools

import torch

from ..cache.paged import StepPlan
from .native import NATIVE_PREFILL_TOKENS
from .runner import GraphKey, ModelRunner
from .scheduler import PrefillBatch
from .staging import h2d

#: token buckets of captured native prefills (padded up to the next one)
PREFILL_BUCKETS = tuple(16 << i for i in range(16) if 16 << i < NATIVE_PREFILL_TOKENS) + (NATIVE_PREFILL_TOKENS,)


def prefill(runner: ModelRunner, batch: PrefillBatch, chunk_tokens: int) -> torch.Tensor:
    """Prefill the batch's prompts into the blocks the scheduler gave them; returns float logits (groups, vocab).

    A single prompt longer than ``chunk_tokens`` is prefilled in chunks of that size, each chunk attending to the
    cached tokens before it and to itself (causal)."""
    groups = batch.groups
    if len(groups) == 1 and len(groups[0][0].context) > chunk_tokens:
        return _chunked(runner, groups[0][0], chunk_tokens)
    mgr = runner.cache.blocks
    ids, pos, slots, last = [], [], [], []
    for group in groups:
        req = group[0]
        prompt = req.context
        slots.append(mgr.slots(req.blocks, 0, len(prompt)))
        ids.extend(prompt)
        pos.append(torch.arange(len(prompt)))
        last.append(len(ids) - 1)
    dev = runner.device
    slots_t = torch.cat(slots)
    runner.stats.prefill_tokens += len(ids)
    if runner.native is not None and len(groups) <= runner.native_prefill_prompts and len(ids) <= NATIVE_PREFILL_TOKENS:
        return _native(runner, ids, torch.cat(pos), slots_t, last, [len(g[0].context) for g in groups]).float()
    plan = StepPlan(
        q_len=len(ids), lens_before=[0], n_new=[len(ids)], q_idx=None, write_slots=slots_t.to(dev),
        block_table=runner.block_table[:1], cache_seqlens=runner.seqlens_after[:1],
    )
    runner.cache.use_plan(plan)
    out = runner.model(
        input_ids=torch.tensor([ids], device=dev), position_ids=torch.cat(pos)[None].to(dev), **runner.cache_kw,
        use_cache=True, logits_to_keep=torch.tensor(last, device=dev),
    )
    return out.logits[0].float()


def _native(runner: ModelRunner, ids, pos, slots, last, lens) -> torch.Tensor:
    """Packed prompts through the native kernels; with CUDA graphs, replayed from a graph per (tokens, prompts)
    bucket: a short prefill is bound by launches, ~8 per layer. Padding tokens write to the scratch block and
    belong to no prompt (empty sequences pad the offsets). Returns logits (prompts, vocab)."""
    t, g = len(ids), len(lens)
    # eager calls pad the same way, so that both run the same kernel configurations (bitwise-equal results)
    tb, gb = next(b for b in PREFILL_BUCKETS if b >= t), runner.bucket(g)
    cu = list(itertools.accumulate(lens, initial=0))
    pieces = [(ids, tb, 0), (pos.tolist(), tb, 0), (slots.tolist(), tb, runner.scratch * runner.block_size),
              (last, gb, 0), (cu, gb + 1, cu[-1])]  # (values, padded length, pad value): one pinned copy
    host = [v + [fill] * (n - len(v)) for v, n, fill in pieces]
    dev = h2d(list(itertools.chain(*host)), torch.long, runner.device)
    ids_t, pos_t, slots_t, last_t, cu_t = dev.split([n for _, n, _ in pieces])
    cu_t = cu_t.to(torch.int32)
    runner.stats.native_prefills += 1
    if not runner.cuda_graphs:
        return runner.native.prefill(ids_t, pos_t, slots_t, cu_t, tb, last_t)[:g]
    key = GraphKey("prefill", gb, 0, tb)
    if key not in runner.graphs:  # captured over this call's inputs
        io = runner.prefill_io[key] = [ids_t, pos_t, slots_t, cu_t, last_t, None]
        runner.capture(key, prefill=lambda: runner.native.prefill(*io[:4], tb, io[4]))
    else:
        for buf, val in zip(runner.prefill_io[key][:5], (ids_t, pos_t, slots_t, cu_t, last_t)):
            buf.copy_(val)
    io = runner.prefill_io[key]
    runner.graphs[key].replay()
    return io[5][:g]


def _chunked(runner: ModelRunner, req, chunk_tokens: int) -> torch.Tensor:
    prompt, dev, mgr = req.context, runner.device, runner.cache.blocks
    table = torch.tensor(req.blocks, dtype=torch.int32, device=dev)[None]
    out = None
    for start in range(0, len(prompt), chunk_tokens):
        chunk = prompt[start: start + chunk_tokens]
        end = start + len(chunk)
        plan = StepPlan(
            q_len=len(chunk), lens_before=[start], n_new=[len(chunk)], q_idx=None,
            write_slots=mgr.slots(req.blocks, start, end).to(dev), block_table=table,
            cache_seqlens=torch.tensor([end], dtype=torch.int32, device=dev),
            seqs=[(req.blocks, end)],  # later chunks gather the stored tokens
        )
        runner.cache.use_plan(plan)
        out = runner.model(
            input_ids=torch.tensor([chunk], device=dev), position_ids=torch.arange(start, end)[None].to(dev),
            **runner.cache_kw, use_cache=True, logits_to_keep=1,
        )
        runner.stats.prefill_tokens += len(chunk)
    return out.logits[0, -1:].float()
