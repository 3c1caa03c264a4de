"""The decode engine: continuous batching over a PagedCache, decode steps replayed from CUDA graphs.

One engine serves one model. It wires four parts along one data seam:

* :class:`~hf_efficient.generation.scheduler.Scheduler` (host): waiting queue, slots, cache blocks; describes each
  step as a :class:`~hf_efficient.generation.scheduler.PrefillBatch` or
  :class:`~hf_efficient.generation.scheduler.DecodeBatch`;
* :class:`~hf_efficient.generation.runner.ModelRunner` (device): buffers, captured steps, the forward (native fused
  kernels or the model's), sampling; :mod:`~hf_efficient.generation.prefill` for prompts;
* :class:`~hf_efficient.generation.output.OutputProcessor`: tokens read back become output; eos, stop ids, stop
  strings and length finish requests;
* this loop: admit and prefill, run ``sync_every`` decode steps, read the tokens back (queueing the next step first
  when it cannot overrun, so the GPU keeps working), retire finished requests, repeat.

The engine uses the model's live parameters: captured graphs read the parameter tensors in place, so an optimizer
step (in-place updates, as torch optimizers do) is seen by the next generation. Replacing parameter tensors (e.g.
``load_state_dict(assign=True)``) needs :meth:`DecodeEngine.reset_graphs`.

After an exception inside :meth:`DecodeEngine.generate` (raised by the model, a callback, or Ctrl-C) the engine is
as before the call: no active or waiting requests, every block free.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import operator
import os
import warnings

import torch

from ..cache.paged import PagedCache
from .native import NativeDecoder
from .native import decide as native_decide
from .native import structure_key as native_structure_key
from .output import OutputProcessor
from .prefill import prefill
from .request import EngineStats, Request
from .runner import ModelRunner
from .sampling import SamplingParams
from .scheduler import Scheduler

__all__ = ["DecodeEngine", "EngineStats", "Request"]

logger = logging.getLogger(__name__)


def _model_dims(model) -> tuple[int, int, int]:
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, dim


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


class DecodeEngine:
    """Continuous-batching generation on a paged cache with CUDA-graph decode steps.

    Args:
        model: a transformers causal LM whose attention dispatches through ``AttentionInterface`` (Llama, Mistral,
            Qwen2/3, Gemma2, ...); it is switched to ``attn_implementation="hf_efficient"`` while the engine runs.
        max_batch: most sequences decoded together (static batch of the captured graphs).
        max_tokens: KV-cache capacity in tokens (default: on CUDA 40% of free memory, on CPU 64k tokens).
        block_size: tokens per cache block (a power of two).
        cuda_graphs: capture decode steps (default: when the model is on CUDA).
        sync_every: decode steps between host reads of the generated tokens.
        run_ahead: at a host read, first queue the next decode step when it cannot overrun any request's limits,
            so the GPU keeps working while the host reads and processes the tokens (a request that stopped on an
            end-of-sequence token then computes one discarded step).
        prefill_tokens: most prompt tokens prefilled in one forward (longer prompts are prefilled in chunks).
        native: decode steps through the engine's fused kernels (:mod:`~hf_efficient.generation.native`) rather
            than the model's forward: ``None`` (default) when the model is supported, at batch buckets up to
            ``native_max_batch`` when it is small enough for the kernels to win there (hidden size <=
            ``native.AUTO_MAX_HIDDEN``), for larger models at the batches the one-row projection kernels serve;
            ``True`` requires it (a ``ValueError`` says why not), ``False`` always runs the model's forward. A
            prompt admitted alone is prefilled natively whenever native steps run.
        native_max_batch: largest batch bucket decoded natively (larger buckets run the model's forward, where
            cuBLAS GEMMs beat the fused small-batch kernels).
        fused_layers: run the model's forward (prefill, and decode steps not served natively) with the
            ``"fused_layers"`` patch applied for the engine's duration (fused RMSNorm, rotary, SwiGLU; see
            :mod:`hf_efficient.patches.fused_layers`). Default: on CUDA. The patch is process-wide while applied.
        tokenizer: for stop strings (``SamplingParams.stop``); a call may pass its own.
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
        self.max_batch = _positive_int("max_batch", max_batch)
        self.sync_every = _positive_int("sync_every", sync_every)
        self.prefill_tokens = _positive_int("prefill_tokens", prefill_tokens)
        self.native_max_batch = _positive_int("native_max_batch", native_max_batch, minimum=0)
        self.block_size = _positive_int("block_size", block_size)
        if block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if max_tokens is not None:
            _positive_int("max_tokens", max_tokens)
        if native not in (None, True, False):
            raise ValueError(f"native must be None, True or False, got {native!r}")
        self.model = model
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.run_ahead = bool(run_ahead)
        layers, kv_heads, head_dim = _model_dims(model)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        token_bytes = layers * 2 * kv_heads * head_dim * param.element_size()
        if max_tokens is None:
            if self.device.type == "cuda":
                max_tokens = int(0.4 * _available_bytes(self.device) / token_bytes)
            else:
                max_tokens = 65536
        num_blocks = math.ceil(max_tokens / block_size) + 1  # +1: scratch block for idle slots
        pool_bytes = num_blocks * block_size * token_bytes
        if pool_bytes > _available_bytes(self.device):
            raise ValueError(
                f"max_tokens={max_tokens} needs a {pool_bytes / 2**30:.1f} GiB KV cache, more than the "
                f"{_available_bytes(self.device) / 2**30:.1f} GiB free on {self.device}; lower max_tokens"
            )
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.cuda_graphs = bool(cuda_graphs)
        self.max_blocks = num_blocks
        self.stats = EngineStats()
        if not self.cuda_graphs:
            self.stats.eager_reason = "model is not on CUDA" if self.device.type != "cuda" else "disabled"
        with torch.inference_mode(False):  # buffers usable in every grad mode, whichever mode built them
            self.cache = PagedCache(model.config, num_blocks=num_blocks, block_size=block_size)
            dummy = torch.empty(1, kv_heads, 1, head_dim, dtype=self.dtype, device=self.device)
            for layer in self.cache.layers:
                layer.lazy_initialization(dummy, dummy)
            # Idle slots of a batch bucket write to and read from a zeroed scratch block (finite, never NaN).
            (self.scratch,) = self.cache.blocks.allocate(1)
            self.cache.zero_block(self.scratch)
            self.runner = ModelRunner(model, self.cache, scratch=self.scratch, max_batch=max_batch,
                                      max_blocks=self.max_blocks, sync_every=sync_every, cuda_graphs=self.cuda_graphs,
                                      stats=self.stats)
        self.scheduler = Scheduler(self.cache.blocks, max_batch, prefill_tokens)
        self.output = OutputProcessor(tokenizer)
        # transformers >= 5.24 names the forward's cache argument `cache` (`past_key_values` is deprecated)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs on
        forward_args = inspect.signature(inner.forward).parameters
        self.runner.cache_kw = {"cache" if "cache" in forward_args else "past_key_values": self.cache}
        self.native_request = native
        if fused_layers is None:
            fused_layers = self.device.type == "cuda"
        self.fused_layers = bool(fused_layers)
        self._checked: tuple | None = None
        self._native_check()

    @property
    def fused_step(self) -> bool:
        return self.runner.fused_step

    def _native_check(self) -> None:
        """(Re)decide the native decode path: the model may have gained adapters or hooks since the last call."""
        key = native_structure_key(self.model)
        if key == self._checked:
            return
        limit, reason = native_decide(self.model, self.native_request, self.native_max_batch)
        runner = self.runner
        runner.native_limit = limit
        if (reason is None) != (runner.native is not None):  # switching paths: graphs captured the other one
            runner.native = NativeDecoder(self.model, self.cache) if reason is None else None
            runner.graphs.clear()
        if reason is not None and reason != self.stats.native_reason and self.native_request is not False:
            logger.info("decode steps run the model's forward: %s", reason)
        self.stats.native_reason = reason
        self.stats.native_max_batch = limit if reason is None else 0
        self._checked = key

    # ------------------------------------------------------------------ public API

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], progress=None, on_update=None,
        tokenizer=None,
    ) -> list[list[Request]]:
        """Generate for every prompt; returns one list of :class:`Request` (``n`` per prompt) per prompt.

        ``progress``: a tqdm-like object updated with finished requests. ``on_update(requests)``: called after every
        host read with the active requests (for streaming). ``tokenizer``: for stop strings in this call (default:
        the engine's). Every request is checked before any work; after an exception the engine holds no request.
        """
        groups = self._requests(prompts, params, tokenizer)
        self._on_update = on_update
        self._tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        self._progress = progress
        try:
            self._native_check()
            for group in groups:
                self.scheduler.add(group)
            with torch.inference_mode(False), torch.no_grad(), _attention(self.model), self._fused_patch():
                self._run()
        except BaseException:
            self._abort()
            raise
        finally:
            self._on_update = self._progress = None
            self._tokenizer = self.tokenizer
        return groups

    _on_update = _progress = None
    _tokenizer = None

    def reset_graphs(self) -> None:
        """Drop captured graphs (after parameters were replaced rather than updated in place)."""
        self.runner.graphs.clear()

    def check_consistency(self) -> None:
        """Raise ``AssertionError`` unless every block's refcount matches the requests holding it (the scratch
        block included) and the free list holds exactly the other blocks."""
        self.cache.blocks.check_refcounts(self.scheduler.holders() + [[self.scratch]])

    def _fused_patch(self):
        from .. import patches

        if self.fused_layers and "fused_layers" in patches.available():
            return patches.applied("fused_layers")
        return contextlib.nullcontext()

    def _abort(self) -> None:
        """Drop every request of the failed call and free its blocks and slots."""
        self.scheduler.clear()
        self.runner.reset()

    # ------------------------------------------------------------------ checks

    def _requests(self, prompts, params, tokenizer) -> list[list[Request]]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"params must be a SamplingParams or a list of them, got {type(params).__name__}")
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        groups, rid = [], getattr(self, "_next_rid", 0)
        for g, (prompt, p) in enumerate(zip(prompts, params)):
            prompt = self._check_prompt(prompt, p)
            self.output.check_params(p, tokenizer)
            groups.append([Request(rid + i, list(prompt), p, group=g) for i in range(p.n)])
            rid += p.n
        self._next_rid = rid
        limit = getattr(self.model.config.get_text_config(decoder=True), "max_position_embeddings", None)
        longest = max((len(g[0].prompt) + g[0].params.max_tokens for g in groups), default=0)
        if limit and longest > limit:
            warnings.warn(
                f"a prompt plus max_tokens reaches {longest} positions, more than the model's "
                f"max_position_embeddings={limit}: output past that length may be degenerate", stacklevel=3,
            )
        return groups

    def _check_prompt(self, prompt, p: SamplingParams) -> list[int]:
        if hasattr(prompt, "tolist") and not isinstance(prompt, (list, tuple)):  # a tensor or numpy array
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise ValueError(f"every prompt needs at least one token id (a non-empty list of ints), got {prompt!r:.60}")
        try:
            ids = [operator.index(t) for t in prompt if not isinstance(t, bool)]
        except TypeError:
            ids = []
        if len(ids) != len(prompt) or any(t < 0 or t >= self.vocab for t in ids):
            raise ValueError(f"prompt token ids must be ints in [0, {self.vocab})")
        need = math.ceil((len(ids) + p.max_tokens) / self.block_size)
        if need > self.max_blocks - 1:
            raise ValueError(
                f"a prompt of {len(ids)} tokens plus max_tokens={p.max_tokens} needs {need} cache blocks, but "
                f"the engine's cache holds {self.max_blocks - 1}; raise max_tokens of the engine"
            )
        if p.n > self.max_batch:
            raise ValueError(f"n={p.n} samples exceed the engine's max_batch={self.max_batch}")
        return ids

    # ------------------------------------------------------------------ main loop

    def _run(self) -> None:
        sched = self.scheduler
        while sched.waiting or sched.active:
            self._admit()
            self._retire_finished()  # requests finished by their first token
            if not sched.active:
                sched.check_progress()
                break
            for _ in range(self._steps_until_sync()):
                self._decode_step()
            self._sync(ahead=self._can_run_ahead())

    def _in_flight(self, req: Request) -> int:
        """Tokens of ``req`` decoded on the device but not yet read by the host."""
        return self.runner.hist_count - req.hist_from

    def _steps_until_sync(self) -> int:
        hist = self.runner.hist_count
        left = min(r.remaining - self._in_flight(r) for r in self.scheduler.active)
        return max(0 if hist else 1, min(self.sync_every - hist, left))

    def _can_run_ahead(self) -> bool:
        """Queue one more step before reading the finished window, so the GPU is busy while the host reads and
        processes it (instead of idling through every sync). Only when that step cannot overrun: every request
        still needs a token after the window, and the free blocks cover it without preempting."""
        active = self.scheduler.active
        return (
            self.run_ahead and self.sync_every >= 2 and bool(active)
            and self.cache.blocks.num_free >= len(active)
            and all(r.remaining - self._in_flight(r) >= 1 for r in active)
        )

    def _admit(self) -> None:
        sched, runner = self.scheduler, self.runner
        batch = sched.admit()
        if batch is None:
            return
        try:
            logits = prefill(runner, batch, self.prefill_tokens)
        except BaseException:
            sched.release_batch(batch)
            raise
        reqs, rows = [], []
        for g, group in enumerate(batch.groups):
            for i, req in enumerate(group):
                sched.activate(req, runner.hist_count)
                req.sample_index = i if req.sample_index < 0 else req.sample_index
                reqs.append(req)
                rows.append(g)
        tokens, logprobs = runner.first_tokens(reqs, rows, logits)
        for req, t, p in zip(reqs, tokens, logprobs):
            self.output.append(req, [t], [p], self._tokenizer)
        runner.load_slots(reqs)
        self.stats.generated_tokens += len(tokens)

    def _decode_step(self) -> None:
        sched = self.scheduler
        while not sched.fits(1):
            self._preempt()
        step = sched.reserve(1)
        seqs = None if self.cuda_graphs else [(r.blocks, r.stored) for r in sched.active]
        self.runner.decode(step, seqs)

    def _preempt(self) -> None:
        """Out of blocks: read back what the device produced, then push the newest request back to the queue."""
        self._sync()
        slot = self.scheduler.active[-1].slot if self.scheduler.active else -1
        _, move = self.scheduler.preempt()
        if move:
            self.runner.move_slot(move)
        self.runner.free_slot(move.src if move else slot)
        self.stats.preemptions += 1

    def _sync(self, ahead: bool = False) -> None:
        """Read the tokens recorded since the last read, finish requests, compact slots.

        ``ahead``: first queue one more decode step (its tokens stay on the device for the next read)."""
        active, runner = self.scheduler.active, self.runner
        if not runner.hist_count:
            return
        n = len(active)
        toks, lps = runner.read_history(n, queue_ahead=self._decode_step if ahead and n else None)
        for req, t_row, l_row in zip(active, toks, lps):
            start = req.hist_from
            self.stats.generated_tokens += self.output.append(req, t_row[start:], l_row[start:], self._tokenizer)
            req.hist_from = 0
        if self._on_update is not None and n:
            self._on_update(list(active))
        self._retire_finished()

    def _retire_finished(self) -> None:
        done = [r for r in self.scheduler.active if r.finished]
        for req in done:
            slot = req.slot
            move = self.scheduler.retire(req)
            if move:
                self.runner.move_slot(move)
            self.runner.free_slot(move.src if move else slot)
        if self._progress is not None and done:
            self._progress.update(len(done))


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
