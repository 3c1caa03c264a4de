"""The decode engine: continuous batching over a PagedCache, decode steps replayed from CUDA graphs.

One engine serves one model. Requests get a *slot* (a row of the static decode batch); slots are kept compact
(``0 .. active-1``) so a decode step runs the smallest captured batch bucket that covers them. Per step:

* host: make sure every active slot has a block for its next token (allocate at block boundaries, copy a shared
  partial block before writing into it), write the few changed block-table entries;
* device (one CUDA-graph replay): compute write slots, run the model's forward for one token per slot (attention
  through ``"hf_efficient"``, which writes K/V into the pages and runs the paged decode kernel), sample on the GPU,
  record the token and its logprob in a history buffer;
* every ``sync_every`` steps the host reads the history once, finishes requests (eos, stop ids/strings, max tokens),
  compacts the slots and admits waiting requests (prefill runs eagerly, packed variable-length).

The engine uses the model's live parameters: captured graphs read the parameter tensors in place, so an optimizer
step (in-place updates, as torch optimizers do) is seen by the next generation. Replacing parameter tensors (e.g.
``load_state_dict(assign=True)``) needs :meth:`DecodeEngine.reset_graphs`.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..cache.allocator import CacheFullError
from ..cache.paged import PagedCache, StepPlan
from ..ops import precompile
from . import step_kernels
from .native import AUTO_MAX_HIDDEN, NATIVE_PREFILL_TOKENS, SHORT_CONTEXT, NativeDecoder
from .native import auto_choice as native_auto_choice
from .native import structure_key as native_structure_key
from .native import unsupported_reason as native_unsupported_reason
from .sampling import BatchSampler, SamplingParams, StopStringMatcher, h2d

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """One generation request (one sample; ``n`` samples of a prompt are ``n`` requests sharing a group)."""

    rid: int
    prompt: list[int]
    params: SamplingParams
    group: int = -1  # requests of one prompt share its prompt blocks
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    slot: int = -1
    blocks: list[int] = field(default_factory=list)
    stored: int = 0  # tokens whose K/V are in the cache
    preemptions: int = 0
    seed_offset: int = 0
    sample_index: int = -1
    hist_from: int = 0  # first history column holding this request's tokens (it joined after a run-ahead step)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def context(self) -> list[int]:
        """Tokens to prefill: the prompt, plus the output so far for a preempted request."""
        return self.prompt + self.output


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    native_prefills: int = 0  # prefills run through the native kernels (the rest: the model's forward)
    run_ahead_steps: int = 0  # steps queued before the host read the tokens of the steps before them
    graph_capture_s: float = 0.0
    graph_buckets: list[int] = field(default_factory=list)
    eager_reason: str | None = None
    native_reason: str | None = None  # why decode steps run the model's forward (None: native fused kernels)
    native_max_batch: int = 0  # largest batch bucket decoded natively (0: none; larger ones run the model's forward)


#: context-length classes of captured native decode steps
_CONTEXT_CLASSES = tuple(256 << 2 * i for i in range(6))
#: token buckets of captured native prefills (padded up to the next one)
_PREFILL_BUCKETS = tuple(16 << i for i in range(16) if 16 << i < NATIVE_PREFILL_TOKENS) + (NATIVE_PREFILL_TOKENS,)


def _model_dims(model) -> tuple[int, int, int]:
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, dim


class DecodeEngine:
    """Continuous-batching generation on a paged cache with CUDA-graph decode steps.

    Args:
        model: a transformers causal LM whose attention dispatches through ``AttentionInterface`` (Llama, Mistral,
            Qwen2/3, Gemma2, ...); it is switched to ``attn_implementation="hf_efficient"`` while the engine runs.
        max_batch: most sequences decoded together (static batch of the captured graphs).
        max_tokens: KV-cache capacity in tokens (default: on CUDA 40% of free memory, on CPU 64k tokens).
        block_size: tokens per cache block.
        cuda_graphs: capture decode steps (default: when the model is on CUDA).
        sync_every: decode steps between host reads of the generated tokens.
        run_ahead: at a host read, first queue the next decode step when it cannot overrun any request's limits,
            so the GPU keeps working while the host reads and processes the tokens (a request that stopped on an
            end-of-sequence token then computes one discarded step).
        prefill_tokens: most prompt tokens prefilled in one forward.
        native: decode steps through the engine's fused kernels (:mod:`~hf_efficient.generation.native`) rather
            than the model's forward: ``None`` (default) when the model is supported, at batch buckets up to
            ``native_max_batch`` when it is small enough for the kernels to win there (hidden size <=
            ``native.AUTO_MAX_HIDDEN``), for larger models at the batches the one-row projection kernels serve
            (``ops.decode_linear.gemv_max_m()``: 1 and 2 by default); ``True`` requires it (a ``ValueError``
            says why not), ``False`` always runs the model's forward. A prompt admitted alone is prefilled natively
            whenever native steps run.
        native_max_batch: largest batch bucket decoded natively (larger buckets run the model's forward, where
            cuBLAS GEMMs beat the fused small-batch kernels).
        fused_layers: run the model's forward (prefill, and decode steps not served natively) with the
            ``"fused_layers"`` patch applied for the engine's duration (fused RMSNorm, rotary, SwiGLU; see
            :mod:`hf_efficient.patches.fused_layers`). Default: on CUDA. The patch is process-wide while applied.
    """

    def __init__(
        self,
        model,
        max_batch: int = 64,
        max_tokens: int | None = None,
        block_size: int = 16,
        cuda_graphs: bool | None = None,
        sync_every: int = 8,
        prefill_tokens: int = 16384,
        native: bool | None = None,
        native_max_batch: int = 16,
        fused_layers: bool | None = None,
        run_ahead: bool = True,
        tokenizer=None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.model = model
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_batch, self.block_size, self.sync_every = max_batch, block_size, sync_every
        self.run_ahead = run_ahead
        self.prefill_tokens = prefill_tokens
        layers, kv_heads, head_dim = _model_dims(model)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        token_bytes = layers * 2 * kv_heads * head_dim * param.element_size()
        if max_tokens is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                max_tokens = int(0.4 * free / token_bytes)
            else:
                max_tokens = 65536
        num_blocks = math.ceil(max_tokens / block_size) + 1  # +1: scratch block for idle slots
        self.cache = PagedCache(model.config, num_blocks=num_blocks, block_size=block_size)
        dummy = torch.empty(1, kv_heads, 1, head_dim, dtype=self.dtype, device=self.device)
        for layer in self.cache.layers:
            layer.lazy_initialization(dummy, dummy)
        # Idle slots of a batch bucket write to and read from a zeroed scratch block (finite garbage, never NaN).
        (self.scratch,) = self.cache.allocator.allocate(1)
        for layer in self.cache.layers:
            layer.k_pool[self.scratch].zero_()
            layer.v_pool[self.scratch].zero_()
        self.cache.external_plan = True
        self.max_blocks = math.ceil(max_tokens / block_size) + 1

        dev, mb = self.device, max_batch
        self.tokens = torch.zeros(mb, dtype=torch.long, device=dev)
        self.positions = torch.zeros(mb, dtype=torch.long, device=dev)
        self.seqlens_after = torch.zeros(mb, dtype=torch.int32, device=dev)
        self.write_slots = torch.zeros(mb, dtype=torch.long, device=dev)
        self.block_table = torch.full((mb, self.max_blocks), self.scratch, dtype=torch.int32, device=dev)
        # one column per step of a window, plus one for a step queued ahead of the host's read (run_ahead)
        self.history = torch.zeros(mb, sync_every + 1, dtype=torch.long, device=dev)
        self.history_lp = torch.zeros(mb, sync_every + 1, dtype=torch.float32, device=dev)
        pin = dev.type == "cuda"
        self._history_host = torch.empty(mb * (sync_every + 1), dtype=torch.long, pin_memory=pin)
        self._history_lp_host = torch.empty(mb * (sync_every + 1), dtype=torch.float32, pin_memory=pin)
        self.hist_idx = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.active = torch.zeros(mb, dtype=torch.long, device=dev)  # 1 for slots holding a request
        # the step's slot/length inputs and its greedy sampling + commit as two kernels (HF_EFFICIENT_FUSED_STEP=0: off)
        self.fused_step = step_kernels.enabled() and step_kernels.usable(dev)
        self._commit_count = torch.zeros(1, dtype=torch.int32, device=dev)  # greedy_commit's arrival counter
        self._hist_count = 0  # decode steps recorded in `history` since the last sync (host mirror of hist_idx)
        self.sampler = BatchSampler(mb, self.vocab, dev)

        self.stats = EngineStats()
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.cuda_graphs = cuda_graphs
        if not cuda_graphs:
            self.stats.eager_reason = "model is not on CUDA" if self.device.type != "cuda" else "disabled"
        self.buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < max_batch] + [max_batch]
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._prefill_io: dict[tuple, list] = {}  # static inputs/output of each captured prefill graph
        self._plans: dict[tuple, StepPlan] = {}  # (bucket, context class) -> the captured step's plan
        self._active: list[Request] = []  # slot i holds _active[i]
        self._next_rid = 0
        # transformers >= 5.24 names the forward's cache argument `cache` (`past_key_values` is deprecated)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs on
        forward_args = inspect.signature(inner.forward).parameters
        self._cache_kw = {"cache" if "cache" in forward_args else "past_key_values": self.cache}
        if native not in (None, True, False):
            raise ValueError(f"native must be None, True or False, got {native!r}")
        self.native_request, self.native_max_batch = native, native_max_batch
        if fused_layers is None:
            fused_layers = self.device.type == "cuda"
        self.fused_layers = bool(fused_layers)
        self._native: NativeDecoder | None = None
        self._native_check()

    def _native_check(self) -> None:
        """(Re)decide the native decode path: the model may have gained adapters or hooks since the last call."""
        key = native_structure_key(self.model)
        if key == self._checked:
            return
        self._native_limit = self.native_max_batch
        if self.native_request is False:
            reason = "disabled (native=False)"
        else:
            reason = native_unsupported_reason(self.model)
            if reason is None and self.native_request is None:
                cap, reason = native_auto_choice(self.model)
                if cap is not None and reason is None:
                    self._native_limit = min(cap, self.native_max_batch)
                    logger.info("native decode steps up to batch %d (hidden size > %d); larger batches run the "
                                "model's forward", self._native_limit, AUTO_MAX_HIDDEN)
            elif reason is not None and self.native_request:
                raise ValueError(f"native=True, but the native decode step cannot serve this model: {reason}")
        if (reason is None) != (self._native is not None):  # switching paths: graphs captured the other one
            self._native = NativeDecoder(self.model, self.cache) if reason is None else None
            self._graphs.clear()
        if reason is not None and reason != self.stats.native_reason and self.native_request is not False:
            logger.info("decode steps run the model's forward: %s", reason)
        self.stats.native_reason = reason
        self.stats.native_max_batch = self._native_limit if reason is None else 0
        self._checked = key

    _checked: tuple | None = None

    # ------------------------------------------------------------------ public API

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], progress=None, on_update=None,
        tokenizer=None,
    ):
        """Generate for every prompt; returns one list of :class:`Request` (``n`` per prompt) per prompt.

        ``progress``: a tqdm-like object updated with finished requests. ``on_update(requests)``: called after every
        host sync with the requests that received tokens (for streaming). ``tokenizer``: for stop strings in this call
        (default: the engine's).
        """
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        waiting: deque[list[Request]] = deque()
        groups: list[list[Request]] = []
        for g, (prompt, p) in enumerate(zip(prompts, params)):
            self._check_prompt(prompt, p)
            reqs = []
            for _ in range(p.n):
                reqs.append(Request(self._next_rid, list(prompt), p, group=g))
                self._next_rid += 1
            groups.append(reqs)
            waiting.append(reqs)
        self._on_update = on_update
        self._call_tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        self._native_check()
        try:
            with _attention(self.model), self._fused_patch():
                self._run(waiting, progress)
        finally:
            self._on_update = None
            self._call_tokenizer = self.tokenizer
        return groups

    _on_update = None
    _call_tokenizer = None

    def _fused_patch(self):
        from .. import patches

        if self.fused_layers and "fused_layers" in patches.available():
            return patches.applied("fused_layers")
        return contextlib.nullcontext()

    def reset_graphs(self) -> None:
        """Drop captured graphs (after parameters were replaced rather than updated in place)."""
        self._graphs.clear()

    # ------------------------------------------------------------------ checks

    def _check_prompt(self, prompt, p: SamplingParams) -> None:
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        if any((not isinstance(t, int)) or t < 0 or t >= self.vocab for t in prompt):
            raise ValueError(f"prompt token ids must be ints in [0, {self.vocab})")
        need = math.ceil((len(prompt) + p.max_tokens) / self.block_size)
        if need > self.max_blocks - 1:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens plus max_tokens={p.max_tokens} needs {need} cache blocks, but "
                f"the engine's cache holds {self.max_blocks - 1}; raise max_tokens of the engine"
            )
        if p.n > self.max_batch:
            raise ValueError(f"n={p.n} samples exceed the engine's max_batch={self.max_batch}")

    # ------------------------------------------------------------------ main loop

    def _run(self, waiting: deque, progress) -> None:
        while waiting or self._active:
            self._admit(waiting)
            finished = self._retire_finished()  # requests finished by their first token
            if progress is not None and finished:
                progress.update(finished)
            if not self._active:
                if waiting:
                    raise CacheFullError(
                        math.ceil(len(waiting[0][0].context) / self.block_size), self.cache.allocator.num_free,
                        self.block_size, "a waiting request does not fit even in an empty cache",
                    )
                break
            steps = self._steps_until_sync()
            for _ in range(steps):
                self._decode_step(waiting)
            finished = self._sync(ahead=self._can_run_ahead())
            if progress is not None and finished:
                progress.update(finished)

    def _in_flight(self, req: Request) -> int:
        """Tokens of ``req`` decoded on the device but not yet read by the host."""
        return self._hist_count - req.hist_from

    def _steps_until_sync(self) -> int:
        left = min(r.params.max_tokens - len(r.output) - self._in_flight(r) for r in self._active)
        return max(0 if self._hist_count else 1, min(self.sync_every - self._hist_count, left))

    def _can_run_ahead(self) -> bool:
        """Queue one more step before reading the finished window, so the GPU is busy while the host reads and
        processes it (instead of idling through every sync). Only when that step cannot overrun: every request
        still needs a token after the window, and the free blocks cover it without preempting."""
        return (
            self.run_ahead and self.sync_every >= 2 and bool(self._active)
            and self.cache.allocator.num_free >= len(self._active)
            and all(r.params.max_tokens - len(r.output) - self._in_flight(r) >= 1 for r in self._active)
        )

    # ------------------------------------------------------------------ admission / prefill

    def _admit(self, waiting: deque) -> None:
        batch: list[list[Request]] = []
        tokens = 0
        free_slots = self.max_batch - len(self._active)
        free_blocks = self.cache.allocator.num_free
        while waiting:
            group = waiting[0]
            n_tok = len(group[0].context)
            need_blocks = math.ceil((n_tok + 1) / self.block_size) + len(group)  # prompt once + a block per sample
            if len(group) > free_slots or need_blocks > free_blocks:
                break
            if batch and tokens + n_tok > self.prefill_tokens:
                break
            waiting.popleft()
            batch.append(group)
            tokens += n_tok
            free_slots -= len(group)
            free_blocks -= need_blocks
        if batch:
            self._prefill(batch)

    def _prefill(self, groups: list[list[Request]]) -> None:
        """Packed prefill of the groups' prompts (each stored once), then fork samples into slots.

        A prompt longer than ``prefill_tokens`` (always admitted alone) is prefilled in chunks of that size, each
        chunk attending to the cached tokens before it and to itself (causal)."""
        if len(groups) == 1 and len(groups[0][0].context) > self.prefill_tokens:
            return self._prefill_chunked(groups[0])
        bs = self.block_size
        ids, pos, slots, last = [], [], [], []
        for group in groups:
            prompt = group[0].context
            blocks = self.cache.allocator.allocate(math.ceil(len(prompt) / bs))
            p = torch.arange(len(prompt))
            slots.append(torch.tensor(blocks)[p // bs] * bs + p % bs)
            ids.extend(prompt)
            pos.append(p)
            last.append(len(ids) - 1)
            self._give_blocks(group, blocks)
        dev = self.device
        slots_t = torch.cat(slots)
        self.stats.prefill_tokens += len(ids)
        if self._native is not None and len(groups) <= self.native_prefill_prompts and len(ids) <= NATIVE_PREFILL_TOKENS:
            logits = self._native_prefill(ids, torch.cat(pos), slots_t, last, [len(g[0].context) for g in groups])
            return self._first_tokens(groups, logits.float())
        plan = StepPlan(
            q_len=len(ids), lens_before=[0], n_new=[len(ids)], q_idx=None,
            write_slots=slots_t.to(dev),
            block_table=self.block_table[:1], cache_seqlens=self.seqlens_after[:1],
        )
        self.cache.plan = plan
        out = self.model(
            input_ids=torch.tensor([ids], device=dev),
            position_ids=torch.cat(pos)[None].to(dev),
            **self._cache_kw,
            use_cache=True,
            logits_to_keep=torch.tensor(last, device=dev),
        )
        self._first_tokens(groups, out.logits[0].float())

    def _native_prefill(self, ids, pos, slots, last, lens) -> torch.Tensor:
        """Packed prompts through the native kernels; with CUDA graphs, replayed from a graph per (tokens, prompts)
        bucket: a short prefill is bound by launches, ~8 per layer. Padding tokens write to the scratch block and
        belong to no prompt (empty sequences pad the offsets). Returns logits (prompts, vocab)."""
        t, g = len(ids), len(lens)
        # eager calls pad the same way, so that both run the same kernel configurations (bitwise-equal results)
        tb, gb = next(b for b in _PREFILL_BUCKETS if b >= t), self._bucket(g)
        cu = list(itertools.accumulate(lens, initial=0))
        pieces = [(ids, tb, 0), (pos.tolist(), tb, 0), (slots.tolist(), tb, self.scratch * self.block_size),
                  (last, gb, 0), (cu, gb + 1, cu[-1])]  # (values, padded length, pad value): one pinned copy
        host = [v + [fill] * (n - len(v)) for v, n, fill in pieces]
        dev = h2d(list(itertools.chain(*host)), torch.long, self.device)
        ids_t, pos_t, slots_t, last_t, cu_t = dev.split([n for _, n, _ in pieces])
        cu_t = cu_t.to(torch.int32)
        self.stats.native_prefills += 1
        if not self.cuda_graphs:
            return self._native.prefill(ids_t, pos_t, slots_t, cu_t, tb, last_t)[:g]
        key = ("prefill", tb, gb)
        if key not in self._graphs:  # captured over this call's inputs
            self._prefill_io[key] = [ids_t, pos_t, slots_t, cu_t, last_t, None]
            self._capture(key)
        else:
            for buf, val in zip(self._prefill_io[key][:5], (ids_t, pos_t, slots_t, cu_t, last_t)):
                buf.copy_(val)
        io = self._prefill_io[key]
        self._graphs[key].replay()
        return io[5][:g]

    #: most prompts packed into one native prefill (see ``native.NATIVE_PREFILL_TOKENS``)
    native_prefill_prompts = 1

    def _prefill_chunked(self, group: list[Request]) -> None:
        prompt, bs, dev = group[0].context, self.block_size, self.device
        blocks = self.cache.allocator.allocate(math.ceil(len(prompt) / bs))
        table = torch.tensor(blocks, dtype=torch.int32, device=dev)[None]
        block_ids = torch.tensor(blocks)
        saved = self.cache.seq_blocks, self.cache.seq_lens
        for start in range(0, len(prompt), self.prefill_tokens):
            chunk = prompt[start: start + self.prefill_tokens]
            end = start + len(chunk)
            p = torch.arange(start, end)
            plan = StepPlan(
                q_len=len(chunk), lens_before=[start], n_new=[len(chunk)], q_idx=None,
                write_slots=(block_ids[p // bs] * bs + p % bs).to(dev), block_table=table,
                cache_seqlens=torch.tensor([end], dtype=torch.int32, device=dev),
            )
            # later chunks gather the stored tokens by the cache's host bookkeeping
            self.cache.seq_blocks, self.cache.seq_lens = [blocks], [end]
            self.cache.plan = plan
            out = self.model(
                input_ids=torch.tensor([chunk], device=dev), position_ids=p[None].to(dev), **self._cache_kw,
                use_cache=True, logits_to_keep=1,
            )
            self.stats.prefill_tokens += len(chunk)
        self.cache.seq_blocks, self.cache.seq_lens = saved
        self._give_blocks(group, blocks)
        self._first_tokens([group], out.logits[0, -1:].float())

    def _give_blocks(self, group: list[Request], blocks: list[int]) -> None:
        """Every sample of a group holds the prompt's blocks (one reference each)."""
        for i, req in enumerate(group):
            if i:
                self.cache.allocator.incref(blocks)
            req.blocks, req.stored = list(blocks), len(req.context)

    def _first_tokens(self, groups: list[list[Request]], logits: torch.Tensor) -> None:
        """Assign slots to the prefilled groups' samples and draw each sample's first token from ``logits``
        (one row per group)."""
        dev = self.device
        rows, new_slots = [], []
        for g, group in enumerate(groups):
            for i, req in enumerate(group):
                req.slot = len(self._active)
                req.hist_from = self._hist_count  # columns recorded before it joined are not its tokens
                self._active.append(req)
                req.sample_index = i if req.sample_index < 0 else req.sample_index
                self.sampler.set_slot(
                    req.slot, req.params, req.context, sample_index=req.sample_index, seed_offset=req.seed_offset
                )
                rows.append(g)
                new_slots.append(req.slot)
        idx = h2d([new_slots, rows], torch.long, dev)
        tok, lp = self.sampler.sample(logits.index_select(0, idx[1]), slots=idx[0], logprobs="raw",
                                      **self.sampler.static_flags(new_slots))
        tok_host, lp_host = tok.tolist(), lp.tolist()
        reqs = [r for grp in groups for r in grp]
        for req, t, p in zip(reqs, tok_host, lp_host):
            req.output.append(t)
            req.logprobs.append(p)
            self._check_finished(req)
        self._load_slots(reqs)
        self.stats.generated_tokens += len(tok_host)

    def _load_slots(self, reqs: list[Request]) -> None:
        """Write the requests' device state (next input token, position, block table row) into their slots, with
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

    # ------------------------------------------------------------------ decode

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _static_plan(self, b: int, context: int | None = None) -> StepPlan:
        return StepPlan(
            q_len=1, lens_before=[1] * b, n_new=[1] * b, q_idx=None,
            write_slots=self.write_slots[:b], block_table=self.block_table[:b], cache_seqlens=self.seqlens_after[:b],
            max_seqlen=context,
        )

    def _reserve(self, waiting: deque) -> None:
        """Host side of a step: room for every active slot's next token (allocate, copy-on-write).

        When the free blocks do not cover the step, the newest requests are preempted (requeued) first.
        """
        bs, alloc = self.block_size, self.cache.allocator
        while True:
            need, refs = 0, {}
            for req in self._active:
                if req.stored % bs == 0:
                    need += 1
                else:
                    blk = req.blocks[req.stored // bs]
                    refs.setdefault(blk, alloc.refcount(blk))
                    if refs[blk] > 1:
                        need += 1
                        refs[blk] -= 1
            if need <= alloc.num_free:
                break
            self._preempt(waiting)
        updates = []
        for req in self._active:
            col = req.stored // bs
            if req.stored % bs == 0:
                (blk,) = alloc.allocate(1)
                req.blocks.append(blk)
                updates.append((req.slot, col, blk))
            elif alloc.refcount(req.blocks[col]) > 1:
                (blk,) = alloc.allocate(1)
                old = req.blocks[col]
                for layer in self.cache.layers:
                    layer.k_pool[blk].copy_(layer.k_pool[old])
                    layer.v_pool[blk].copy_(layer.v_pool[old])
                alloc.release([old])
                req.blocks[col] = blk
                updates.append((req.slot, col, blk))
            req.stored += 1
        if updates:
            sl, col, blk = h2d(list(zip(*updates)), torch.long, self.device).unbind(0)
            self.block_table[sl, col] = blk.to(torch.int32)

    def _preempt(self, waiting: deque) -> None:
        """Out of blocks: push the newest request back to the queue (its tokens so far become its prompt)."""
        self._sync()
        if len(self._active) <= 1:
            raise CacheFullError(1, self.cache.allocator.num_free, self.block_size,
                                 "a single request does not fit in the cache")
        victim = self._active[-1]
        self._retire(victim)
        victim.seed_offset = len(victim.output)  # its sampler stream continues where it stopped
        victim.preemptions += 1
        self.stats.preemptions += 1
        waiting.appendleft([victim])

    def _decode_step(self, waiting: deque) -> None:
        self._reserve(waiting)
        n = len(self._active)
        b = self._bucket(n)
        flags = self.sampler.static_flags(b)
        key = (b, flags["greedy_only"], flags["skip_penalty"], flags["candidates"], self._context_class(b))
        if self.cuda_graphs:
            graph = self._graphs.get(key) or self._capture(key)
            graph.replay()
        else:
            self._eager_step(key)
        self._hist_count += 1
        self.stats.decode_steps += 1

    def _context_class(self, b: int) -> int:
        """Decode steps are captured per context-length class (the longest active context rounded up to a power
        of four from 256): the attention kernel's KV-split plan depends on it. Native steps run unsplit up to
        ``SHORT_CONTEXT`` keys, so for them the classes below it are one."""
        longest = max(r.stored for r in self._active)
        if self._native_step(b):
            longest = max(longest, SHORT_CONTEXT)
        return next((c for c in _CONTEXT_CLASSES if c >= longest), self.max_blocks * self.block_size)

    def _eager_step(self, key) -> None:
        b = key[0]
        plan = self._static_plan(b, key[-1])
        # The eager (CPU) attention path gathers by host bookkeeping: give it this step's sequences.
        self.cache.seq_blocks = [r.blocks for r in self._active] + [[self.scratch]] * (b - len(self._active))
        self.cache.seq_lens = [r.stored for r in self._active] + [1] * (b - len(self._active))
        self._body(key, plan)

    def _native_step(self, b: int) -> bool:
        """Batch bucket ``b`` decodes through the native kernels (else the model's forward)."""
        return self._native is not None and b <= self._native_limit

    def _step_inputs(self, b: int) -> torch.Tensor:
        """This step's K/V write slots and lengths after it, from the positions (device ops). Returns positions."""
        pos = self.positions[:b]
        fn = step_kernels.step_inputs if self.fused_step else step_kernels.step_inputs_reference
        fn(pos, self.block_table[:b], self.block_size, self.seqlens_after[:b], self.write_slots[:b])
        return pos

    def _native_logits(self, b: int, context: int) -> torch.Tensor:
        pos = self._step_inputs(b)
        return self._native.forward(
            self.tokens[:b], pos, self.write_slots[:b], self.seqlens_after[:b], self.block_table[:b], context
        )

    def _body(self, key, plan: StepPlan) -> None:
        b, greedy_only, skip_penalty, candidates, context = key
        if self._native_step(b):
            logits = self._native_logits(b, context)
        else:
            pos = self._step_inputs(b)
            self.cache.plan = plan
            out = self.model(
                input_ids=self.tokens[:b, None], position_ids=pos[:, None], **self._cache_kw,
                use_cache=True, logits_to_keep=1,
            )
            logits = out.logits[:, -1]
        commit = step_kernels.StepCommit(self.tokens[:b], self.positions[:b], self.active[:b], self.history[:b],
                                         self.history_lp[:b], self.hist_idx, self._commit_count)
        self.sampler.sample_commit(logits, commit, greedy_only=greedy_only, skip_penalty=skip_penalty,
                                   candidates=candidates, fused=self.fused_step)

    def _capture(self, key) -> torch.cuda.CUDAGraph:
        if key[0] == "prefill":
            io = self._prefill_io[key]
            # the warm-up and the capture write the same K/V the replay writes again (this call's prompts)
            prefill = lambda: self._native.prefill(*io[:4], key[1], io[4])  # noqa: E731
            graph, io[5] = self._record(key, prefill, warmups=1, dry=prefill)
            return graph
        b = key[0]
        plan = self._plans.setdefault((b, key[-1]), self._static_plan(b, key[-1]))
        saved = self._save_state(b)
        graph, _ = self._record(key, lambda: self._body(key, plan), warmups=2,
                                after=lambda: self._restore_state(b, saved),
                                dry=(lambda: self._native_logits(b, key[-1])) if self._native_step(b) else None)
        return graph

    def _record(self, key, run, warmups: int, after=None, dry=None):
        """Warm ``run`` up on a side stream (Triton compiles and autotunes, JIT builds happen outside the graph),
        then capture it; ``after`` runs after each warm-up and after the capture. Returns (graph, run's output).

        ``dry``: a pass over the same kernels that may run on unwritten data (no sampling, no index taken from a
        kernel's output); unless ``HF_EFFICIENT_COMPILE_AHEAD=0`` it runs first inside ``precompile.compiling_ahead``,
        so the kernels it needs compile in parallel instead of one after the other in the warm-up."""
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
        self._graphs[key] = graph
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

    # ------------------------------------------------------------------ sync / finish

    def _sync(self, ahead: bool = False) -> int:
        """Read the tokens recorded since the last sync, finish requests, compact slots. Returns #finished.

        ``ahead``: first queue one more decode step (its tokens stay on the device for the next sync), then read
        the window through a pinned copy queued before that step, so the GPU does not idle while the host works."""
        n, steps = len(self._active), self._hist_count
        if not (steps and n):
            ahead = False
        if ahead:
            cuda = self.device.type == "cuda"
            tok_host = self._history_host[: n * steps].view(n, steps)
            lp_host = self._history_lp_host[: n * steps].view(n, steps)
            tok_host.copy_(self.history[:n, :steps], non_blocking=cuda)
            lp_host.copy_(self.history_lp[:n, :steps], non_blocking=cuda)
            event = torch.cuda.Event() if cuda else None
            if cuda:
                event.record(torch.cuda.current_stream(self.device))
            self._decode_step(None)  # tokens land in column `steps`
            self.stats.run_ahead_steps += 1
            self.history[:, 0].copy_(self.history[:, steps])
            self.history_lp[:, 0].copy_(self.history_lp[:, steps])
            self.hist_idx.fill_(1)
            if cuda:
                event.synchronize()
            toks, lps = tok_host.tolist(), lp_host.tolist()
        elif steps and n:
            toks = self.history[:n, :steps].tolist()
            lps = self.history_lp[:n, :steps].tolist()
        if steps and n:
            for req, t_row, l_row in zip(self._active, toks, lps):
                for t, p in zip(t_row[req.hist_from:], l_row[req.hist_from:]):
                    if req.finished:
                        break
                    req.output.append(t)
                    req.logprobs.append(p)
                    self.stats.generated_tokens += 1
                    self._check_finished(req)
                req.hist_from = 0
        if steps:
            if not ahead:
                self.hist_idx.zero_()
            self._hist_count = 1 if ahead else 0
            if self._on_update is not None and n:
                self._on_update(list(self._active))
        return self._retire_finished()

    def _retire_finished(self) -> int:
        done = [r for r in self._active if r.finished]
        for req in done:
            self._retire(req)
        return len(done)

    def _check_finished(self, req: Request) -> None:
        p = req.params
        last = req.output[-1]
        if not p.ignore_eos and last in p.stop_token_ids:
            req.finish_reason = "stop"
        elif p.stop and (cut := self._stop_matcher(p).check(req.output)) is not None:
            del req.output[cut:], req.logprobs[cut:]
            req.finish_reason = "stop"
        elif len(req.output) >= p.max_tokens:
            req.finish_reason = "length"

    def _stop_matcher(self, p: SamplingParams):
        tok = self._call_tokenizer
        key = (id(tok), tuple(p.stop))
        cache = self.__dict__.setdefault("_matchers", {})
        if key not in cache:
            if tok is None:
                raise ValueError("stop strings need a tokenizer: DecodeEngine(model, tokenizer=...) or "
                                 "generate(..., tokenizer=...)")
            cache[key] = StopStringMatcher(tok, list(p.stop))
        return cache[key]

    def _retire(self, req: Request) -> None:
        """Free a request's blocks and move the last active slot into its place."""
        self.cache.allocator.release(req.blocks)
        req.blocks = []
        i, last = req.slot, len(self._active) - 1
        if i != last:
            moved = self._active[last]
            self._active[i] = moved
            moved.slot = i
            for buf in (self.tokens, self.positions, self.block_table, self.history, self.history_lp, self.active):
                buf[i].copy_(buf[last])
            self.sampler.move_slot(last, i)
        self.sampler.clear_slot(last)
        self._active.pop()
        self.block_table[last].fill_(self.scratch)
        self.positions[last] = 0
        self.active[last] = 0
        req.slot = -1


class _attention:
    """Run the model with attn_implementation="hf_efficient" for the engine's duration."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.previous = self.model.config._attn_implementation
        if self.previous != "hf_efficient":
            self.model.set_attn_implementation("hf_efficient")

    def __exit__(self, *exc):
        if self.previous != "hf_efficient":
            self.model.set_attn_implementation(self.previous)
