"""What the engine keeps per request, and its counters.

A :class:`Request` is one sample of one prompt (``n`` samples of a prompt are ``n`` requests of one group, sharing
the prompt's cache blocks). The scheduler gives it a slot (a row of the static decode batch) and cache blocks; the
output processor appends the tokens the device produced; ``finish_reason`` ends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sampling import SamplingParams


@dataclass
class Request:
    """One generation request (one sample; ``n`` samples of a prompt are ``n`` requests sharing a group)."""

    rid: int
    prompt: list[int]
    params: SamplingParams
    group: int = -1  # requests of one prompt share its prompt blocks
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos, stop id or string), "length", or "error: ..." (failed alone)
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

    @property
    def remaining(self) -> int:
        """Tokens the request may still produce."""
        return self.params.max_tokens - len(self.output)


@dataclass
class EngineStats:
    """Counters of one engine (over its lifetime)."""

    prefill_tokens: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    native_prefills: int = 0  # prefills run through the native kernels (the rest: the model's forward)
    run_ahead_steps: int = 0  # steps queued before the host read the tokens of the steps before them
    graph_capture_s: float = 0.0
    graph_buckets: list = field(default_factory=list)  # GraphKey of every captured graph, in capture order
    eager_reason: str | None = None
    native_reason: str | None = None  # why decode steps run the model's forward (None: native fused kernels)
    native_max_batch: int = 0  # largest batch bucket decoded natively (0: none; larger ones run the model's forward)
