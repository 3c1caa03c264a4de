"""Token sampling for the decode engine: per-request parameters and a batched sampler that runs on the device.

* :class:`SamplingParams`: what a request asks for (temperature, top-k/top-p/min-p, repetition penalty, stops, seed,
  logprobs), validated on construction; :meth:`SamplingParams.from_generation_config` maps a transformers
  ``GenerationConfig``.
* :class:`BatchSampler`: per-slot parameters and state in static device tensors, and :meth:`BatchSampler.sample`,
  which turns a ``(B, vocab)`` logits batch into tokens and logprobs with tensor ops only: no host synchronisation,
  no data-dependent Python control flow, static shapes. It can be captured in a CUDA graph together with the
  model's decode step.
* :class:`StopStringMatcher`: host-side detection of stop strings in the detokenized output, decoding only the tail.

Processing order of one row (the same as transformers' ``generate``)::

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw

Every filter becomes a per-row threshold on the processed logit (min-p from the row max; top-k and top-p from one
descending sort of the row, or a ``torch.topk`` when every row's top-k is bounded, or nothing when no row uses
them), so the kept set is ``{token: logit >= threshold}`` (ties at a boundary are kept). The draw is an inverse-CDF
lookup of one uniform number in the float64 cumulative sum, in token order, of the kept probabilities. The uniform
number of a row comes from a counter-based generator (SplitMix64 of the request's stream key and its step counter),
so a seeded request draws the same tokens whatever slot it occupies, whatever its neighbours are and whichever fast
path the batch takes. See ``docs/sampling.md``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "SAMPLING_EPS",
    "BatchSampler",
    "SamplingParams",
    "StopMatch",
    "StopStringMatcher",
    "counter_uniform",
    "counter_uniform_reference",
    "splitmix64",
    "stream_key",
]

#: Temperatures below this are greedy (argmax) decoding.
SAMPLING_EPS = 1e-5

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64 increment (golden ratio)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_INDEX_SALT = 0xD1B54A32D192ED03


# ---------------------------------------------------------------------------------------------------- parameters


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"SamplingParams.{name} must be {expected}, got {value!r}")


@dataclass
class SamplingParams:
    """Sampling parameters of one request (vLLM-like).

    Validated on construction (and by :meth:`replace`): an invalid value raises ``ValueError`` naming the field and
    the expected range. ``top_k=-1`` is normalized to ``0`` (off); a single ``stop`` string to a one-element list.
    """

    n: int = field(default=1, metadata={"help": "Samples drawn for the prompt (each is its own sequence); >= 1."})
    temperature: float = field(
        default=1.0,
        metadata={"help": f"Softmax temperature, >= 0. Below {SAMPLING_EPS} decoding is greedy (argmax)."},
    )
    top_k: int = field(
        default=0, metadata={"help": "Keep the k most likely tokens (ties at the k-th value kept too); 0 or -1: off."}
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling: keep the smallest most-likely set of mass >= top_p; in (0, 1], 1: off."},
    )
    min_p: float = field(
        default=0.0,
        metadata={"help": "Drop tokens whose probability is below min_p times the top probability; in [0, 1]."},
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={
            "help": "transformers semantics: the logit of every token seen in the prompt or output is divided by "
            "the penalty if positive, else multiplied by it; > 0, 1: off."
        },
    )
    max_tokens: int = field(default=16, metadata={"help": "Most tokens generated for the request; >= 1."})
    stop_token_ids: list[int] = field(
        default_factory=list,
        metadata={"help": "Token ids that end the sequence (kept in the output); holds the eos ids."},
    )
    stop: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Stop strings, matched on the detokenized output; the output ends with the token that "
            "completes one (see StopStringMatcher)."
        },
    )
    ignore_eos: bool = field(
        default=False,
        metadata={"help": "Do not stop at stop_token_ids (eos); stop strings and max_tokens still apply."},
    )
    seed: int | None = field(
        default=None,
        metadata={
            "help": "Per-request seed: the same request draws the same tokens whatever its slot and batch. "
            "None: a seed is taken from torch's default CPU generator when the request gets a slot."
        },
    )
    logprobs: bool = field(default=False, metadata={"help": "Return the logprob of each chosen token."})

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise _bad("n", "an int >= 1", self.n)
        if not _is_real(self.temperature) or self.temperature < 0:
            raise _bad("temperature", "a finite float >= 0 (0 = greedy)", self.temperature)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise _bad("top_k", "an int >= -1 (0 or -1 = off)", self.top_k)
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise _bad("top_p", "a float in (0, 1]", self.top_p)
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise _bad("min_p", "a float in [0, 1]", self.min_p)
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise _bad("repetition_penalty", "a finite float > 0 (1 = off)", self.repetition_penalty)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _bad("max_tokens", "an int >= 1", self.max_tokens)
        if isinstance(self.stop_token_ids, int) or not isinstance(self.stop_token_ids, (list, tuple)):
            raise _bad("stop_token_ids", "a list of ints >= 0", self.stop_token_ids)
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise _bad("stop_token_ids", "a list of ints >= 0", self.stop_token_ids)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in self.stop):
            raise _bad("stop", "a list of non-empty strings", self.stop)
        if not isinstance(self.ignore_eos, bool):
            raise _bad("ignore_eos", "a bool", self.ignore_eos)
        if self.seed is not None and not _is_int(self.seed):
            raise _bad("seed", "an int or None", self.seed)
        if not isinstance(self.logprobs, bool):
            raise _bad("logprobs", "a bool", self.logprobs)
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.min_p = float(self.min_p)
        self.repetition_penalty = float(self.repetition_penalty)
        if self.top_k == -1:
            self.top_k = 0
        self.stop_token_ids = list(self.stop_token_ids)
        self.stop = list(self.stop)

    @property
    def greedy(self) -> bool:
        """Whether rows of this request take the argmax (``temperature < SAMPLING_EPS``)."""
        return self.temperature < SAMPLING_EPS

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_generation_config(
        cls, gen_config: Any, max_new_tokens: int | None = None, **overrides: Any
    ) -> SamplingParams:
        """Map a transformers ``GenerationConfig`` to :class:`SamplingParams`.

        Read: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
        ``max_new_tokens``, ``eos_token_id`` (int or list, into ``stop_token_ids``), ``num_return_sequences``
        (``n``) and ``stop_strings`` (``stop``). Unset fields take transformers' defaults; in particular sampling
        (``do_sample=True``) with ``top_k`` unset keeps the 50 most likely tokens, as ``generate`` does. Without
        ``do_sample`` the request is greedy and the sampling fields are ignored (``repetition_penalty`` still
        applies). ``max_length`` counts the prompt and is not read: pass ``max_new_tokens`` (which wins over the
        config's) or the default ``max_tokens`` applies.

        Fields that change the output in ways this sampler does not implement (beam search, ``typical_p``,
        ``penalty_alpha``, ``no_repeat_ngram_size``, ``bad_words_ids``, ``constraints``, ``min_new_tokens``, ...)
        raise ``ValueError`` naming them when they are set to anything but their neutral value. Fields that do not
        affect which tokens are drawn (output flags, caching, assisted decoding, ``length_penalty`` without beams)
        are ignored.

        Args:
            gen_config: a ``transformers.GenerationConfig`` (or any object with its attributes).
            max_new_tokens: overrides ``gen_config.max_new_tokens``.
            overrides: further :class:`SamplingParams` fields (e.g. ``seed``, ``logprobs``).
        """

        def get(name: str, default: Any = None) -> Any:
            value = getattr(gen_config, name, None)
            return default if value is None else value

        bad = []
        for name, neutral in _UNSUPPORTED_GENERATION_FIELDS.items():
            value = getattr(gen_config, name, None)
            if value is None or value in neutral:
                continue
            if isinstance(value, (list, tuple, dict, set)) and len(value) == 0:
                continue
            bad.append(f"{name}={value!r}")
        if bad:
            raise ValueError(
                "GenerationConfig field(s) not supported by hf_efficient's sampler: " + ", ".join(bad)
                + " (supported: do_sample, temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, "
                "eos_token_id, num_return_sequences, stop_strings)"
            )

        kwargs: dict[str, Any] = {}
        n = get("num_return_sequences", 1)
        if get("do_sample", False):
            kwargs.update(
                temperature=float(get("temperature", 1.0)),
                top_k=int(get("top_k", 50)),
                top_p=float(get("top_p", 1.0)),
                min_p=float(get("min_p", 0.0)),
            )
        else:
            if n != 1:
                raise ValueError(
                    f"GenerationConfig.num_return_sequences={n} needs do_sample=True: greedy decoding yields one "
                    "sequence per prompt"
                )
            kwargs.update(temperature=0.0)
        kwargs["n"] = n
        kwargs["repetition_penalty"] = float(get("repetition_penalty", 1.0))
        if max_new_tokens is None:
            max_new_tokens = get("max_new_tokens")
        if max_new_tokens is not None:
            kwargs["max_tokens"] = int(max_new_tokens)
        eos = get("eos_token_id")
        if eos is not None:
            if isinstance(eos, torch.Tensor):
                eos = eos.tolist()
            kwargs["stop_token_ids"] = [int(eos)] if isinstance(eos, int) else [int(t) for t in eos]
        stops = get("stop_strings")
        if stops:
            kwargs["stop"] = [stops] if isinstance(stops, str) else list(stops)
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"GenerationConfig maps to invalid sampling parameters: {err}") from err


# GenerationConfig fields this sampler does not implement, with the values that leave generation unchanged.
_UNSUPPORTED_GENERATION_FIELDS: dict[str, tuple] = {
    "num_beams": (1,),
    "num_beam_groups": (1,),
    "diversity_penalty": (0.0,),
    "penalty_alpha": (0.0,),
    "dola_layers": (),
    "typical_p": (1.0,),
    "epsilon_cutoff": (0.0,),
    "eta_cutoff": (0.0,),
    "top_h": (),
    "encoder_repetition_penalty": (1.0,),
    "no_repeat_ngram_size": (0,),
    "encoder_no_repeat_ngram_size": (0,),
    "bad_words_ids": (),
    "force_words_ids": (),
    "constraints": (),
    "sequence_bias": (),
    "suppress_tokens": (),
    "begin_suppress_tokens": (),
    "forced_bos_token_id": (),
    "forced_eos_token_id": (),
    "exponential_decay_length_penalty": (),
    "min_length": (0,),
    "min_new_tokens": (0,),
    "guidance_scale": (1.0,),
    "watermarking_config": (),
    "token_healing": (False,),
    "remove_invalid_values": (False,),
    "max_time": (),
}


# ---------------------------------------------------------------------------------------------------- RNG


def splitmix64(x: int) -> int:
    """SplitMix64's output function on a Python int (taken mod 2**64); the host reference of the device hash."""
    z = x & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _signed64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def stream_key(seed: int, sample_index: int = 0) -> int:
    """The 64-bit key (as a signed int64 value) of the random stream of sample ``sample_index`` of a request."""
    return _signed64(splitmix64(seed) ^ splitmix64((sample_index & _MASK64) ^ _INDEX_SALT))


def counter_uniform_reference(key: int, step: int) -> float:
    """Host reference of :func:`counter_uniform`: ``u = (splitmix64(key + (step + 1) * gamma) >> 12) * 2**-52``."""
    return (splitmix64(key + (step + 1) * _GAMMA) >> 12) * 2.0**-52


_S_GAMMA, _S_MIX1, _S_MIX2 = _signed64(_GAMMA), _signed64(_MIX1), _signed64(_MIX2)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def counter_uniform(key: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Uniform float64 numbers in ``[0, 1)`` from ``(key, step)`` int64 tensors: SplitMix64 as a counter-based RNG.

    Element-wise ``u = (mix64(key + (step + 1) * gamma) >> 12) * 2**-52`` in wrapping int64 arithmetic (52 random
    bits, so ``u * m < m`` holds exactly in float64 for every ``m >= 1``); equal bit for bit to
    :func:`counter_uniform_reference` on every device.
    """
    z = key + (step + 1) * _S_GAMMA
    z = (z ^ _srl(z, 30)) * _S_MIX1
    z = (z ^ _srl(z, 27)) * _S_MIX2
    z = z ^ _srl(z, 31)
    return _srl(z, 12).to(torch.float64) * (2.0**-52)


# ---------------------------------------------------------------------------------------------------- sampler

_BLOCK = 128  # width of the blocks of the two-level cumulative sums


def _block_cdf(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (B, W) non-negative float32 as blocks (B, nb, _BLOCK) (zero padded) and their float64 cumulative sums
    (B, nb). A full-width float64 scan is slow on GPUs; block sums plus one in-block scan are cheap."""
    pad = (-w.shape[1]) % _BLOCK
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    blocks = w.view(w.shape[0], -1, _BLOCK)
    return blocks, torch.cumsum(blocks.sum(dim=-1, dtype=torch.float64), dim=-1)


def _block_search(
    blocks: torch.Tensor, bcdf: torch.Tensor, target: torch.Tensor, right: bool, width: int, arange: torch.Tensor
) -> torch.Tensor:
    """First index whose inclusive cumulative sum is ``> target`` (``right``) or ``>= target``, as (B, 1) int64.

    The result is clamped to the last positive weight of its block (and to ``width - 1``): with a target below
    the total, the index always has a positive weight even where float64 rounding of the two levels disagrees.
    """
    nb = blocks.shape[1]
    b = torch.searchsorted(bcdf, target, right=right).clamp_(max=nb - 1)
    before = torch.where(b > 0, bcdf.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks.gather(1, b[:, :, None].expand(-1, 1, _BLOCK)).squeeze(1)
    icdf = before + torch.cumsum(inner, dim=-1, dtype=torch.float64)
    j = torch.searchsorted(icdf, target, right=right)
    last = torch.where(inner > 0, arange, -1).amax(dim=-1, keepdim=True).clamp_(min=0)
    return (b * _BLOCK + torch.minimum(j, last)).clamp_(max=width - 1)


# Columns of the packed per-slot parameter tensors.
_F_TEMP, _F_TOP_P, _F_MIN_P, _F_PENALTY = range(4)
_I_TOP_K, _I_KEY, _I_STEP, _I_MAX_TOKENS = range(4)


@dataclass
class _Processed:
    """Per-row results of the processing pipeline shared by ``sample`` and the distribution queries."""

    scaled: torch.Tensor  # (B, V) float32 logits after penalty and temperature (temperature 1 for greedy rows)
    greedy: torch.Tensor  # (B,) bool
    greedy_tokens: torch.Tensor  # (B,) int64 argmax of the penalized logits
    top: torch.Tensor | None = None  # (B, 1) float32 row max of `scaled`
    threshold: torch.Tensor | None = None  # (B, 1) float32: the kept tokens are those with scaled >= threshold
    blocks: torch.Tensor | None = None  # (B, nb, _BLOCK) float32 exp(scaled - top) of kept tokens, 0 elsewhere
    bcdf: torch.Tensor | None = None  # (B, nb) float64 cumulative block sums of `blocks`
    mass: torch.Tensor | None = None  # (B, 1) float64 sum of exp(scaled - top) over the kept tokens (>= 1)


_STAGING: dict[int, list] = {}
_STAGING_MAX = 64


def h2d(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without a stream sync: on CUDA the values go through reusable pinned buffers
    (a copy from pageable memory waits for all queued work; pinning a fresh block each time costs host time). A
    buffer is reused once the copy that last read it has run (its event); while all are in flight a new one is
    added (up to ``_STAGING_MAX``, then the oldest is waited for)."""
    host = torch.as_tensor(values, dtype=dtype).contiguous()
    if device.type != "cuda":
        return host.to(device)
    if torch.cuda.is_current_stream_capturing():
        return host.pin_memory().to(device, non_blocking=True)
    index = device.index if device.index is not None else torch.cuda.current_device()
    pool = _STAGING.setdefault(index, [])  # [buffer, event of the copy that last read it], oldest use first
    nbytes = host.numel() * host.element_size()
    i = next((j for j, e in enumerate(pool) if e[0].numel() >= nbytes and e[1].query()), None)
    if i is None and len(pool) >= _STAGING_MAX:
        i = 0
        pool[0][1].synchronize()
    if i is None:
        entry = [torch.empty(max(nbytes, 1 << 12), dtype=torch.uint8, pin_memory=True), None]
    else:
        entry = pool.pop(i)
        if entry[0].numel() < nbytes:
            entry[0] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    staged = entry[0][:nbytes].view(dtype).view(host.shape)
    staged.copy_(host)
    out = torch.empty(host.shape, dtype=dtype, device=device)
    out.copy_(staged, non_blocking=True)
    entry[1] = torch.cuda.Event()
    entry[1].record(torch.cuda.current_stream(device))
    pool.append(entry)
    return out


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

    def _process(
        self,
        logits: torch.Tensor,
        fp: torch.Tensor,
        ip: torch.Tensor,
        seen: torch.Tensor,
        *,
        skip_penalty: bool,
        greedy_only: bool,
        candidates: int | None,
    ) -> _Processed:
        x = logits.to(torch.float32)
        if not skip_penalty:
            pen = fp[:, _F_PENALTY : _F_PENALTY + 1]
            x = torch.where(seen, torch.where(x < 0, x * pen, x / pen), x)
        temp = fp[:, _F_TEMP]
        greedy = temp == 0
        out = _Processed(scaled=x, greedy=greedy, greedy_tokens=x.argmax(dim=-1))
        if greedy_only:
            return out
        t = torch.where(greedy, torch.ones_like(temp), temp)
        s = x / t[:, None]
        top = s.amax(dim=-1, keepdim=True)
        e = torch.exp(s - top)
        # min-p: p_i >= min_p * p_max  <=>  s_i >= s_max + log(min_p).
        thr = top + torch.log(fp[:, _F_MIN_P : _F_MIN_P + 1])
        if candidates is None or candidates > 0:
            # The most likely tokens in descending order: all of them (sort), or the top `candidates` when every
            # sampled row's top_k is at most that. Both give the same thresholds.
            if candidates is None or candidates >= self.vocab_size:
                vals = torch.sort(s, dim=-1, descending=True).values
            else:
                vals = torch.topk(s, candidates, dim=-1, sorted=True).values
            width = vals.shape[1]
            # top-k: the k-th largest value; ties with it are kept.
            k = ip[:, _I_TOP_K : _I_TOP_K + 1].clamp(max=width)
            thr_k = vals.gather(1, k - 1)
            mass_k = torch.where(s >= thr_k, e, 0.0).sum(dim=-1, keepdim=True, dtype=torch.float64)
            # top-p on the top-k distribution: the value where the descending cumulative mass reaches p * mass_k
            # (the whole tie group at the boundary is kept). When the candidates do not reach it, the cut lies at
            # or below the top-k threshold, which then decides.
            p = fp[:, _F_TOP_P : _F_TOP_P + 1]
            blocks, bcdf = _block_cdf(torch.exp(vals - top))
            target = p.to(torch.float64) * mass_k
            j_p = _block_search(blocks, bcdf, target, False, width, self._block_ar)
            thr_p = torch.where(p >= 1.0, torch.full_like(p, -math.inf), vals.gather(1, j_p))
            thr = torch.maximum(thr, torch.maximum(thr_k, thr_p))
        blocks, bcdf = _block_cdf(torch.where(s >= thr, e, 0.0))
        out.scaled, out.top, out.threshold = s, top, thr
        out.blocks, out.bcdf, out.mass = blocks, bcdf, bcdf[:, -1:].contiguous()
        return out

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
        pr = self._process(
            logits, fp, ip, seen, skip_penalty=skip_penalty, greedy_only=greedy_only, candidates=candidates
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
            from .step_kernels import greedy_commit  # (step_kernels imports this module)

            self._check_logits(logits)
            greedy_commit(logits, self.steps[:b], self.seen[:b], commit)
            return
        tok, lp = self.sample(logits, greedy_only=greedy_only, skip_penalty=skip_penalty, candidates=candidates,
                              logprobs="raw")
        commit.apply(tok, lp)

    @staticmethod
    def raw_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``log_softmax(logits.float())[row, tokens[row]]`` as float32 ``(B,)`` (the model's own logprob)."""
        x = logits.to(torch.float32)
        return (x.gather(1, tokens[:, None]) - torch.logsumexp(x, dim=-1, keepdim=True)).squeeze(1)

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
        return self._process(
            logits, fp, ip, seen, skip_penalty=skip_penalty, greedy_only=False, candidates=candidates
        )


# ---------------------------------------------------------------------------------------------------- stop strings


@dataclass(frozen=True)
class StopMatch:
    """Where a stop string completed.

    ``num_tokens``: tokens to keep (up to and including the one that completed the stop string).
    ``trailing_chars``: characters of ``decode(ids[:num_tokens])`` after the end of the stop string, so the text
    without the stop string is ``text[: len(text) - trailing_chars - len(stop)]``.
    """

    stop: str
    num_tokens: int
    trailing_chars: int


class StopStringMatcher:
    """Detects stop strings in the detokenized output of a request, decoding only its tail.

    ``check(ids)`` after each new token costs two decodes of about ``max(len(stop)) + 8`` tokens, whatever the
    output length. The text is ``tokenizer.decode(ids, skip_special_tokens=...)`` of the generated ids (the
    prompt is not part of it); a stop string may span several tokens.

    Args:
        tokenizer: a transformers tokenizer (anything with ``decode(ids, skip_special_tokens=...)``).
        stops: the stop strings.
        skip_special_tokens: decode as the user sees the output.
    """

    _MARGIN = 4  # characters a window start may garble (stripped leading space, partial UTF-8 bytes)

    def __init__(self, tokenizer: Any, stops: Sequence[str], *, skip_special_tokens: bool = True):
        if isinstance(stops, str):
            stops = [stops]
        if any(not isinstance(s, str) or not s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stops!r}")
        self.tokenizer = tokenizer
        self.stops = tuple(dict.fromkeys(stops))
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.skip_special_tokens = skip_special_tokens

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _earliest(self, text: str, new_from: int) -> tuple[int, int, str] | None:
        """The stop occurrence of ``text`` ending after position ``new_from`` that ends first: (end, start, stop)."""
        best = None
        for stop in self.stops:
            i = text.find(stop, max(0, new_from - len(stop) + 1))
            if i >= 0:
                cand = (i + len(stop), i, stop)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        return best

    def find(self, token_ids: Sequence[int] | torch.Tensor, num_new: int = 1) -> StopMatch | None:
        """The first stop string completed by one of the last ``num_new`` tokens of ``token_ids``, or ``None``.

        Earlier tokens are assumed checked already (call it after each step with the tokens added since the
        previous call); ``num_new=len(token_ids)`` scans everything.
        """
        if not self.stops or num_new <= 0:
            return None
        ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
        n = len(ids)
        first_new = n - min(num_new, n)
        need = self.max_len - 1 + self._MARGIN
        ctx = self.max_len + 8
        while True:
            start = max(0, first_new - ctx)
            old = self._decode(ids[start:first_new])
            if start == 0 or len(old) >= need:
                break
            ctx *= 2
        full = self._decode(ids[start:n])
        p = len(old) if full.startswith(old) else _common_prefix(old, full)
        hit = self._earliest(full, p)
        if hit is None:
            return None
        end = n
        if n - first_new > 1:  # which new token completes it: the shortest prefix containing a match
            lo, hi = first_new + 1, n
            while lo < hi:
                mid = (lo + hi) // 2
                h = self._earliest(self._decode(ids[start:mid]), p)
                if h is not None:
                    hi, hit = mid, h
                else:
                    lo = mid + 1
            end = lo
            if end != n:
                full = self._decode(ids[start:end])
                hit = self._earliest(full, p) or hit
        return StopMatch(stop=hit[2], num_tokens=end, trailing_chars=len(full) - hit[0])

    def check(self, token_ids: Sequence[int] | torch.Tensor, num_new: int = 1) -> int | None:
        """Like :meth:`find` but returns only the number of tokens to keep (``StopMatch.num_tokens``) or ``None``."""
        m = self.find(token_ids, num_new)
        return None if m is None else m.num_tokens

    def truncate(self, text: str) -> tuple[str, str | None]:
        """``text`` cut before the first stop string that ends in it, and that stop string (``None`` if none)."""
        hit = self._earliest(text, 0)
        if hit is None:
            return text, None
        return text[: hit[1]], hit[2]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
