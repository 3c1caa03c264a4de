"""Compile Triton kernels ahead of their first launch, in parallel.

A fresh process on a machine whose Triton cache is empty compiles every kernel variant at its first launch, one
after the other: the first CUDA-graph capture of a decode step pays ~10 compiles in a row. Triton's compiler
(``triton.runtime._async_compile.AsyncCompileMode``) can compile on a thread pool instead: a ``warmup`` call queues
the compile and returns, later launches of the same specialisation find the kernel in the cache.

:func:`compiling_ahead` is a context in which our launch sites (:func:`run`, and the flash attention launcher)
queue compiles instead of launching; a *dry pass* of a forward inside it leaves every output unwritten (garbage)
and collects the kernels that forward needs, which then compile concurrently. On exit it waits for them. Only
passes whose garbage cannot reach an index or a data-dependent host decision may run dry (the engine uses it for
its native decoder forward and prefill, whose indices come from inputs, not from kernel outputs).

On by default (it roughly halves the engine's first generate on an empty Triton cache, same tokens; measured in
docs/benchmarks/NOTES.md); the ``compile_ahead`` knob (``HF_EFFICIENT_COMPILE_AHEAD=0``) turns it off. A Triton
without ``AsyncCompileMode``, the interpreter, and any compile error make it a no-op (the real launch then
compiles, or raises, as usual).
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

from .. import tuning
from ._common import interpreting

__all__ = ["active", "compiling_ahead", "enabled", "run", "warmup"]

_state = threading.local()
STATS = {"passes": 0, "queued": 0, "errors": 0}


def enabled() -> bool:
    """Dry compile passes run unless the ``compile_ahead`` knob is off (``HF_EFFICIENT_COMPILE_AHEAD=0``)."""
    return tuning.get().compile_ahead


def active() -> bool:
    """Inside :func:`compiling_ahead` (on this thread): launches should queue compiles instead."""
    return getattr(_state, "on", False)


def _async_mode_class():
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return None
    return AsyncCompileMode


@contextlib.contextmanager
def compiling_ahead(workers: int | None = None):
    """Context for a dry pass: kernels launched through :func:`run` / :func:`warmup` are compiled on ``workers``
    threads (default: the CPU count, at most 16) instead of running. Yields whether it is active."""
    mode_cls = _async_mode_class()
    if not enabled() or active() or mode_cls is None or interpreting():
        yield False
        return
    workers = workers or max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hfe-compile") as pool:
        try:
            try:
                mode = mode_cls(pool, ignore_errors=True)
            except TypeError:  # older signature
                mode = mode_cls(pool)
            mode.__enter__()
        except Exception as e:  # e.g. another async-compile mode is active (torch.compile's)
            _warn(e)
            yield False
            return
        _state.on = True
        STATS["passes"] += 1
        failed = None
        try:
            yield True
        except Exception as e:  # the dry pass itself failed: the real pass that follows reports it
            failed = e
        finally:
            _state.on = False
            try:
                mode.__exit__(None, None, None)  # waits for the queued compiles
            except Exception as e:  # a compile failed: the real launch recompiles and reports it
                failed = failed or e
        if failed is not None:
            _warn(failed)


def _warn(e: BaseException) -> None:
    STATS["errors"] += 1
    warnings.warn(f"hf_efficient: compiling ahead failed ({type(e).__name__}: {e}); kernels compile at their "
                  "first launch instead", RuntimeWarning, stacklevel=4)


def warmup(kernel, grid, args, kwargs) -> None:
    """Queue the compile of ``kernel[grid](*args, **kwargs)`` (inside :func:`compiling_ahead`)."""
    STATS["queued"] += 1
    kernel.warmup(*args, grid=grid, **kwargs)


def run(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, or, inside :func:`compiling_ahead`, only queue its compile."""
    if getattr(_state, "on", False):
        warmup(kernel, grid, args, kwargs)
        return None
    return kernel[grid](*args, **kwargs)
