"""The sampler's counter-based random numbers: SplitMix64 of a request's stream key and its step counter.

A row's uniform number depends only on ``(key, step)``, so a seeded request draws the same tokens whatever slot it
occupies, whatever its neighbours are and whichever fast path the batch takes. :func:`counter_uniform` runs on the
device (int64 tensor ops, no generator state); :func:`counter_uniform_reference` is its host reference.
"""

from __future__ import annotations

import torch

__all__ = ["counter_uniform", "counter_uniform_reference", "splitmix64", "stream_key"]

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64 increment (golden ratio)
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_INDEX_SALT = 0xD1B54A32D192ED03



def splitmix64(x: int) -> int:
    """SplitMix64's output function on a Python int (taken mod 2**64); the host reference of the device hash."""
    z = x & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _signed64(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def stream_key(seed: int, sample_index: int = 0) -> int:
    """The 64-bit key (as a signed int64 value) of the random stream of sample ``sample_index`` of a request."""
    return _signed64(splitmix64(seed) ^ splitmix64((sample_index & _MASK64) ^ _INDEX_SALT))


def counter_uniform_reference(key: int, step: int) -> float:
    """Host reference of :func:`counter_uniform`: ``u = (splitmix64(key + (step + 1) * gamma) >> 12) * 2**-52``."""
    return (splitmix64(key + (step + 1) * _GAMMA) >> 12) * 2.0**-52


_S_GAMMA, _S_MIX1, _S_MIX2 = _signed64(_GAMMA), _signed64(_MIX1), _signed64(_MIX2)


def _srl(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def counter_uniform(key: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Uniform float64 numbers in ``[0, 1)`` from ``(key, step)`` int64 tensors: SplitMix64 as a counter-based RNG.

    Element-wise ``u = (mix64(key + (step + 1) * gamma) >> 12) * 2**-52`` in wrapping int64 arithmetic (52 random
    bits, so ``u * m < m`` holds exactly in float64 for every ``m >= 1``); equal bit for bit to
    :func:`counter_uniform_reference` on every device.
    """
    z = key + (step + 1) * _S_GAMMA
    z = (z ^ _srl(z, 30)) * _S_MIX1
    z = (z ^ _srl(z, 27)) * _S_MIX2
    z = z ^ _srl(z, 31)
    return _srl(z, 12).to(torch.float64) * (2.0**-52)
