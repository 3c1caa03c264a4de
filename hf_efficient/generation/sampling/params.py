"""Per-request sampling parameters: :class:`SamplingParams`, validated on construction, and its mapping from a
transformers ``GenerationConfig`` (:meth:`SamplingParams.from_generation_config`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SAMPLING_EPS", "SamplingParams"]

#: Temperatures below this are greedy (argmax) decoding.
SAMPLING_EPS = 1e-5


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
        for name, neutral in UNSUPPORTED_GENERATION_FIELDS.items():
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
UNSUPPORTED_GENERATION_FIELDS: dict[str, tuple] = {
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
