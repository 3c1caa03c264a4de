"""``model.generate`` on the decode engine.

transformers accepts a callable as ``custom_generate``: it prepares the inputs (left padding,
``num_return_sequences`` expansion, the GenerationConfig, logits processors and stopping criteria) and hands them
to the callable in place of its own decoding loop. :func:`engine_generate` is such a callable. transformers does
not hand a callable the ``tokenizer``, ``streamer``, ``assistant_model`` or ``assistant_tokenizer`` given to
``generate``, so the tokenizer (for stop strings) and a streamer are bound to the callable instead::

    out = model.generate(**batch, max_new_tokens=256, custom_generate=hf_efficient.engine_generate)
    gen = hf_efficient.engine_generate.bind(tokenizer=tok, streamer=streamer)   # or functools.partial
    out = model.generate(**batch, max_new_tokens=256, stop_strings=["\\n\\n"], custom_generate=gen)

A request the engine does not serve exactly (beam search, assisted decoding, logits processors it does not
apply, ...) raises :class:`EngineUnsupported` (a ``ValueError``) naming what it does not serve. The
``fast_generate`` patch (``hf_efficient.patches.applied("fast_generate")``) binds the tokenizer and streamer
itself and runs such requests on transformers' own loop instead, with one warning per reason.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable

import torch

from .sampling import SamplingParams
from .sampling.params import UNSUPPORTED_GENERATION_FIELDS


class EngineUnsupported(ValueError):
    """The request uses a generate feature the engine does not serve.

    ``reason`` is a short key naming the feature (the ``fast_generate`` patch warns once per key).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


# GenerationConfig fields the engine does not honour, with the values that leave generation unchanged (None and
# empty containers are always neutral). Fields absent here either map to SamplingParams (do_sample, temperature,
# top_k, top_p, min_p, repetition_penalty, max_new_tokens/max_length, eos_token_id, num_return_sequences,
# stop_strings), change nothing in the returned token ids (output_scores/output_logits/output_attentions/
# output_hidden_states without return_dict_in_generate, renormalize_logits, use_cache, compile_config,
# prefill_chunk_size, pad_token_id, the assistant_* tuning fields without an assistant) or are checked apart
# (cache_implementation).
_UNSERVED_FIELDS: dict[str, tuple] = {
    **UNSUPPORTED_GENERATION_FIELDS,  # decoding strategies and logits processing the sampler does not implement
    # assisted / speculative decoding
    "prompt_lookup_num_tokens": (),
    "assistant_early_exit": (),
    "use_mtp": (False,),
    # outputs
    "return_dict_in_generate": (False,),
}

# cache_implementation values that only choose how transformers would store the KV cache: the engine's paged cache
# takes their place and the tokens are the same. Offloaded and quantized caches (memory / precision trade-offs)
# are not served.
_LAYOUT_CACHES = {None, "dynamic", "static", "sliding_window", "hybrid", "hybrid_chunked"}

# Logits processors transformers builds from fields the engine reads itself: (attribute, config value) pairs that
# must agree, so a processor passed by the caller with other values is not silently replaced by the config's.
_PROCESSORS: dict[str, Callable] = {
    "TemperatureLogitsWarper": lambda c: {"temperature": c.temperature},
    "TopKLogitsWarper": lambda c: {"top_k": max(int(c.top_k or 0), 1)},
    "TopPLogitsWarper": lambda c: {"top_p": c.top_p},
    "MinPLogitsWarper": lambda c: {"min_p": c.min_p},
    "RepetitionPenaltyLogitsProcessor": lambda c: {"penalty": c.repetition_penalty, "prompt_ignore_length": None},
    "LogitNormalization": lambda c: {},  # renormalizes the scores; the chosen tokens do not change
}
_CRITERIA = {"MaxLengthCriteria", "EosTokenCriteria", "StopStringCriteria"}

# model inputs transformers prepares for a decoder-only generate (the rest is checked for meaning).
_MODEL_KWARGS = {"attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep",
                 "cache_position", "output_attentions", "output_hidden_states", "return_dict"}

_ENGINE_ATTR = "_hf_efficient_engine"
_BIND_HINT = "custom_generate=hf_efficient.engine_generate.bind(tokenizer=..., streamer=...)"


