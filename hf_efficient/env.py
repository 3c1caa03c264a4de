"""Environment report: versions, GPU, compilers, which implementation each op will use (and why), and every knob of
the tuning table (:mod:`hf_efficient.tuning`) with its value and where it came from."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess

from . import tuning


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
    )
    if not nvcc or not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "release" in line:
            return line.strip()
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def gpu_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"available": False}
    idx = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(idx)
    return {
        "available": True,
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "cuda_runtime": torch.version.cuda,
    }


def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return False, f"triton is not importable ({err})"
    return True, "triton " + _version("triton")


def flash_attention_backend() -> dict:
    """Which implementation ``attn_implementation="hf_efficient"`` and ``flash_attn_func`` use here."""
    import torch

    ok, why = _triton_status()
    if not ok:
        return {"impl": "reference", "why": why}
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        if major < 8:
            return {"impl": "reference", "why": f"GPU compute capability {major}.x < 8.0 (Ampere) is not supported"}
        return {"impl": "triton", "why": f"CUDA GPU and {why}; fp16/bf16 inputs (float32 uses the reference)"}
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"impl": "triton-interpreter", "why": "TRITON_INTERPRET=1 on CPU (slow; for tests)"}
    return {"impl": "reference", "why": "no CUDA GPU: the plain-PyTorch reference runs on CPU"}


def paged_decode_backend() -> dict:
    try:
        paged_decode = importlib.import_module("hf_efficient.ops.paged_decode")
    except ImportError as err:
        return {"impl": "unavailable", "why": f"paged decode op not installed ({err})"}
    return paged_decode.backend_report()


def decode_launch_backend() -> dict:
    """Whether the decode kernels use programmatic dependent launch (see ``ops._common.pdl_enabled``)."""
    import torch

    if not torch.cuda.is_available():
        return {"impl": "off", "why": "no CUDA GPU"}
    from .ops._common import pdl_enabled

    if not tuning.get().pdl:
        return {"impl": "off", "why": "the pdl knob is off (HF_EFFICIENT_PDL=0)"}
    if pdl_enabled(torch.device("cuda", torch.cuda.current_device())):
        return {"impl": "programmatic dependent launch", "why": "compute capability >= 9.0 and triton exposes it"}
    return {"impl": "plain launches", "why": "needs compute capability >= 9.0 and triton.language.extra.cuda.gdc_wait"}


def report() -> dict:
    import torch

    return {
        "hf_efficient": _version("hf-efficient"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: _version(name)
            for name in ("torch", "transformers", "accelerate", "triton", "trl", "peft", "safetensors", "flash-attn")
        },
        "torch_cuda_build": torch.version.cuda,
        "gpu": gpu_info(),
        "nvcc": _nvcc_version(),
        "ops": {
            "flash_attention": flash_attention_backend(),
            "paged_decode": paged_decode_backend(),
            "decode_launch": decode_launch_backend(),
        },
        # every knob (value, default, source, audience), so a report says how figures were taken
        "tuning": tuning.report(),
        # the raw variables of ours that are set (a misspelt or retired one shows here but not in "tuning")
        "env_vars": {k: v for k, v in sorted(os.environ.items())
                     if k.startswith(tuning.PREFIX) or k == "TRITON_INTERPRET"},
    }


def versions_short() -> dict:
    """Versions recorded beside benchmark figures."""
    import torch

    return {
        "hf_efficient": _version("hf-efficient"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
    }
