"""The engine's runner: device buffers, the forward of each step (native kernels or the model's), sampling.

It owns everything on the device that a step reads or writes: per slot the next input token, its position, its
block-table row and whether it is active; a history of the tokens (and logprobs) sampled since the host last read
them; the :class:`~hf_efficient.generation.sampling.BatchSampler`. A decode step is

* host: the scheduler's block-table changes written with one copy (:meth:`ModelRunner.decode`);
* device, one CUDA-graph replay (captured per :class:`GraphKey`): write slots and lengths from the positions, the
  forward for one token per slot (native fused kernels or the model's forward through ``"hf_efficient"``
  attention), sampling, and the commit of token + logprob into the history.

Prefill (:mod:`~hf_efficient.generation.prefill`) and graph capture (:class:`GraphKey`, :meth:`ModelRunner.capture`)
live beside it.

Extension point (speculative decoding): :meth:`ModelRunner.score` runs the model over ``k`` (1-16) new tokens per
active slot in one forward and returns their logits, writing their K/V; the scheduler's ``reserve(n_new=k)`` makes
room and ``rollback(req, j)`` removes rejected tokens again. A drafter proposes the tokens, a verify rule accepts a
prefix of them, and :meth:`ModelRunner.rewind` moves each slot's position back to its accepted length.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from ..cache.paged import PagedCache, StepPlan
from ..ops import precompile
from . import step_kernels
from .native import SHORT_CONTEXT, NativeDecoder
from .request import EngineStats, Request
from .sampling import BatchSampler
from .scheduler import DecodeBatch, SlotMove
from .staging import h2d

#: context-length classes of captured decode steps
CONTEXT_CLASSES = tuple(256 << 2 * i for i in range(6))


class GraphKey(NamedTuple):
    """What a captured graph was recorded for (a replay must match every field)."""

    kind: str  # "decode" or "prefill"
    batch: int  # decode: batch bucket; prefill: prompts bucket
    context: int = 0  # decode: context-length class (plans the attention's KV splits)
    tokens: int = 0  # prefill: packed-token bucket
    greedy_only: bool = False
    skip_penalty: bool = False
    candidates: int = 0


class ModelRunner:
    """Device state and forward passes of one engine. See the module docstring.

    Args:
        model: the causal LM (attention through ``"hf_efficient"`` while it runs).
        cache: the engine's paged cache (pools initialised); ``scratch`` is a zeroed block idle slots point at.
        max_batch, max_blocks: static batch and block-table width.
        sync_every: decode steps between host reads (history columns; one more for a run-ahead step).
        cuda_graphs: replay captured steps.
        stats: the engine's counters.
    """

    #: most prompts packed into one native prefill (see ``native.NATIVE_PREFILL_TOKENS``)
    native_prefill_prompts = 1

    def __init__(self, model, cache: PagedCache, *, scratch: int, max_batch: int, max_blocks: int,
                 sync_every: int, cuda_graphs: bool, stats: EngineStats):
        self.model, self.cache, self.scratch, self.stats = model, cache, scratch, stats
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, cache.block_size
        self.cuda_graphs = cuda_graphs
        param = next(model.parameters())
        self.device = dev = param.device
        mb = max_batch
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.tokens = torch.zeros(mb, dtype=torch.long, device=dev)
        self.positions = torch.zeros(mb, dtype=torch.long, device=dev)
        self.seqlens_after = torch.zeros(mb, dtype=torch.int32, device=dev)
        self.write_slots = torch.zeros(mb, dtype=torch.long, device=dev)
        self.block_table = torch.full((mb, max_blocks), scratch, dtype=torch.int32, device=dev)
        # one column per step of a window, plus one for a step queued ahead of the host's read (run_ahead)
        self.history = torch.zeros(mb, sync_every + 1, dtype=torch.long, device=dev)
        self.history_lp = torch.zeros(mb, sync_every + 1, dtype=torch.float32, device=dev)
        pin = dev.type == "cuda"
        self._history_host = torch.empty(mb * (sync_every + 1), dtype=torch.long, pin_memory=pin)
        self._history_lp_host = torch.empty(mb * (sync_every + 1), dtype=torch.float32, pin_memory=pin)
        self.hist_idx = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.hist_count = 0  # decode steps recorded in `history` since the last read (host mirror of hist_idx)
        self.active = torch.zeros(mb, dtype=torch.long, device=dev)  # 1 for slots holding a request
        # the step's slot/length inputs and its greedy sampling + commit as two kernels
        self.fused_step = step_kernels.enabled() and step_kernels.usable(dev)
        self._commit_count = torch.zeros(1, dtype=torch.int32, device=dev)  # greedy_commit's arrival counter
        self.sampler = BatchSampler(mb, self.vocab, dev)
        self.buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < mb] + [mb]
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self.prefill_io: dict[GraphKey, list] = {}  # static inputs/output of each captured prefill graph
        self._plans: dict[tuple[int, int], StepPlan] = {}  # (bucket, context class) -> the captured step's plan
        self.native: NativeDecoder | None = None
        self.native_limit = 0  # largest batch bucket decoded natively
        self.cache_kw: dict = {}  # the forward's cache argument (set by the engine)

    # ------------------------------------------------------------------ slots

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def load_slots(self, reqs: list[Request]) -> None:
        """Write the requests' device state (next input token, position, block-table row) into their slots, with
        one pinned host->device copy (no stream sync)."""
        rows = torch.full((len(reqs), 4 + self.max_blocks), self.scratch, dtype=torch.long)
        for i, req in enumerate(reqs):
            rows[i, :4] = torch.tensor([req.slot, req.output[-1] if req.output else req.prompt[-1], req.stored, 1])
            rows[i, 4: 4 + len(req.blocks)] = torch.tensor(req.blocks)
        dev = h2d(rows, torch.long, self.device)
        slot = dev[:, 0]
        self.tokens[slot] = dev[:, 1]
        self.positions[slot] = dev[:, 2]
        self.active[slot] = dev[:, 3]
        self.block_table[slot] = dev[:, 4:].to(torch.int32)

    def move_slot(self, move: SlotMove) -> None:
        """Copy the device rows of slot ``move.src`` to ``move.dst`` (slot compaction)."""
        src, dst = move
        for buf in (self.tokens, self.positions, self.block_table, self.history, self.history_lp, self.active):
            buf[dst].copy_(buf[src])
        self.sampler.move_slot(src, dst)

    def free_slot(self, slot: int) -> None:
        self.sampler.clear_slot(slot)
        self.block_table[slot].fill_(self.scratch)
        self.positions[slot] = 0
        self.active[slot] = 0

    def reset(self) -> None:
        """Every slot free and the history empty (after an error, or to start over)."""
        for slot in range(self.max_batch):
            if self.sampler.slot_params[slot] is not None:
                self.sampler.clear_slot(slot)
        self.block_table.fill_(self.scratch)
        self.positions.zero_()
        self.active.zero_()
        self.hist_idx.zero_()
        self.hist_count = 0

    def rewind(self, slots: list[int], positions: list[int]) -> None:
        """Set the slots' positions (next write position) after a rollback of rejected tokens."""
        idx = h2d([slots, positions], torch.long, self.device)
        self.positions[idx[0]] = idx[1]

    # ------------------------------------------------------------------ first tokens

    def first_tokens(self, reqs: list[Request], rows: list[int], logits: torch.Tensor) -> tuple[list, list]:
        """Give the sampler each new request's parameters and draw its first token from ``logits[rows[i]]``."""
        slots = []
        for req in reqs:
            req.sample_index = 0 if req.sample_index < 0 else req.sample_index
            self.sampler.set_slot(req.slot, req.params, req.context, sample_index=req.sample_index,
                                  seed_offset=req.seed_offset)
            slots.append(req.slot)
        idx = h2d([slots, rows], torch.long, self.device)
        tok, lp = self.sampler.sample(logits.index_select(0, idx[1]), slots=idx[0], logprobs="raw",
                                      **self.sampler.static_flags(slots))
        return tok.tolist(), lp.tolist()

    # ------------------------------------------------------------------ decode

    def native_step(self, b: int) -> bool:
        """Batch bucket ``b`` decodes through the native kernels (else the model's forward)."""
        return self.native is not None and b <= self.native_limit

    def context_class(self, b: int, longest: int) -> int:
        """Decode steps are captured per context-length class (the longest active context rounded up to a power
        of four from 256): the attention kernel's KV-split plan depends on it. Native steps run unsplit up to
        ``SHORT_CONTEXT`` keys, so for them the classes below it are one."""
        if self.native_step(b):
            longest = max(longest, SHORT_CONTEXT)
        return next((c for c in CONTEXT_CLASSES if c >= longest), self.max_blocks * self.block_size)

    def decode(self, step: DecodeBatch, seqs: list[tuple[list[int], int]]) -> None:
        """One decode step over slots ``0 .. step.size-1``; ``seqs`` (blocks, stored) per slot serve the eager path's
        gathers on CPU."""
        if step.updates:
            sl, col, blk = h2d(list(zip(*step.updates)), torch.long, self.device).unbind(0)
            self.block_table[sl, col] = blk.to(torch.int32)
        b = self.bucket(step.size)
        flags = self.sampler.static_flags(b)
        key = GraphKey("decode", b, self.context_class(b, step.longest), 0, flags["greedy_only"],
                       flags["skip_penalty"], flags["candidates"])
        if self.cuda_graphs:
            graph = self.graphs.get(key) or self.capture(key)
            graph.replay()
        else:
            pad = [([self.scratch], 1)] * (b - len(seqs))
            self._body(key, self._static_plan(b, key.context, seqs + pad))
        self.hist_count += 1
        self.stats.decode_steps += 1

    def _static_plan(self, b: int, context: int | None, seqs=None) -> StepPlan:
        return StepPlan(
            q_len=1, lens_before=[1] * b, n_new=[1] * b, q_idx=None,
            write_slots=self.write_slots[:b], block_table=self.block_table[:b], cache_seqlens=self.seqlens_after[:b],
            max_seqlen=context, seqs=seqs,
        )

    def _step_inputs(self, b: int) -> torch.Tensor:
        """This step's K/V write slots and lengths after it, from the positions (device ops). Returns positions."""
        pos = self.positions[:b]
        fn = step_kernels.step_inputs if self.fused_step else step_kernels.step_inputs_reference
        fn(pos, self.block_table[:b], self.block_size, self.seqlens_after[:b], self.write_slots[:b])
        return pos

    def _native_logits(self, b: int, context: int) -> torch.Tensor:
        pos = self._step_inputs(b)
        return self.native.forward(
            self.tokens[:b], pos, self.write_slots[:b], self.seqlens_after[:b], self.block_table[:b], context
        )

    def _body(self, key: GraphKey, plan: StepPlan) -> None:
        b = key.batch
        if self.native_step(b):
            logits = self._native_logits(b, key.context)
        else:
            pos = self._step_inputs(b)
            self.cache.use_plan(plan)
            out = self.model(input_ids=self.tokens[:b, None], position_ids=pos[:, None], **self.cache_kw,
                             use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1]
        commit = step_kernels.StepCommit(self.tokens[:b], self.positions[:b], self.active[:b], self.history[:b],
                                         self.history_lp[:b], self.hist_idx, self._commit_count)
        self.sampler.sample_commit(logits, commit, greedy_only=key.greedy_only, skip_penalty=key.skip_penalty,
                                   candidates=key.candidates, fused=self.fused_step)

    def score(self, tokens: torch.Tensor, seqs: list[tuple[list[int], int]]) -> torch.Tensor:
        """Logits of ``k`` new tokens per sequence in one forward (the verify step of speculative decoding).

        Args:
            tokens: ``(n, k)`` int64 token ids, one row per sequence (``1 <= k <= 16``).
            seqs: ``(blocks, stored)`` per sequence after ``Scheduler.reserve(k)``: the ``k`` new tokens are the
                last ``k`` of ``stored``.

        Returns ``(n, k, vocab)`` logits; the new tokens' K/V are in the cache (``Scheduler.rollback`` removes
        rejected ones). Runs the model's forward eagerly.
        """
        n, k = tokens.shape
        if not 1 <= k <= 16:
            raise ValueError(f"score takes 1 to 16 tokens per sequence, got {k}")
        if len(seqs) != n:
            raise ValueError(f"score got {n} rows of tokens but {len(seqs)} sequences")
        mgr, dev = self.cache.blocks, self.device
        start = [stored - k for _, stored in seqs]
        slots = torch.cat([mgr.slots(blocks, s, s + k) for (blocks, _), s in zip(seqs, start)])
        table = torch.full((n, self.max_blocks), self.scratch, dtype=torch.int32)
        for i, (blocks, _) in enumerate(seqs):
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        plan = StepPlan(q_len=k, lens_before=start, n_new=[k] * n, q_idx=None, write_slots=slots.to(dev),
                        block_table=table.to(dev),
                        cache_seqlens=torch.tensor([n_ for _, n_ in seqs], dtype=torch.int32, device=dev),
                        seqs=[(list(blocks), stored) for blocks, stored in seqs])
        self.cache.use_plan(plan)
        pos = torch.tensor(start)[:, None] + torch.arange(k)
        out = self.model(input_ids=tokens.to(dev), position_ids=pos.to(dev), **self.cache_kw, use_cache=True)
        return out.logits

    # ------------------------------------------------------------------ capture

    def capture(self, key: GraphKey, prefill=None) -> torch.cuda.CUDAGraph:
        """Warm up and capture the step ``key`` (``prefill``: the prefill's callable for a prefill key)."""
        if key.kind == "prefill":
            io = self.prefill_io[key]
            # the warm-up and the capture write the same K/V the replay writes again (this call's prompts)
            graph, io[5] = self._record(key, prefill, warmups=1, dry=prefill)
            return graph
        b = key.batch
        plan = self._plans.setdefault((b, key.context), self._static_plan(b, key.context))
        saved = self._save_state(b)
        graph, _ = self._record(key, lambda: self._body(key, plan), warmups=2,
                                after=lambda: self._restore_state(b, saved),
                                dry=(lambda: self._native_logits(b, key.context)) if self.native_step(b) else None)
        return graph

    def _record(self, key: GraphKey, run, warmups: int, after=None, dry=None):
        """Warm ``run`` up on a side stream (Triton compiles and autotunes, JIT builds happen outside the graph),
        then capture it; ``after`` runs after each warm-up and after the capture. Returns (graph, run's output).

        ``dry``: a pass over the same kernels that may run on unwritten data (no sampling, no index taken from a
        kernel's output); when compiling ahead is on it runs first inside ``precompile.compiling_ahead``, so the
        kernels it needs compile in parallel instead of one after the other in the warm-up."""
        start = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            if dry is not None:
                with precompile.compiling_ahead() as ahead:
                    if ahead:
                        dry()
            for _ in range(warmups):
                run()
                if after is not None:
                    after()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        if after is not None:
            after()
        self.graphs[key] = graph
        self.stats.graph_capture_s += time.perf_counter() - start
        self.stats.graph_buckets.append(key)
        return graph, out

    def _save_state(self, b: int):
        return (self.tokens[:b].clone(), self.positions[:b].clone(), self.hist_idx.clone(), self.sampler.save_state())

    def _restore_state(self, b: int, saved) -> None:
        tokens, positions, hist, sampler_state = saved
        self.tokens[:b].copy_(tokens)
        self.positions[:b].copy_(positions)
        self.hist_idx.copy_(hist)
        self.sampler.restore_state(sampler_state)

    # ------------------------------------------------------------------ read-back

    def read_history(self, n: int, queue_ahead=None) -> tuple[list[list[int]], list[list[float]]]:
        """Tokens and logprobs of slots ``0 .. n-1`` recorded since the last read (one row per slot).

        ``queue_ahead``: queue one more decode step first (its tokens stay on the device for the next read) and
        read the window through a pinned copy queued before it, so the GPU works while the host reads."""
        steps = self.hist_count
        if queue_ahead is None:
            toks = self.history[:n, :steps].tolist()
            lps = self.history_lp[:n, :steps].tolist()
            self.hist_idx.zero_()
            self.hist_count = 0
            return toks, lps
        cuda = self.device.type == "cuda"
        tok_host = self._history_host[: n * steps].view(n, steps)
        lp_host = self._history_lp_host[: n * steps].view(n, steps)
        tok_host.copy_(self.history[:n, :steps], non_blocking=cuda)
        lp_host.copy_(self.history_lp[:n, :steps], non_blocking=cuda)
        event = torch.cuda.Event() if cuda else None
        if cuda:
            event.record(torch.cuda.current_stream(self.device))
        queue_ahead()  # tokens land in column `steps`
        self.stats.run_ahead_steps += 1
        self.history[:, 0].copy_(self.history[:, steps])
        self.history_lp[:, 0].copy_(self.history_lp[:, steps])
        self.hist_idx.fill_(1)
        self.hist_count = 1
        if cuda:
            event.synchronize()
        return tok_host.tolist(), lp_host.tolist()
