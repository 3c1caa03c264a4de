"""The batched sampler of the decode engine: :class:`BatchSampler`.

Per-slot parameters and state live in static device tensors; :meth:`BatchSampler.sample` turns a ``(B, vocab)``
logits batch into tokens and logprobs with tensor ops only: no host synchronisation, no data-dependent Python
control flow, static shapes. It can be captured in a CUDA graph together with the model's decode step. The
processing of the logits is :func:`~.processing.process_logits`; the uniform number of a row comes from the
counter-based generator of :mod:`.rng`. See ``docs/sampling.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..logprobs import raw_logprobs
from ..staging import h2d
from ..step_kernels import greedy_commit
from .params import SamplingParams, _is_int
from .processing import (
    _BLOCK,
    _F_MIN_P,
    _F_PENALTY,
    _F_TEMP,
    _F_TOP_P,
    _I_KEY,
    _I_MAX_TOKENS,
    _I_STEP,
    _I_TOP_K,
    _block_search,
    _Processed,
    process_logits,
)
from .rng import counter_uniform, stream_key

__all__ = ["BatchSampler"]


class BatchSampler:
    """Batched sampling over static device tensors, capturable in a CUDA graph.

    Row ``i`` of the logits passed to :meth:`sample` belongs to slot ``i`` (or to ``slots[i]`` when a slot index
    tensor is given). The host assigns a request to a slot with :meth:`set_slot`; everything else happens on the
    device. Per-slot state (all on ``device``, allocated once so captured graphs stay valid):

    ========================  ====================  ==================================================================
    ``temperature``           float32 (max_batch,)  0 for greedy slots
    ``top_k``                 int64 (max_batch,)    effective k in ``[1, vocab]`` (vocab when off)
    ``top_p``                 float32 (max_batch,)
    ``min_p``                 float32 (max_batch,)
    ``repetition_penalty``    float32 (max_batch,)
    ``keys``                  int64 (max_batch,)    RNG stream key of the request (:func:`stream_key`)
    ``steps``                 int64 (max_batch,)    draws made by the slot's request so far (the RNG counter)
    ``max_tokens``            int64 (max_batch,)
    ``stop_ids``              int64 (max_batch, max_stop_ids), ``-1`` padded; empty when ``ignore_eos``
    ``seen``                  bool (max_batch, vocab)  tokens of the prompt and output (repetition penalty)
    ========================  ====================  ==================================================================

    Args:
        max_batch: number of slots.
        vocab_size: the logits' last dimension.
        device: where state and computation live.
        max_stop_ids: width of the per-slot stop-token table read by :meth:`check_stop`.
        generator: CPU generator that seeds requests without a seed (default: torch's default generator).
    """

    def __init__(
        self,
        max_batch: int,
        vocab_size: int,
        device: torch.device | str = "cpu",
        *,
        max_stop_ids: int = 32,
        generator: torch.Generator | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if max_stop_ids < 1:
            raise ValueError(f"max_stop_ids must be >= 1, got {max_stop_ids}")
        self.max_batch, self.vocab_size, self.max_stop_ids = max_batch, vocab_size, max_stop_ids
        self.device = torch.device(device)
        self.generator = generator
        dev = self.device
        self._fparams = torch.zeros(max_batch, 4, dtype=torch.float32, device=dev)
        self._fparams[:, _F_TOP_P] = 1.0
        self._fparams[:, _F_PENALTY] = 1.0
        self._iparams = torch.zeros(max_batch, 4, dtype=torch.int64, device=dev)
        self._iparams[:, _I_TOP_K] = vocab_size
        self._iparams[:, _I_MAX_TOKENS] = 1 << 62
        self.stop_ids = torch.full((max_batch, max_stop_ids), -1, dtype=torch.int64, device=dev)
        self.seen = torch.zeros(max_batch, vocab_size, dtype=torch.bool, device=dev)
        self._rows = torch.arange(max_batch, device=dev)
        self._block_ar = torch.arange(_BLOCK, device=dev)
        self.slot_params: list[SamplingParams | None] = [None] * max_batch

    # --------------------------------------------------------------------------------------- state views

    temperature = property(lambda self: self._fparams[:, _F_TEMP])
    top_p = property(lambda self: self._fparams[:, _F_TOP_P])
    min_p = property(lambda self: self._fparams[:, _F_MIN_P])
    repetition_penalty = property(lambda self: self._fparams[:, _F_PENALTY])
    top_k = property(lambda self: self._iparams[:, _I_TOP_K])
    keys = property(lambda self: self._iparams[:, _I_KEY])
    steps = property(lambda self: self._iparams[:, _I_STEP])
    max_tokens = property(lambda self: self._iparams[:, _I_MAX_TOKENS])

    # --------------------------------------------------------------------------------------- host side

    def _check_slot(self, slot: int) -> None:
        if not _is_int(slot) or not 0 <= slot < self.max_batch:
            raise ValueError(f"slot must be an int in [0, {self.max_batch}), got {slot!r}")

    def _h2d(self, values: Any, dtype: torch.dtype) -> torch.Tensor:
        return h2d(values, dtype, self.device)

    def set_slot(
        self,
        slot: int,
        params: SamplingParams,
        prompt_ids: Sequence[int] | torch.Tensor | None = None,
        *,
        sample_index: int = 0,
        seed_offset: int = 0,
    ) -> None:
        """Assign a request to ``slot``: write its parameters, stream key, step counter and seen-token mask.

        Args:
            slot: the slot (row of the batch) the request decodes in.
            params: the request's sampling parameters.
            prompt_ids: its context so far (prompt, plus earlier output when resuming), marked as seen for the
                repetition penalty; a list or a 1-D int tensor (a device tensor avoids a host copy).
            sample_index: which of the request's ``n`` samples this is; samples of one seeded request draw from
                distinct streams (pass ``0 .. n-1``).
            seed_offset: initial step counter: the number of tokens the request already drew (resume after
                preemption and continue the same random stream).

        Host-side work only (small non-blocking copies and device fills, no synchronisation); call it on the
        stream that runs the decode step (or synchronise first) so it is ordered with captured-graph replays.
        """
        self._check_slot(slot)
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not _is_int(seed_offset) or seed_offset < 0:
            raise ValueError(f"seed_offset must be an int >= 0, got {seed_offset!r}")
        stops = [] if params.ignore_eos else list(dict.fromkeys(params.stop_token_ids))
        if len(stops) > self.max_stop_ids:
            raise ValueError(
                f"SamplingParams.stop_token_ids has {len(stops)} ids but this BatchSampler holds at most "
                f"{self.max_stop_ids} (max_stop_ids)"
            )
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator).item())  # CPU generator: no sync
        k = params.top_k if 0 < params.top_k < self.vocab_size else self.vocab_size
        temperature = 0.0 if params.greedy else params.temperature
        fvals = [temperature, params.top_p, params.min_p, params.repetition_penalty]
        ivals = [k, stream_key(seed, sample_index), seed_offset, params.max_tokens]
        self._fparams[slot].copy_(self._h2d(fvals, torch.float32))
        self._iparams[slot].copy_(self._h2d(ivals, torch.int64))
        self.stop_ids[slot].copy_(self._h2d(stops + [-1] * (self.max_stop_ids - len(stops)), torch.int64))
        row = self.seen[slot]
        row.zero_()
        if prompt_ids is not None and len(prompt_ids) > 0:
            if isinstance(prompt_ids, torch.Tensor) and prompt_ids.device == self.device:
                ids = prompt_ids.reshape(-1).to(torch.int64)
            else:
                host = prompt_ids.reshape(-1).tolist() if isinstance(prompt_ids, torch.Tensor) else list(prompt_ids)
                if min(host) < 0 or max(host) >= self.vocab_size:
                    raise ValueError(f"prompt_ids must be token ids in [0, {self.vocab_size})")
                ids = self._h2d(host, torch.int64)
            row.index_fill_(0, ids, True)
        self.slot_params[slot] = params

    def clear_slot(self, slot: int) -> None:
        """Forget the request of ``slot`` on the host (its device rows stay; results for it are to be ignored)."""
        self._check_slot(slot)
        self.slot_params[slot] = None

    def move_slot(self, src: int, dst: int) -> None:
        """Move the request of slot ``src`` to slot ``dst`` (device copies, no sync); ``src`` becomes free.

        Its stream key, step counter and seen tokens move with it, so its draws continue unchanged.
        """
        self._check_slot(src)
        self._check_slot(dst)
        if src == dst:
            return
        for buf in (self._fparams, self._iparams, self.stop_ids, self.seen):
            buf[dst].copy_(buf[src])
        self.slot_params[dst] = self.slot_params[src]
        self.slot_params[src] = None

    def save_state(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the state that :meth:`sample` and :meth:`observe` mutate (step counters, seen tokens).

        For warm-up runs before a CUDA-graph capture: ``state = s.save_state(); run(); s.restore_state(state)``.
        """
        return self._iparams[:, _I_STEP].clone(), self.seen.clone()

    def restore_state(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Put back a state returned by :meth:`save_state` (device copies, no sync)."""
        steps, seen = state
        self._iparams[:, _I_STEP].copy_(steps)
        self.seen.copy_(seen)

    def static_flags(self, slots: Sequence[int] | int, candidate_buckets: Sequence[int] = (64, 1024)) -> dict:
        """Host-side fast-path flags for a batch, from the parameters given to :meth:`set_slot` (no device read).

        ``slots``: the slot ids of the batch rows, or an int ``B`` for slots ``0 .. B-1``. Returns the keyword
        arguments ``greedy_only``, ``skip_penalty`` and ``candidates`` for :meth:`sample`: ``candidates`` is ``0``
        when no sampled row uses top-k or top-p, else the smallest of ``candidate_buckets`` that bounds every
        sampled row's ``top_k`` (``None``: full sort, when a row has top-p without top-k or a larger top-k).
        Greedy and free slots constrain nothing. A decode loop keys its captured graphs on ``B`` and these flags;
        the tokens drawn do not depend on them.
        """
        rows = range(slots) if isinstance(slots, int) else slots
        sampled = [p for p in (self.slot_params[s] for s in rows) if p is not None and not p.greedy]
        candidates: int | None = 0
        if any(p.top_k > 0 or p.top_p < 1.0 for p in sampled):
            if all(p.top_k > 0 for p in sampled):
                k = max(p.top_k for p in sampled)
                candidates = next((c for c in sorted(candidate_buckets) if c >= k), None)
            else:
                candidates = None
        return {
            "greedy_only": not sampled,
            "skip_penalty": all(
                p is None or p.repetition_penalty == 1.0 for p in (self.slot_params[s] for s in rows)
            ),
            "candidates": candidates,
        }

    # --------------------------------------------------------------------------------------- device side

    def _gather(self, batch: int, slots: torch.Tensor | None):
        if slots is None:
            if batch > self.max_batch:
                raise ValueError(f"logits have {batch} rows but the sampler has {self.max_batch} slots")
            return self._fparams[:batch], self._iparams[:batch], self.seen[:batch], self._rows[:batch]
        if slots.dim() != 1 or slots.shape[0] != batch:
            raise ValueError(f"slots must be a 1-D tensor of {batch} slot ids, got shape {tuple(slots.shape)}")
        slots = slots.to(self.device, torch.int64)
        return self._fparams[slots], self._iparams[slots], self.seen[slots], slots

    def _check_logits(self, logits: torch.Tensor) -> None:
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"logits must have shape (batch, {self.vocab_size}), got {tuple(logits.shape)}"
            )
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got {logits.dtype}")

    def sample(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor | None = None,
        *,
        observe: bool = True,
        greedy_only: bool = False,
        skip_penalty: bool = False,
        candidates: int | None = None,
        logprobs: str = "processed",
    ):
        """Draw one token per row. Device ops only: no host sync, static shapes, CUDA-graph capturable.

        Args:
            logits: ``(B, vocab)`` floating point (any float dtype; processed in float32).
            slots: ``None`` (row ``i`` is slot ``i``) or a ``(B,)`` int64 device tensor of distinct slot ids (a
                static buffer when captured).
            observe: mark the drawn tokens as seen (repetition penalty); else call :meth:`observe` yourself.
            greedy_only: fast path, valid when every row is greedy: argmax only.
            skip_penalty: fast path, valid when no row has a repetition penalty.
            candidates: how much of each row is sorted to find the top-k/top-p thresholds. ``None`` (always
                valid): a full sort. ``K > 0``: ``torch.topk(K)``, valid when every sampled row has
                ``1 <= top_k <= K``. ``0``: no sort, valid when no sampled row uses top-k or top-p.
                :meth:`static_flags` computes valid values of these three flags from the slots' parameters; the
                tokens drawn are the same whichever valid values are passed.
            logprobs: ``"processed"``: log-probability of the token under the distribution it was drawn from
                (after penalty, temperature, top-k/top-p/min-p and renormalisation; ``0`` for greedy rows);
                ``"raw"``: the model's ``log_softmax(logits)[token]``; ``"both"``: return both.

        Returns:
            ``(tokens, logprobs)``: int64 ``(B,)`` and float32 ``(B,)``; with ``logprobs="both"``
            ``(tokens, processed_logprobs, raw_logprobs)``.

        Side effects (on the device): the step counters of the rows' slots are incremented; with ``observe``
        the tokens are added to the slots' seen sets.
        """
        if logprobs not in ("processed", "raw", "both"):
            raise ValueError(f"logprobs must be 'processed', 'raw' or 'both', got {logprobs!r}")
        self._check_logits(logits)
        batch = logits.shape[0]
        fp, ip, seen, rows = self._gather(batch, slots)
        pr = process_logits(
            logits, fp, ip, seen, skip_penalty=skip_penalty, greedy_only=greedy_only, candidates=candidates,
            block_ar=self._block_ar,
        )
        if greedy_only:
            tokens = pr.greedy_tokens
            proc_lp = torch.zeros(batch, dtype=torch.float32, device=logits.device)
        else:
            u = counter_uniform(ip[:, _I_KEY], ip[:, _I_STEP])[:, None]
            mass = pr.mass
            # Inverse CDF in token order: the first token whose cumulative mass exceeds u * mass (< mass). It has
            # a positive probability: a token outside the support is never drawn.
            j = _block_search(pr.blocks, pr.bcdf, u * mass, True, self.vocab_size, self._block_ar)
            lp = ((pr.scaled.gather(1, j) - pr.top).to(torch.float64) - torch.log(mass)).squeeze(1)
            tokens = torch.where(pr.greedy, pr.greedy_tokens, j.squeeze(1))
            proc_lp = torch.where(pr.greedy, torch.zeros_like(lp), lp).to(torch.float32)
        if slots is None:
            self._iparams[:batch, _I_STEP] += 1
        else:
            self._iparams[:, _I_STEP].index_add_(0, rows, torch.ones_like(rows))
        if observe:
            self.seen.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.bool))
        if logprobs == "processed":
            return tokens, proc_lp
        raw = self.raw_logprobs(logits, tokens)
        if logprobs == "raw":
            return tokens, raw
        return tokens, proc_lp, raw

    def sample_commit(self, logits: torch.Tensor, commit, *, greedy_only: bool = False, skip_penalty: bool = False,
                      candidates: int | None = None, fused: bool = False) -> None:
        """:meth:`sample` over slots ``0..B-1`` with raw logprobs, then ``commit.apply(tokens, logprobs)`` (a
        :class:`~hf_efficient.generation.step_kernels.StepCommit`: the engine's decode step).

        ``fused``: when the greedy fast path applies (``greedy_only`` and ``skip_penalty``), one kernel
        (``step_kernels.greedy_commit``) draws, counts the step, marks the token seen and commits; same tokens and
        state, logprobs to float32 rounding. Callers pass it where Triton can run (``step_kernels.usable``)."""
        b = logits.shape[0]
        if fused and greedy_only and skip_penalty:
            self._check_logits(logits)
            greedy_commit(logits, self.steps[:b], self.seen[:b], commit)
            return
        tok, lp = self.sample(logits, greedy_only=greedy_only, skip_penalty=skip_penalty, candidates=candidates,
                              logprobs="raw")
        commit.apply(tok, lp)

    @staticmethod
    def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``log_softmax(logits.float())[row, tokens[row]]`` as float32 ``(B,)`` (the model's own logprob;
        :func:`hf_efficient.generation.logprobs.raw_logprobs`)."""
        return raw_logprobs(logits, tokens)

    def observe(self, tokens: torch.Tensor, slots: torch.Tensor | None = None) -> None:
        """Mark ``tokens`` (int64 ``(B,)``) as seen by the rows' slots (device op, no sync)."""
        _, _, _, rows = self._gather(tokens.shape[0], slots)
        self.seen.index_put_((rows, tokens.to(torch.int64)), torch.ones_like(tokens, dtype=torch.bool))

    def check_stop(self, tokens: torch.Tensor, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Device-side end test after :meth:`sample`: bool ``(B,)``, true where the token is one of the slot's
        stop ids (unless ``ignore_eos``) or the slot's request has drawn ``max_tokens`` tokens (its step counter).

        Stop strings are not covered (host side, :class:`StopStringMatcher`).
        """
        _, ip, _, rows = self._gather(tokens.shape[0], slots)
        hit = (tokens.to(torch.int64)[:, None] == self.stop_ids[rows]).any(dim=-1)
        return hit | (ip[:, _I_STEP] >= ip[:, _I_MAX_TOKENS])

    def processed_logits(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor | None = None,
        *,
        skip_penalty: bool = False,
        candidates: int | None = None,
    ) -> torch.Tensor:
        """The float32 ``(B, vocab)`` logits :meth:`sample` draws from: penalty and temperature applied (greedy rows
        with temperature 1), ``-inf`` outside the top-k/top-p/min-p support. Reads no RNG and changes no state."""
        pr = self._query(logits, slots, skip_penalty, candidates)
        return pr.scaled.masked_fill(pr.scaled < pr.threshold, -math.inf)

    def processed_logprobs(
        self,
        logits: torch.Tensor,
        slots: torch.Tensor | None = None,
        *,
        skip_penalty: bool = False,
        candidates: int | None = None,
    ) -> torch.Tensor:
        """Float32 ``(B, vocab)`` log-probabilities of the distribution :meth:`sample` draws from (``-inf`` outside
        the support; greedy rows: ``0`` at the argmax). The target distribution of speculative or RL importance
        sampling. Reads no RNG and changes no state."""
        pr = self._query(logits, slots, skip_penalty, candidates)
        lp = (pr.scaled - pr.top).to(torch.float64) - torch.log(pr.mass)
        lp = lp.masked_fill(pr.scaled < pr.threshold, -math.inf).to(torch.float32)
        onehot = torch.full_like(lp, -math.inf).scatter_(1, pr.greedy_tokens[:, None], 0.0)
        return torch.where(pr.greedy[:, None], onehot, lp)

    def _query(self, logits, slots, skip_penalty, candidates) -> _Processed:
        self._check_logits(logits)
        fp, ip, seen, _ = self._gather(logits.shape[0], slots)
        return process_logits(
            logits, fp, ip, seen, skip_penalty=skip_penalty, greedy_only=False, candidates=candidates,
            block_ar=self._block_ar,
        )
