"""Token sampling for the decode engine: per-request parameters and a batched sampler that runs on the device.

* :class:`SamplingParams` (:mod:`.params`): what a request asks for (temperature, top-k/top-p/min-p, repetition
  penalty, stops, seed, logprobs), validated on construction; :meth:`SamplingParams.from_generation_config` maps a
  transformers ``GenerationConfig``.
* :class:`BatchSampler` (:mod:`.sampler`): per-slot parameters and state in static device tensors, and
  :meth:`BatchSampler.sample`, which turns a ``(B, vocab)`` logits batch into tokens and logprobs with tensor ops
  only: no host synchronisation, no data-dependent Python control flow, static shapes. It can be captured in a CUDA
  graph together with the model's decode step. The processing of the logits (repetition penalty -> temperature ->
  top-k -> top-p -> min-p, each a per-row threshold) is :mod:`.processing`; the draw's uniform numbers come from a
  counter-based generator (:mod:`.rng`: SplitMix64 of the request's stream key and its step counter), so a seeded
  request draws the same tokens whatever slot it occupies, whatever its neighbours are and whichever fast path the
  batch takes.
* :class:`StopStringMatcher` (:mod:`.stop`): host-side detection of stop strings in the detokenized output,
  decoding only the tail.

:func:`h2d` (host -> device staging, :mod:`hf_efficient.generation.staging`) is re-exported here for the engine.
See ``docs/sampling.md``.
"""

from ..staging import h2d
from .params import SAMPLING_EPS, SamplingParams
from .rng import counter_uniform, counter_uniform_reference, splitmix64, stream_key
from .sampler import BatchSampler
from .stop import StopMatch, StopStringMatcher

__all__ = [
    "SAMPLING_EPS",
    "BatchSampler",
    "SamplingParams",
    "StopMatch",
    "StopStringMatcher",
    "counter_uniform",
    "counter_uniform_reference",
    "h2d",
    "splitmix64",
    "stream_key",
]
