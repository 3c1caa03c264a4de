"""Fixtures for kernel tests.

Without a CUDA device, Triton kernels run through Triton's CPU interpreter. The interpreter must
be chosen before ``triton`` is imported, hence at this module's import time.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hf_efficient import tuning  # noqa: E402


@pytest.fixture
def device():
    """The device kernels run on: CUDA when present, otherwise CPU through the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Kernel outputs start as NaN, so any element a kernel forgets to write fails the test."""
    with tuning.override(poison_outputs=True):
        yield
