"""Patch ``"fast_generate"``: ``model.generate`` runs on hf_efficient's decode engine.

Wraps ``GenerationMixin.generate``. A call is run on the engine (paged cache, CUDA-graph decode, GPU sampling)
through :func:`hf_efficient.generation.hf_generate.fast_generate_callable`, with the ``tokenizer``, ``streamer``
and ``stop_strings`` given to ``generate`` bound to it (transformers does not hand them to a ``custom_generate``
callable). A call using something the engine does not serve (assisted decoding, beam search, logits processors or
stopping criteria of the caller's, a cache passed in, ...) runs transformers' own ``generate`` unchanged, with one
warning per reason. Calls that pass their own ``custom_generate`` are left alone.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import logging

from .core import Patch, PatchSet, register

logger = logging.getLogger(__name__)
_warned: set[str] = set()
# Set while transformers' own generate runs for a call that fell back: the generate calls it makes itself (an
# assistant model drafting tokens) are its own business and run unchanged, without warnings.
_inside_fallback = contextvars.ContextVar("hf_efficient_fast_generate_fallback", default=False)

# Fields that make transformers run assisted decoding, or act before handing over to a custom_generate callable
# with a tokenizer it does not have then (token healing).
_EARLY_FIELDS = {
    "prompt_lookup_num_tokens": "the engine does not run assisted decoding",
    "assistant_early_exit": "the engine does not run assisted decoding",
    "use_mtp": "the engine does not run assisted decoding",
    "token_healing": "the engine does not heal the prompt's last token",
}


def _warn_once(reason: str, message: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("fast_generate: %s; running transformers' own generate for such calls", message)


def _positional_names(original) -> list[str]:
    try:
        params = list(inspect.signature(original).parameters.values())
    except (TypeError, ValueError):
        return []
    return [p.name for p in params[1:] if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def _fallback_reason(model, kw: dict) -> tuple[str, str] | None:
    """Why a call (its arguments by name) cannot run on the engine, judged from what was passed."""
    if kw.get("assistant_model") is not None:
        return "assistant_model", "the engine does not run assisted decoding (assistant_model=)"
    cfg = kw.get("generation_config")
    default = getattr(model, "generation_config", None)
    for name, what in _EARLY_FIELDS.items():
        value = kw[name] if name in kw else getattr(cfg, name, None)
        if value is None and name not in kw:
            value = getattr(default, name, None)
        if value is not None and value is not False:
            return name, f"{what} ({name}={value!r})"
    for name in ("logits_processor", "stopping_criteria"):
        if kw.get(name):
            kinds = sorted({type(x).__name__ for x in kw[name]})
            return name, f"the engine does not apply {name}= passed to generate ({', '.join(kinds)})"
    if kw.get("prefix_allowed_tokens_fn") is not None:
        return "prefix_allowed_tokens_fn", "the engine does not constrain tokens (prefix_allowed_tokens_fn=)"
    if kw.get("synced_gpus"):
        return "synced_gpus", "the engine does not run synced_gpus generation"
    for name in ("past_key_values", "cache"):
        if kw.get(name) is not None:
            return "past_key_values", f"the engine keeps its own KV cache ({name}= passed to generate)"
    if kw.get("cache_implementation") == "paged":
        return "cache_implementation=paged", "cache_implementation='paged' selects transformers' continuous batching"
    if getattr(default, "stop_strings", None):
        # transformers merges them into every call's config and then needs a tokenizer it does not hand on
        return "model stop_strings", "stop_strings set in the model's generation_config"
    return None


def _wrap_generate(original):
    names = _positional_names(original)

    def fall_back(self, args, kwargs):
        token = _inside_fallback.set(True)
        try:
            return original(self, *args, **kwargs)
        finally:
            _inside_fallback.reset(token)

    def generate(self, *args, **kwargs):
        from hf_efficient.generation.hf_generate import EngineUnsupported, fast_generate_callable

        if _inside_fallback.get() or kwargs.get("custom_generate") is not None or len(args) > len(names):
            return original(self, *args, **kwargs)
        kw = dict(zip(names, args))
        if set(kw) & set(kwargs) or kw.get("custom_generate") is not None:
            return original(self, *args, **kwargs)  # let transformers report the clash / run the caller's own
        kw.update(kwargs)
        reason = _fallback_reason(self, kw)
        if reason is not None:
            _warn_once(*reason)
            return fall_back(self, args, kwargs)

        call = dict(kw)
        tokenizer, streamer = call.pop("tokenizer", None), call.pop("streamer", None)
        cfg = call.get("generation_config")
        stops = call.pop("stop_strings", None)
        if cfg is not None and getattr(cfg, "stop_strings", None):
            # transformers would build its own stop-string criteria from them and require a tokenizer it does not
            # hand on: the engine takes them instead
            cfg = copy.deepcopy(cfg)
            stops = stops if "stop_strings" in kw else cfg.stop_strings
            cfg.stop_strings = None
            call["generation_config"] = cfg
        run = functools.partial(fast_generate_callable, tokenizer=tokenizer, streamer=streamer, stop_strings=stops)
        try:
            return original(self, custom_generate=run, **call)
        except EngineUnsupported as err:
            _warn_once(err.reason, str(err))
            return fall_back(self, args, kwargs)

    generate.__wrapped__ = original
    generate.__doc__ = original.__doc__
    return generate


@register("fast_generate")
def _build() -> PatchSet:
    return PatchSet(
        name="fast_generate",
        doc="model.generate on hf_efficient's paged, CUDA-graph decode engine",
        patches=[Patch("transformers.generation.utils:GenerationMixin", "generate", _wrap_generate, wraps=True)],
    )
