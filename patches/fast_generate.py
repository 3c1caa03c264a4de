"""Patch ``"fast_generate"``: ``model.generate`` runs on hf_efficient's decode engine.

Wraps ``GenerationMixin.generate``: calls without ``custom_generate``, ``assistant_model`` or beam search are
routed to :func:`hf_efficient.generation.hf_generate.engine_generate` (paged cache, CUDA-graph decode, GPU
sampling). A request using a feature the engine does not serve falls back to transformers' own loop with one
warning.
"""

from __future__ import annotations

import logging

from .core import Patch, PatchSet, register

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _wrap_generate(original):
    def generate(self, *args, **kwargs):
        from hf_efficient.generation.hf_generate import EngineUnsupported, engine_generate

        cfg = kwargs.get("generation_config") or getattr(self, "generation_config", None)
        beams = kwargs.get("num_beams", getattr(cfg, "num_beams", 1)) or 1
        if kwargs.get("custom_generate") is not None or kwargs.get("assistant_model") is not None or beams > 1:
            return original(self, *args, **kwargs)
        try:
            return original(self, *args, custom_generate=engine_generate, **kwargs)
        except EngineUnsupported as err:
            if str(err) not in _warned:
                _warned.add(str(err))
                logger.warning("fast_generate: %s; using transformers' generate for this call", err)
            return original(self, *args, **kwargs)

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