def _engine_for(model, batch: int, tokens: int):
    from .engine import DecodeEngine

    eng = getattr(model, _ENGINE_ATTR, None)
    max_batch = 1 << max(0, math.ceil(math.log2(max(batch, 1))))
    capacity = (getattr(eng, "max_blocks", 0) - 1) * getattr(eng, "block_size", 0)
    if eng is None or getattr(eng, "max_batch", 0) < batch or capacity < tokens:
        eng = DecodeEngine(model, max_batch=max_batch, max_tokens=max(tokens, 4096))
        setattr(model, _ENGINE_ATTR, eng)
    return eng


def _neutral(value, neutral: tuple) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, tuple, dict, set)) and len(value) == 0:
        return True
    try:
        return value in neutral
    except Exception:  # noqa: BLE001  (objects whose == misbehaves are not neutral)
        return False


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist()
    if isinstance(value, int):
        return [value]
    return list(value)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


def _generate_call_args(model) -> dict:
    """Arguments given to transformers' ``generate`` that it does not hand to a ``custom_generate`` callable.

    Read from the calling ``generate`` frame (its own parameters ``assistant_model``, ``streamer``,
    ``synced_gpus``). Only used to report them; where the frame cannot be found (another transformers version, a
    direct call) nothing is reported.
    """
    try:
        frame = sys._getframe(2)
    except (AttributeError, ValueError):
        return {}
    try:
        for _ in range(12):
            if frame is None:
                break
            if frame.f_code.co_name == "generate":
                names = frame.f_locals
                if names.get("self") is model and "custom_generate" in names:
                    return {k: names.get(k) for k in ("assistant_model", "streamer", "synced_gpus")}
            frame = frame.f_back
    except Exception:  # noqa: BLE001  (frame introspection is best effort)
        return {}
    finally:
        del frame
    return {}


def _check_request(model, input_ids, logits_processor, stopping_criteria, cfg, model_kwargs, stops) -> None:
    """Raise :class:`EngineUnsupported` for anything the engine would not honour."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise EngineUnsupported("hf_efficient's engine serves decoder-only models", "encoder-decoder model")
    bad = [f"{name}={getattr(cfg, name)!r}" for name, neutral in _UNSERVED_FIELDS.items()
           if not _neutral(getattr(cfg, name, None), neutral)]
    if bad:
        names = ", ".join(b.split("=", 1)[0] for b in bad)
        raise EngineUnsupported(f"hf_efficient's engine does not serve {', '.join(bad)}", names)
    cache_impl = getattr(cfg, "cache_implementation", None)
    if cache_impl not in _LAYOUT_CACHES:
        raise EngineUnsupported(
            f"hf_efficient's engine uses its own paged KV cache, not cache_implementation={cache_impl!r}",
            f"cache_implementation={cache_impl}",
        )

    seen: set[str] = set()
    for proc in logits_processor or []:
        name = type(proc).__name__
        expect = _PROCESSORS.get(name)
        if expect is None:
            raise EngineUnsupported(f"hf_efficient's engine does not apply the logits processor {name}", name)
        if name in seen or not all(_same(getattr(proc, k, v), v) for k, v in expect(cfg).items()):
            raise EngineUnsupported(
                f"hf_efficient's engine reads its sampling settings from the generation config; a logits processor "
                f"{name} passed to generate with other settings is not applied", f"logits_processor={name}")
        seen.add(name)
    eos = sorted(int(t) for t in _as_list(cfg.eos_token_id))
    for crit in stopping_criteria or []:
        name = type(crit).__name__
        if name not in _CRITERIA or name in seen:
            raise EngineUnsupported(f"hf_efficient's engine does not apply the stopping criteria {name}", name)
        seen.add(name)
        if name == "MaxLengthCriteria":
            ok = _same(getattr(crit, "max_length", cfg.max_length), cfg.max_length)
        elif name == "EosTokenCriteria":
            ok = sorted(int(t) for t in _as_list(getattr(crit, "eos_token_id", eos))) == eos
        else:
            ok = bool(stops) and tuple(getattr(crit, "stop_strings", ())) == tuple(stops)
        if not ok:
            raise EngineUnsupported(
                f"hf_efficient's engine reads its stopping settings from the generation config; a {name} passed to "
                "generate with other settings is not applied", f"stopping_criteria={name}")

    for key, value in model_kwargs.items():
        if value is None or key in _MODEL_KWARGS:
            continue
        raise EngineUnsupported(f"hf_efficient's engine takes token ids only, not the model input {key!r}", key)
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None:
        user = getattr(cache, "_is_user_defined", False)
        try:
            filled = int(cache.get_seq_length()) > 0
        except Exception:  # noqa: BLE001
            filled = not hasattr(cache, "get_seq_length")
        if user or filled:
            raise EngineUnsupported("hf_efficient's engine keeps its own KV cache; a cache passed to generate "
                                    "(past_key_values=/cache=) is not used", "past_key_values")
    mask = model_kwargs.get("attention_mask")
    pos = model_kwargs.get("position_ids")
    if mask is not None and (mask.dim() != 2 or mask.shape != input_ids.shape):
        raise EngineUnsupported("hf_efficient's engine needs a 2-D attention_mask shaped like input_ids",
                                "attention_mask shape")
    if pos is not None:
        m = torch.ones_like(input_ids) if mask is None else mask
        default = m.long().cumsum(-1) - 1
        try:
            pos = torch.broadcast_to(pos.to(default.device), default.shape)
            custom = not torch.equal(pos[m.bool()], default[m.bool()])
        except RuntimeError:
            custom = True
        if custom:
            raise EngineUnsupported("hf_efficient's engine numbers positions itself; custom position_ids are not "
                                    "used", "position_ids")


class _StreamFeed:
    """``on_update`` callback passing a batch-1 request's new tokens to a streamer, one ``put`` per token as
    transformers' loop does."""

    def __init__(self, streamer):
        self.streamer, self.sent = streamer, 0

    def __call__(self, requests) -> None:
        for req in requests:
            self.send(req.output)

    def send(self, output) -> None:
        for token in output[self.sent:]:
            self.streamer.put(torch.tensor([int(token)]))
        self.sent = max(self.sent, len(output))


