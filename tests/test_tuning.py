"""The tuning table (hf_efficient.tuning): parsing and validation of the environment, override(), the report, the
doc table, and kernel choices that follow an override."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch

from hf_efficient import tuning

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {f.name: f for f in dataclasses.fields(tuning.Tuning)}


@pytest.fixture
def fresh(monkeypatch):
    """Lets a test re-read the environment (tuning.reload); the module's state is restored afterwards."""
    for name in ("_current", "_base", "_from_env"):
        monkeypatch.setattr(tuning, name, getattr(tuning, name))
    for f in FIELDS.values():
        monkeypatch.delenv(f.metadata["env"], raising=False)
    return monkeypatch


# ------------------------------------------------------------------------------------------- the table


@pytest.mark.quick
def test_every_knob_is_described():
    envs = [f.metadata["env"] for f in FIELDS.values()]
    assert len(set(envs)) == len(envs) and all(e.startswith("HF_EFFICIENT_") for e in envs)
    for f in FIELDS.values():
        assert f.metadata["help"] and f.metadata["audience"] in ("user", "developer"), f.name
    users = [n for n, f in FIELDS.items() if f.metadata["audience"] == "user"]
    assert 0 < len(users) <= 10, users


def test_documented_variable_names_still_work():
    documented = {"HF_EFFICIENT_CACHE", "HF_EFFICIENT_SMOLLM2_GGUF", "HF_EFFICIENT_OFFLINE", "HF_EFFICIENT_DISABLE_JIT",
                  "HF_EFFICIENT_JIT_VERBOSE", "HF_EFFICIENT_PAGED_DECODE_BACKEND", "HF_EFFICIENT_FLASH_AUTOTUNE",
                  "HF_EFFICIENT_FLASH_TUNE_WIDE", "HF_EFFICIENT_FLASH_TMA", "HF_EFFICIENT_FLASH_BWD",
                  "HF_EFFICIENT_POISON_OUTPUTS", "HF_EFFICIENT_DIRECT_LAUNCH", "HF_EFFICIENT_COMPILE_AHEAD",
                  "HF_EFFICIENT_PDL", "HF_EFFICIENT_FUSED_STEP", "HF_EFFICIENT_GEMV", "HF_EFFICIENT_GEMV_TILE",
                  "HF_EFFICIENT_GEMV_WARPS", "HF_EFFICIENT_GEMV_PERSISTENT", "HF_EFFICIENT_GEMV_MAX_M"}
    assert documented <= {f.metadata["env"] for f in FIELDS.values()}


@pytest.mark.quick
def test_defaults():
    t = tuning.from_env({})
    assert t == tuning.DEFAULTS == tuning.Tuning()
    assert (t.cache, t.smollm2_gguf, t.offline, t.disable_jit, t.paged_decode_backend) == (None, None, False, False,
                                                                                             "auto")
    assert t.flash_autotune and t.compile_ahead and t.pdl and t.fused_step and t.fused_rope and t.gemv
    assert (t.flash_bwd, t.flash_tma, t.paged_decode_variant, t.poison_outputs) == ("split", False, None, False)
    from hf_efficient.ops import decode_linear as dl
    from hf_efficient.ops import paged_decode as pd

    assert (dl.GEMV_MAX_M, dl.GEMV_TILE, dl.GEMV_WARPS, dl.PREFETCH_TILE) == (2, 16384, 8, 8192)
    assert (t.gemv_max_m, t.gemv_tile, t.gemv_warps, t.prefetch_tile) == (2, 16384, 8, 8192)
    assert pd.KERNEL_VARIANTS == tuning.choices("paged_decode_variant") == (0, 3)


# ----------------------------------------------------------------------------------------------- parsing


@pytest.mark.quick
@pytest.mark.parametrize("raw,value", [("1", True), ("0", False), ("true", True), ("False", False), ("yes", True),
                                       ("no", False), (" on ", True), ("OFF", False)])
def test_booleans(raw, value):
    assert tuning.from_env({"HF_EFFICIENT_GEMV": raw}).gemv is value
    assert tuning.from_env({"HF_EFFICIENT_OFFLINE": raw}).offline is value


