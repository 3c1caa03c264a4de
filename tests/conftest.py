"""Shared fixtures.

Fixtures (the real model's are session-scoped: obtained and loaded once per test session):

- ``smollm2_gguf``: ``Path`` of the verified SmolLM2-135M-Instruct Q4_1 GGUF file.
- ``smollm2_path``: ``Path`` of the dequantized float32 model directory, loadable with
  ``AutoModelForCausalLM.from_pretrained(path, dtype=..., attn_implementation=...)``.
- ``smollm2_model_fp32``: the float32 model on CPU with ``attn_implementation="sdpa"``, in eval
  mode. Shared by every test of the session: do not modify its weights, config or attention
  implementation; a test that needs its own copy calls ``hf_efficient.models.load_smollm2()``.
- ``smollm2_tokenizer``: SmolLM2's tokenizer (chat template, ``pad_token`` = eos). Shared too; its
  ``padding_side`` and ``truncation_side`` are reset to ``"right"`` before each test, so a test may
  set them; other changes (added tokens) are not allowed.
- ``tiny_family``: parametrizes a test over ``hf_efficient.models.TINY_FAMILIES``; build the model
  with ``tiny_model(tiny_family, ...)``.
- ``tune``: ``tune(field=value, ...)`` sets knobs of ``hf_efficient.tuning`` for the rest of the test (a
  ``tuning.override`` undone at teardown; later calls apply on top). Tests change knobs this way, not through
  ``HF_EFFICIENT_*`` variables: the table is read from the environment once per process (only the tests of that
  reading set variables).

Markers: ``gpu`` tests are skipped when no CUDA device is present; ``slow`` marks tests that use
the real model (they run in CI, which selects ``-m "not gpu"``).
"""

from __future__ import annotations

import contextlib
import os

import torch

# Without a CUDA device, Triton kernels run through Triton's CPU interpreter, which must be chosen before anything
# imports triton: here, before the first test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from hf_efficient import tuning  # noqa: E402
from hf_efficient.models import (  # noqa: E402
    TINY_FAMILIES,
    load_smollm2,
    load_smollm2_tokenizer,
    smollm2_dense_path,
    smollm2_gguf_path,
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_gguf():
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_path():
    return smollm2_dense_path()


@pytest.fixture(scope="session")
def smollm2_model_fp32(smollm2_path):
    model, _ = load_smollm2(dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    return model


@pytest.fixture(scope="session")
def _smollm2_tokenizer_session(smollm2_path):
    return load_smollm2_tokenizer()


@pytest.fixture
def smollm2_tokenizer(_smollm2_tokenizer_session):
    tokenizer = _smollm2_tokenizer_session
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"
    return tokenizer


@pytest.fixture(params=TINY_FAMILIES)
def tiny_family(request):
    return request.param


@pytest.fixture
def tune():
    with contextlib.ExitStack() as stack:
        yield lambda **fields: stack.enter_context(tuning.override(**fields))