def _generate(model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs, *,
              tokenizer, streamer, stop_strings, synced_gpus, fallback: bool) -> torch.LongTensor:
    """Validate, run on the engine, stream. ``fallback``: the caller (the fast_generate patch) runs transformers'
    loop on :class:`EngineUnsupported`, so the streamer is left untouched then; otherwise any failure ends it."""
    outer = _generate_call_args(model)
    outer_streamer = outer.get("streamer")
    prompt_sent = streamer is not None and outer_streamer is streamer  # transformers put the prompt already
    # every streamer this call knows of is ended when it raises (a consumer waits for its end otherwise)
    ends = [s for s in (streamer, outer_streamer) if s is not None]
    if len(ends) == 2 and ends[0] is ends[1]:
        ends = ends[:1]
    cfg = generation_config
    try:
        if outer_streamer is not None and outer_streamer is not streamer:
            raise EngineUnsupported(
                "transformers does not hand `streamer=` to a custom_generate callable; bind it instead: "
                + _BIND_HINT, "streamer")
        if outer.get("assistant_model") is not None:
            raise EngineUnsupported(
                "hf_efficient's engine does not run assisted decoding (and transformers does not hand "
                "`assistant_model=` to a custom_generate callable); call generate without custom_generate",
                "assistant_model")
        if synced_gpus or outer.get("synced_gpus"):
            raise EngineUnsupported("hf_efficient's engine does not run synced_gpus generation", "synced_gpus")
        stops = stop_strings if stop_strings is not None else cfg.stop_strings
        stops = [stops] if isinstance(stops, str) else list(stops or [])
        _check_request(model, input_ids, logits_processor, stopping_criteria, cfg, model_kwargs, stops)
        if stops and tokenizer is None:
            raise EngineUnsupported(
                "stop_strings need the tokenizer, and transformers does not hand `tokenizer=` to a custom_generate "
                "callable; bind it: " + _BIND_HINT, "stop_strings without tokenizer")
        batch, width = input_ids.shape
        if streamer is not None and batch != 1:
            raise EngineUnsupported(
                f"a streamer takes one sequence (got {batch}, including num_return_sequences)", "streamer batch")
        max_new = cfg.max_new_tokens
        if max_new is None:
            max_new = cfg.max_length - width
        try:
            params = SamplingParams.from_generation_config(cfg, max_new_tokens=max_new)
        except ValueError as err:
            raise EngineUnsupported(str(err), str(err)) from err
        if stops:
            params = params.replace(stop=stops)
    except BaseException as err:
        if not (fallback and isinstance(err, EngineUnsupported)):
            for s in ends:
                s.end()
        raise

    try:
        mask = model_kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
        # transformers repeated each prompt num_return_sequences times; the engine takes n samples per prompt.
        n = cfg.num_return_sequences or 1
        groups = [prompts[i] for i in range(0, batch, n)]
        if any(prompts[i] != prompts[i - i % n] for i in range(batch)):
            groups, n = prompts, 1
        params = params.replace(n=n)
        feed = None
        if streamer is not None:
            if not prompt_sent:
                streamer.put(input_ids.cpu())
            feed = _StreamFeed(streamer)
        # The engine's buffers are built once and kept on the model: build and update them as ordinary tensors
        # whatever mode the caller is in (inference_mode, no_grad or grad enabled).
        with torch.inference_mode(False), torch.no_grad():
            eng = _engine_for(model, batch, sum(len(p) + max_new for p in prompts) + batch * 32)
            results = eng.generate(groups, params, on_update=feed, tokenizer=tokenizer)
        outs = [list(r.output) for group in results for r in group]
        if feed is not None:
            feed.send(outs[0])
    finally:
        if streamer is not None:
            streamer.end()
    pad = getattr(cfg, "_pad_token_tensor", None)
    if pad is None:
        pad = cfg.pad_token_id
    pad = int(_as_list(pad)[0]) if pad is not None else 0
    new_width = max(len(o) for o in outs)
    tail = torch.full((batch, new_width), pad, dtype=input_ids.dtype)
    for i, o in enumerate(outs):
        tail[i, : len(o)] = torch.tensor(o, dtype=input_ids.dtype)
    return torch.cat([input_ids, tail.to(input_ids.device)], dim=1)