def test_values_and_empty_variables():
    t = tuning.from_env({"HF_EFFICIENT_GEMV_MAX_M": " 4", "HF_EFFICIENT_PAGED_DECODE_BACKEND": "Triton",
                         "HF_EFFICIENT_PAGED_DECODE_VARIANT": "3", "HF_EFFICIENT_CACHE": "~/c",
                         "HF_EFFICIENT_FLASH_BWD": "atomic", "HF_EFFICIENT_PDL": "", "HF_EFFICIENT_GEMV_TILE": "  "})
    assert (t.gemv_max_m, t.paged_decode_backend, t.paged_decode_variant, t.cache, t.flash_bwd) == (
        4, "triton", 3, "~/c", "atomic")
    assert t.pdl and t.gemv_tile == 16384  # empty: unset


@pytest.mark.quick
@pytest.mark.parametrize("env,raw,expect", [
    ("HF_EFFICIENT_GEMV", "maybe", "0 or 1"),
    ("HF_EFFICIENT_GEMV_MAX_M", "x", "an integer in 1-16"),
    ("HF_EFFICIENT_GEMV_MAX_M", "0", "an integer in 1-16"),
    ("HF_EFFICIENT_GEMV_MAX_M", "17", "an integer in 1-16"),
    ("HF_EFFICIENT_GEMV_TILE", "1000", "a power of two >= 16"),
    ("HF_EFFICIENT_GEMV_WARPS", "3", "a power of two in 1-32"),
    ("HF_EFFICIENT_PREFETCH_TILE", "8", "a power of two >= 16"),
    ("HF_EFFICIENT_PAGED_DECODE_VARIANT", "2", "unset, 0 or 3"),
    ("HF_EFFICIENT_PAGED_DECODE_VARIANT", "4", "unset, 0 or 3"),
    ("HF_EFFICIENT_PAGED_DECODE_BACKEND", "gpu", "auto, cuda, triton or reference"),
    ("HF_EFFICIENT_FLASH_BWD", "fast", "split or atomic"),
])
def test_bad_values_name_the_variable_and_what_it_expects(env, raw, expect):
    with pytest.raises(ValueError, match=re.escape(env)) as err:
        tuning.from_env({env: raw})
    assert expect in str(err.value) and raw in str(err.value)


def test_read_once_then_reload(fresh):
    fresh.setenv("HF_EFFICIENT_GEMV_MAX_M", "3")
    table = tuning.reload()
    assert tuning.get() is table and table.gemv_max_m == 3
    fresh.setenv("HF_EFFICIENT_GEMV_MAX_M", "5")
    assert tuning.get() is table  # later changes of the environment are not seen ...
    assert tuning.reload().gemv_max_m == 5  # ... until it is read again
    fresh.setattr(tuning, "_current", None)
    assert tuning.get().gemv_max_m == 5  # the first get() reads the environment


def test_unknown_variables_warn(fresh):
    fresh.setenv("HF_EFFICIENT_GEMV_ROW_PARALLEL", "1")  # retired
    with pytest.warns(RuntimeWarning, match="HF_EFFICIENT_GEMV_ROW_PARALLEL is not a knob"):
        tuning.reload()


def test_bad_environment_fails_at_first_use(fresh):
    fresh.setattr(tuning, "_current", None)
    fresh.setenv("HF_EFFICIENT_PDL", "sometimes")
    with pytest.raises(ValueError, match="HF_EFFICIENT_PDL='sometimes': expected 0 or 1"):
        tuning.get()


# ---------------------------------------------------------------------------------------------- override


@pytest.mark.quick
def test_override_nests_and_restores():
    base = tuning.get()
    with tuning.override(gemv_max_m=4, pdl=False) as outer:
        assert tuning.get() is outer and (outer.gemv_max_m, outer.pdl) == (4, False)
        with tuning.override(gemv_max_m=8):
            assert (tuning.get().gemv_max_m, tuning.get().pdl) == (8, False)
        assert tuning.get() is outer
    assert tuning.get() is base


@pytest.mark.quick
def test_override_restores_on_exception():
    base = tuning.get()
    with pytest.raises(KeyError):
        with tuning.override(fused_step=not base.fused_step):
            with tuning.override(gemv=False):
                raise KeyError("boom")
    assert tuning.get() is base


def test_override_rejects_unknown_fields_and_bad_values():
    base = tuning.get()
    with pytest.raises(TypeError, match="unknown tuning field"):
        with tuning.override(gemv_row_parallel=True):
            pass
    with pytest.raises(ValueError, match="HF_EFFICIENT_PAGED_DECODE_VARIANT"):
        with tuning.override(paged_decode_variant=1):
            pass
    with pytest.raises(ValueError, match="HF_EFFICIENT_GEMV"):
        with tuning.override(gemv="0"):  # Python values, not the variable's spelling
            pass
    assert tuning.get() is base


