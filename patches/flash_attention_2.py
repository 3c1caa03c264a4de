"""Patch ``"flash_attention_2"``: transformers' own ``attn_implementation="flash_attention_2"`` on our kernels.

transformers imports flash-attn lazily through ``modeling_flash_attention_utils._lazy_imports`` and checks that the
package is installed through ``FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]`` and ``PreTrainedModel._flash_attn_can_dispatch``.
This patch answers those three seams with :mod:`hf_efficient.attention.flash_api` (``flash_attn_func``,
``flash_attn_varlen_func``, ``flash_attn_with_kvcache``), so models load and run (and train) with
``flash_attention_2`` without the flash-attn package. When flash-attn *is* installed, the patch leaves it in
charge unless applied with ``prefer_ours=True``.
"""

from __future__ import annotations

import importlib.util

from .core import Patch, PatchSet, register

_FA_UTILS = "transformers.modeling_flash_attention_utils"
_options = {"prefer_ours": False}


def _flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _use_ours() -> bool:
    return _options["prefer_ours"] or not _flash_attn_installed()


def _our_functions():
    from transformers import modeling_flash_attention_utils as fa_utils

    from hf_efficient.attention import flash_api

    try:
        from hf_efficient.attention.kvcache_api import flash_attn_with_kvcache
    except ImportError:  # transformers accepts None: continuous batching then uses the varlen path
        flash_attn_with_kvcache = None
    return (
        flash_api.flash_attn_func,
        flash_api.flash_attn_varlen_func,
        flash_attn_with_kvcache,
        fa_utils._pad_input,
        fa_utils._unpad_input,
    )


def _wrap_lazy_imports(original):
    def _lazy_imports(implementation, *args, **kwargs):
        # continuous batching asks for "paged|flash_attention_2" on some transformers versions
        plain = implementation.removeprefix("paged|") if isinstance(implementation, str) else implementation
        if plain == "flash_attention_2" and _use_ours():
            return _our_functions()
        return original(implementation, *args, **kwargs)

    _lazy_imports.__wrapped__ = original
    return _lazy_imports


def _wrap_can_dispatch(original):
    def _flash_attn_can_dispatch(self, flash_attn_version, is_init_check=False):
        if flash_attn_version == 2 and _use_ours():
            if not self._supports_flash_attn:
                raise ValueError(f"{type(self).__name__} does not support flash_attention_2")
            return True
        return original(self, flash_attn_version, is_init_check=is_init_check)

    _flash_attn_can_dispatch.__wrapped__ = original
    return _flash_attn_can_dispatch


def _available_check(*args, **kwargs) -> bool:
    return True


def _reset_loaded() -> None:
    """Forget transformers' cached flash functions so the next model load imports the right ones."""
    from transformers import modeling_flash_attention_utils as fa_utils

    fa_utils._loaded_implementation = None


class _FlashAttention2Patch(PatchSet):
    def configure(self, prefer_ours: bool = False) -> None:
        _options["prefer_ours"] = bool(prefer_ours)


@register("flash_attention_2")
def _build() -> PatchSet:
    matrix_target = f"{_FA_UTILS}:FLASH_ATTENTION_COMPATIBILITY_MATRIX"
    patches = [
        Patch(_FA_UTILS, "_lazy_imports", _wrap_lazy_imports, wraps=True),
        Patch("transformers.modeling_utils:PreTrainedModel", "_flash_attn_can_dispatch", _wrap_can_dispatch, wraps=True),
        Patch(f"{matrix_target}.2", "general_availability_check", _available_check, item=True),
    ]
    return _FlashAttention2Patch(
        name="flash_attention_2",
        doc="transformers' flash_attention_2 path (and its varlen/padding-free path) on hf_efficient kernels",
        patches=patches,
        on_apply=_reset_loaded,
        on_revert=_reset_loaded,
    )
