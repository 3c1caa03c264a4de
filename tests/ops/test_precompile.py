"""Compile-ahead plumbing (``hf_efficient.ops.precompile``): inside the context, launch sites queue compiles
instead of launching, the autotuned launcher queues every config it would time, and failures stay contained.
The compiles themselves need a GPU target; here Triton's async-compile mode and the kernels are stand-ins."""
from __future__ import annotations

import pytest

from hf_efficient import tuning
from hf_efficient.ops import flash_fwd, precompile


class FakeKernel:
    def __init__(self):
        self.warmed, self.launched = [], []

    def warmup(self, *args, grid, **kwargs):
        self.warmed.append((args, grid, kwargs))

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append((args, grid, kwargs))


class FakeMode:
    entered = 0

    def __init__(self, executor, ignore_errors=False):
        self.executor = executor

    def __enter__(self):
        FakeMode.entered += 1
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def ahead(monkeypatch, tune):
    tune(compile_ahead=True)
    monkeypatch.setattr(precompile, "_async_mode_class", lambda: FakeMode)
    monkeypatch.setattr(precompile, "interpreting", lambda: False)  # precompile's check
    monkeypatch.setattr(flash_fwd, "interpreting", lambda: False)  # the flash launcher's


def test_run_launches_outside_and_queues_inside(ahead):
    k = FakeKernel()
    precompile.run(k, (2, 1), 1, 2, BLOCK=16)
    assert k.launched == [((1, 2), (2, 1), {"BLOCK": 16})] and not k.warmed
    with precompile.compiling_ahead() as on:
        assert on and precompile.active()
        precompile.run(k, (3,), "x", BLOCK=32)
    assert not precompile.active()
    assert k.warmed == [(("x",), (3,), {"BLOCK": 32})] and len(k.launched) == 1


def test_off_with_zero_and_not_nested(ahead):
    with tuning.override(compile_ahead=False), precompile.compiling_ahead() as on:
        assert not on and not precompile.active()
    assert tuning.DEFAULTS.compile_ahead  # on by default
    with precompile.compiling_ahead() as outer:
        with precompile.compiling_ahead() as inner:
            assert outer and not inner and precompile.active()
        assert precompile.active()


def test_no_async_mode_means_no_op(monkeypatch, ahead):
    monkeypatch.setattr(precompile, "_async_mode_class", lambda: None)
    with precompile.compiling_ahead() as on:
        assert not on


def test_failure_inside_is_contained(ahead):
    with pytest.warns(RuntimeWarning, match="compiling ahead failed"):
        with precompile.compiling_ahead():
            raise RuntimeError("compile error")
    assert not precompile.active()


def test_autotuned_launcher_queues_every_pruned_config(monkeypatch, ahead):
    """First sight of a tuning key inside a dry pass: every config the autotuner would time is compiled, nothing is
    launched or recorded as tuned."""
    import triton

    plain = FakeKernel()
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=4, num_stages=3) for m in (16, 32, 64)]

    class Tuned:
        pass

    tuned = Tuned()
    tuned.configs = configs
    tuned.early_config_prune = lambda cfgs, named_args=None, **kw: [c for c in cfgs if c.kwargs["BLOCK_M"] > 16]
    before = dict(flash_fwd._best_configs)
    with precompile.compiling_ahead():
        flash_fwd._call(tuned, plain, lambda meta: (meta["BLOCK_M"], 1), ("q",), {"HEAD_DIM": 64}, 64,
                        None, ("k",))
    assert [(grid, kw["BLOCK_M"]) for _, grid, kw in plain.warmed] == [((32, 1), 32), ((64, 1), 64)]
    assert all(kw["HEAD_DIM"] == 64 and kw["num_warps"] == 4 for _, _, kw in plain.warmed)
    assert not plain.launched and flash_fwd._best_configs == before


def test_direct_launcher_queues_inside(ahead):
    plain = FakeKernel()
    with precompile.compiling_ahead():
        flash_fwd.launch(plain, (4, 2), ("a", 1), {"C": True}, {"BLOCK_M": 64, "num_warps": 4})
    assert plain.warmed == [(("a", 1), (4, 2), {"C": True, "BLOCK_M": 64, "num_warps": 4})]
    assert not plain.launched


def test_compile_ahead_is_inactive_under_the_interpreter(monkeypatch, tune):
    tune(compile_ahead=True)
    monkeypatch.setattr(precompile, "interpreting", lambda: True)
    with precompile.compiling_ahead() as on:
        assert not on


def test_async_mode_refusing_to_start_or_failing_to_finish(monkeypatch, ahead):
    class Busy(FakeMode):
        def __enter__(self):
            raise RuntimeError("Another AsyncCompileMode is already active")

    class Broken(FakeMode):
        def __exit__(self, *exc):
            raise RuntimeError("ptxas failed")

    monkeypatch.setattr(precompile, "_async_mode_class", lambda: Busy)
    with pytest.warns(RuntimeWarning, match="already active"):
        with precompile.compiling_ahead() as on:
            assert not on and not precompile.active()
    monkeypatch.setattr(precompile, "_async_mode_class", lambda: Broken)
    with pytest.warns(RuntimeWarning, match="ptxas failed"):
        with precompile.compiling_ahead() as on:
            assert on
    assert not precompile.active()