def engine_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    tokenizer=None,
    stop_strings: str | list[str] | None = None,
    **model_kwargs,
) -> torch.LongTensor:
    """transformers ``custom_generate`` callable: returns ``(batch, prompt_len + new)`` token ids, right-padded
    with ``pad_token_id`` where sequences stopped early.

    ``tokenizer`` (needed for stop strings) and ``streamer`` (batch size 1) must be bound, as transformers does
    not pass them on: ``custom_generate=engine_generate.bind(tokenizer=tok, streamer=s)``. ``stop_strings`` given
    to ``generate`` reach this function directly. Anything the engine does not serve raises
    :class:`EngineUnsupported` naming it; a bound streamer is ended whatever happens.
    """
    return _generate(model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs,
                     tokenizer=tokenizer, streamer=streamer, stop_strings=stop_strings, synced_gpus=synced_gpus,
                     fallback=False)


def bind(*, tokenizer=None, streamer=None, stop_strings: str | list[str] | None = None):
    """:func:`engine_generate` with the arguments transformers does not hand to a ``custom_generate`` callable::

        gen = hf_efficient.engine_generate.bind(tokenizer=tok, streamer=TextStreamer(tok))
        model.generate(**batch, stop_strings=["\\n"], custom_generate=gen)

    Equivalent to ``functools.partial(engine_generate, tokenizer=tok, streamer=...)``. A streamer is used by one
    ``generate`` call: bind a new one per call.
    """
    bound = {k: v for k, v in (("tokenizer", tokenizer), ("streamer", streamer), ("stop_strings", stop_strings))
             if v is not None}
    return functools.partial(engine_generate, **bound)


engine_generate.bind = bind


def fast_generate_callable(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                           synced_gpus: bool = False, streamer=None, tokenizer=None, stop_strings=None,
                           **model_kwargs):
    """The ``fast_generate`` patch's callable: as :func:`engine_generate`, but a request the engine does not serve
    raises :class:`EngineUnsupported` before touching the streamer, so that the patch can run transformers' loop
    with it instead."""
    return _generate(model, input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs,
                     tokenizer=tokenizer, streamer=streamer, stop_strings=stop_strings, synced_gpus=synced_gpus,
                     fallback=True)
