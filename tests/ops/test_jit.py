"""JIT build system: cache layout, environment switches, failure handling, a real tiny build."""

import shutil
import warnings

import pytest
import torch

from hf_efficient._version import __version__
from hf_efficient.ops import jit
from hf_efficient.ops import paged_decode as pd

TINY_CU = r"""
#ifdef HFE_TORCH_BINDING
#include <torch/library.h>
int64_t tiny_launch(int64_t x);
int64_t ping(int64_t x) { return tiny_launch(x); }
TORCH_LIBRARY(hfe_jit_test, m) { m.def("ping(int x) -> int", &ping); }
#else
#include <cstdint>
__global__ void tiny_kernel(float* y) { y[threadIdx.x] = 1.f; }
int64_t tiny_launch(int64_t x) { return x + 1; }  // host code only: no device needed
#endif
"""


@pytest.fixture
def cache(tmp_path, tune):
    tune(cache=str(tmp_path / "cache"), disable_jit=False)
    return tmp_path / "cache"


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend an sm_90 device exists (status() then looks at the cache and the toolchain)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


def tiny_spec(tmp_path):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "tiny.cu").write_text(TINY_CU)
    return jit.JitSpec(name="tiny", cuda_units=(jit.Unit("tiny.cu"),),
                       host_units=(jit.Unit("tiny.cu", ("HFE_TORCH_BINDING",)),), source_dir=src)


def test_cache_root_env(monkeypatch, tmp_path, tune):
    tune(cache=None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jit.cache_root() == tmp_path / "xdg" / "hf_efficient"
    tune(cache=str(tmp_path / "mine"))
    assert jit.cache_root() == tmp_path / "mine"


def test_cache_layout(cache):
    lib = pd.SPEC.library_path("sm_90")
    rel = lib.relative_to(cache)
    assert rel.parts[:2] == (__version__, "sm_90")
    assert rel.parts[2].startswith("paged_decode_") and rel.name == "paged_decode.so"
    assert pd.SPEC.digest() == pd.SPEC.digest()  # stable: sources + flags + torch version
    assert jit.arch_tag((8, 0)) == "sm_80"


def test_disable_jit_uses_prebuilt_or_falls_back(cache, fake_gpu, monkeypatch, tmp_path, tune):
    spec = tiny_spec(tmp_path)
    tune(disable_jit=True)
    monkeypatch.setattr(jit.JitSpec, "build", lambda *a, **k: pytest.fail("compiled with JIT disabled"))
    ext = jit.Extension(spec, "hfe_jit_test")
    ok, why = ext.status()
    assert not ok and "HF_EFFICIENT_DISABLE_JIT" in why
    assert ext.load() is None and "disabled" in ext.failure
    # A library already in the cache is used even with the JIT disabled.
    spec.build_dir("sm_90").mkdir(parents=True)
    spec.library_path("sm_90").write_bytes(b"")
    ok, why = jit.Extension(spec, "hfe_jit_test").status()
    assert ok and "prebuilt" in why


def test_missing_nvcc_reported(cache, fake_gpu, monkeypatch, tmp_path):
    monkeypatch.setattr(jit, "find_nvcc", lambda: None)
    ok, why = jit.Extension(tiny_spec(tmp_path), "hfe_jit_test").status()
    assert not ok and "nvcc not found" in why


def test_failed_build_is_remembered_not_raised(cache, fake_gpu, monkeypatch, tmp_path):
    monkeypatch.setattr(jit, "find_nvcc", lambda: shutil.which("false") or "/bin/false")
    ext = jit.Extension(tiny_spec(tmp_path), "hfe_jit_test")
    assert ext.load() is None
    assert ext.failure.startswith("build failed")
    assert ext.load() is None  # remembered: no second build attempt


def test_first_error_line():
    log = "compiling\nfoo.cu(3): error: identifier \"x\" is undefined\n1 error detected\nninja: build stopped\n"
    assert jit.first_error_line(log) == 'foo.cu(3): error: identifier "x" is undefined'
    assert jit.first_error_line("") == "unknown build error"


def test_backend_report_on_cpu_says_why():
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    rep = pd.backend_report()
    assert rep["op"] == "paged_decode" and rep["impl"] == "reference"
    assert "no CUDA device" in rep["why"]


def test_warning_is_issued_once(monkeypatch):
    monkeypatch.setattr(pd, "_warned", False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        pd._warn_once("build failed: x")
        pd._warn_once("build failed: x")
    assert len(rec) == 1 and "Triton" in str(rec[0].message)


def test_import_does_not_initialise_cuda():
    import subprocess
    import sys

    code = ("import hf_efficient, hf_efficient.ops.paged_decode, hf_efficient.attention.kvcache_api, torch;"
            "print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


@pytest.mark.skipif(jit.find_nvcc() is None or jit.find_cxx() is None, reason="needs nvcc and a C++ compiler")
def test_real_build_and_load(cache, tmp_path):
    spec = tiny_spec(tmp_path)
    lib = spec.build("sm_80")
    assert lib == spec.library_path("sm_80") and lib.is_file()
    assert (spec.build_dir("sm_80") / "build.log").is_file()
    assert spec.build("sm_80") == lib  # second call: already built, no work
    torch.ops.load_library(str(lib))
    assert torch.ops.hfe_jit_test.ping(41) == 42
