"""Helpers every op shares: interpreter detection, output allocation, device facts, dispatch choice.

- :func:`interpreting`: whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``).
- :func:`new_output`: an uninitialised output tensor, NaN-filled with the ``poison_outputs`` knob (tests set it so
  that elements a kernel forgets to write fail).
- :func:`num_sms`: streaming multiprocessors of a CUDA device (cached).
- :func:`pdl_enabled` / :func:`pdl_status`: whether kernels launch with programmatic dependent launch.
- :func:`window_pair`: a flash-attn ``window_size`` argument as two Python ints.
- :func:`is_fake` / :func:`use_custom_op`: the traceable custom op while tracing, the cheaper
  ``autograd.Function`` in eager mode.

Importing this module never initialises CUDA and does not need triton.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import os

import torch

from .. import tuning

try:
    import triton.language as tl
except ImportError:  # pragma: no cover - Linux installs carry triton
    tl = None

__all__ = [
    "check_scalars",
    "interpreting",
    "is_fake",
    "new_output",
    "num_sms",
    "pdl_enabled",
    "pdl_status",
    "poison_outputs",
    "use_custom_op",
    "window_pair",
]


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``). Raises ``RuntimeError``
    when the variable was set after triton's import, which the interpreter does not notice (kernels would then
    need a GPU)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or tl is None:
        return False
    if type(tl.zeros).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton had been imported (transformers and "
            "torch._dynamo import it); set it before the first import, e.g. in the environment "
            "or at the top of the root conftest")
    return True


def poison_outputs() -> bool:
    """The ``poison_outputs`` knob (``HF_EFFICIENT_POISON_OUTPUTS=1``): outputs start as NaN (tests catch elements a
    kernel does not write)."""
    return tuning.get().poison_outputs


def new_output(shape, dtype: torch.dtype, device, like: torch.Tensor | None = None) -> torch.Tensor:
    """Uninitialised output of ``shape``/``dtype`` on ``device`` (``empty_like(like, dtype=dtype)`` when ``like``
    is given, keeping its layout); NaN-filled with the ``poison_outputs`` knob (floating dtypes only)."""
    if like is not None:
        out = torch.empty_like(like, dtype=dtype)
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device | int) -> int:
    """Streaming multiprocessors of a CUDA device (a ``torch.device`` or a CUDA device index), cached; 1 for any
    other device (the CPU interpreter)."""
    if isinstance(device, int):
        return _sm_count(device)
    if device.type != "cuda":
        return 1
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _pdl_status(index: int) -> tuple[bool, str]:
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    except ImportError:
        return False, "needs triton.language.extra.cuda.gdc_wait (this triton lacks it)"
    major, minor = torch.cuda.get_device_capability(index)
    if major < 9:
        return False, f"needs compute capability >= 9.0, the device has {major}.{minor}"
    return True, "compute capability >= 9.0 and triton exposes it"


def pdl_status(device: torch.device) -> tuple[bool, str]:
    """Whether the decode kernels launch with programmatic dependent launch on ``device``, and why.

    With it each kernel may start (and fetch its weights) while the kernel before it still runs, then waits for
    it before reading its output. Hopper (sm_90) and newer, with a Triton that exposes it; the ``pdl`` knob
    (``HF_EFFICIENT_PDL=0``) turns it off.
    """
    if device.type != "cuda":
        return False, "not a CUDA device"
    if not tuning.get().pdl:
        return False, "turned off (HF_EFFICIENT_PDL=0)"
    return _pdl_status(device.index if device.index is not None else torch.cuda.current_device())


def pdl_enabled(device: torch.device) -> bool:
    """``pdl_status(device)[0]``: launch the decode kernels with programmatic dependent launch."""
    return pdl_status(device)[0]


def is_fake(t) -> bool:
    """A meta tensor or a FakeTensor (torch.compile tracing): metadata only, no data to launch a kernel on."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, torch.Tensor) and (t.device.type == "meta" or isinstance(t, FakeTensor))


def use_custom_op(*tensors) -> bool:
    """The custom op (traceable) while compiling/tracing; the cheaper autograd.Function in eager mode."""
    return torch.compiler.is_compiling() or any(is_fake(t) for t in tensors)


def check_scalars(softmax_scale, softcap) -> None:
    """Raise naming the argument unless ``softmax_scale`` is None or a finite real number and ``softcap`` a finite
    real number >= 0 (0 disables it). A NaN or infinite scale would make every output NaN; a NaN softcap used to
    count as 0 (``nan > 0`` is False)."""
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise ValueError(f"softcap must be a float >= 0 (0 disables it), got {softcap!r}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0 disables it), got {softcap!r}")


def _window_entry(w, window_size, name: str) -> int:
    if isinstance(w, bool) or (isinstance(w, torch.Tensor) and w.dtype == torch.bool) or \
            type(w).__name__ in ("bool_", "bool"):
        raise TypeError(f"{name} entries must be ints, got a bool in {window_size!r}")
    try:
        return operator.index(w)
    except TypeError:
        raise TypeError(f"{name} must be a pair (left, right) of ints, got {window_size!r}") from None


def window_pair(window_size, name: str = "window_size") -> tuple[int, int]:
    """``window_size`` as ``(left, right)`` Python ints, accepting every int-like pair flash-attn takes.

    Accepted: a tuple or list of two ints, numpy integers or 0-d integer tensors, a 1-D integer tensor or numpy
    array of two elements. Raises ``TypeError`` (not a pair of integers; bools are refused) or ``ValueError``
    (an entry below -1; -1 means unbounded) naming the argument. Reading a CUDA tensor's values syncs.
    """
    items = window_size
    if isinstance(window_size, torch.Tensor) or (hasattr(window_size, "shape") and hasattr(window_size, "dtype")):
        if tuple(window_size.shape) != (2,):
            raise TypeError(f"{name} must be a pair (left, right) of ints, got an array of shape "
                            f"{tuple(window_size.shape)}")
        items = list(window_size)
    elif not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"{name} must be a pair (left, right) of ints, got {window_size!r}")
    left, right = (_window_entry(w, window_size, name) for w in items)
    if left < -1 or right < -1:
        raise ValueError(f"{name} entries must be >= -1 (-1 = unbounded), got ({left}, {right})")
    return left, right