def test_report_sources(fresh):
    fresh.setenv("HF_EFFICIENT_FLASH_TMA", "1")
    tuning.reload()
    with tuning.override(gemv_max_m=1):
        rows = {r["name"]: r for r in tuning.report()}
    assert set(rows) == set(FIELDS)
    assert rows["flash_tma"]["source"] == "environment" and rows["flash_tma"]["value"] == "1"
    assert rows["gemv_max_m"] == {**rows["gemv_max_m"], "source": "override", "value": "1", "default": "2"}
    assert rows["pdl"]["source"] == "default" and rows["pdl"]["audience"] == "user"
    assert rows["paged_decode_variant"]["value"] == "unset"


# ---------------------------------------------------------------------------------------------- the doc


@pytest.mark.quick
def test_doc_table_is_the_generated_one():
    text = (ROOT / "docs" / "tuning.md").read_text()
    begin, end = "<!-- knobs:begin -->\n", "<!-- knobs:end -->"
    assert begin in text and end in text, "docs/tuning.md lost its table markers"
    doc = text.split(begin, 1)[1].split(end, 1)[0]
    assert doc == tuning.markdown_table(), "docs/tuning.md is stale: paste tuning.markdown_table() between the markers"
    assert "docs/tuning.md" in (ROOT / "README.md").read_text()


# ------------------------------------------------------------------------ choices that follow an override


def test_paged_decode_backend_follows_an_override():
    from hf_efficient.ops import paged_decode as pd

    q = torch.randn(1, 1, 4, 64, dtype=torch.float16)
    k = torch.randn(4, 16, 2, 64, dtype=torch.float16)
    table = torch.tensor([[2, 0]], dtype=torch.int32)
    default_report = pd.backend_report()
    with tuning.override(paged_decode_backend="reference"):
        report = pd.backend_report()
        chosen = pd.select_backend(q, k, k, table)
    assert report["impl"] == "reference" and "forced by the paged_decode_backend knob" in report["why"]
    assert chosen == ("reference", report["why"])
    assert "forced" not in default_report["why"] and "forced" not in pd.select_backend(q, k, k, table)[1]


@pytest.mark.quick
def test_kernel_choices_follow_an_override():
    from hf_efficient.generation import step_kernels
    from hf_efficient.ops import decode_linear as dl
    from hf_efficient.ops import flash_bwd, flash_fwd, jit, precompile

    assert dl.gemv_plan(1, 576) is not None and dl.gemv_plan(4, 576) is None
    with tuning.override(gemv=False):
        assert dl.gemv_plan(1, 576) is None and dl.gemv_max_m() == 0
    with tuning.override(gemv_max_m=4, gemv_tile=4096, gemv_warps=4):
        assert dl.gemv_plan(4, 576) == (4, 1024, 4)
    with tuning.override(gemv_persistent=False):
        assert dl._gemv_programs(100, torch.device("cpu")) == (100, False)
    assert step_kernels.enabled() and precompile.enabled()
    with tuning.override(fused_step=False, compile_ahead=False, flash_bwd="atomic", direct_launch=False,
                         cache="/tmp/elsewhere"):
        assert not step_kernels.enabled() and not precompile.enabled()
        assert flash_bwd.bwd_scheme(False) == "atomic" and flash_bwd.bwd_scheme(True) == "split"
        assert not flash_fwd.direct_launch_enabled()
        assert jit.cache_root() == Path("/tmp/elsewhere")
    assert flash_bwd.bwd_scheme(False) == "split"


def test_an_engine_built_inside_an_override_keeps_its_fused_step_choice():
    from hf_efficient.generation.engine import DecodeEngine
    from hf_efficient.models.tiny import tiny_model

    model = tiny_model("llama", seed=3).to("cuda" if torch.cuda.is_available() else "cpu")
    with tuning.override(fused_step=False):
        off = DecodeEngine(model, max_batch=1, max_tokens=64, block_size=4)
    assert not off.fused_step
    on = DecodeEngine(model, max_batch=1, max_tokens=64, block_size=4)
    assert on.fused_step  # the default (on CPU the kernels run through the interpreter)


def test_probe_variants_are_valid_overrides():
    spec = importlib.util.spec_from_file_location("gpu_probe", ROOT / "scripts" / "gpu_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    for label, (knobs, _) in probe.VARIANTS.items():
        with tuning.override(**knobs) as table:
            assert all(getattr(table, k) == v for k, v in knobs.items()), label
