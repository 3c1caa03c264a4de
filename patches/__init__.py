"""Revertible patches that put hf_efficient under transformers' own code paths.

Installed as ``hf_efficient.patches``. Each named patch is a set of :class:`Patch` objects; applying replaces
attributes at narrow, stable seams (never whole model forwards), and reverting restores the exact original objects::

    import hf_efficient
    hf_efficient.patches.apply("flash_attention_2")       # HF's flash_attention_2 path on our kernels
    with hf_efficient.patches.applied("flash_attention_2"):
        ...
    hf_efficient.patches.revert("flash_attention_2")

Registered patches: see :func:`available` (``hf-efficient env`` lists them too).
"""

from __future__ import annotations

from contextlib import contextmanager

from . import fast_generate as _fast_generate  # noqa: F401  (registers itself)
from . import flash_attention_2 as _flash_attention_2  # noqa: F401  (registers itself)
from . import fused_layers as _fused_layers  # noqa: F401
from .core import REGISTRY, Patch, PatchSet, get, register

__all__ = ["Patch", "PatchSet", "apply", "revert", "applied", "active", "available", "register", "get"]


def available() -> list[str]:
    """Names of all registered patches."""
    return sorted(REGISTRY)


def active() -> list[str]:
    """Names of the patches applied now."""
    return [name for name in available() if get(name).active]


def apply(*names: str, **options) -> None:
    """Apply the named patches (all registered ones when no name is given). Applying twice is harmless.

    Options are passed to the patch sets that take them (e.g. ``prefer_ours=True`` for ``"flash_attention_2"``).
    """
    for name in names or available():
        ps = get(name)
        configure = getattr(ps, "configure", None)
        if options:
            if configure is None:
                raise TypeError(f"patch {name!r} takes no options, got {sorted(options)}")
            configure(**options)
        ps.apply()


def revert(*names: str) -> None:
    """Revert the named patches (all when no name is given), restoring the original objects."""
    for name in names or available():
        get(name).revert()


@contextmanager
def applied(*names: str, **options):
    """Context manager: apply on entry; on exit revert the patches this block applied."""
    names = names or tuple(available())
    was_active = {n for n in names if get(n).active}
    apply(*names, **options)
    try:
        yield
    finally:
        for name in names:
            if name not in was_active:
                get(name).revert()
