"""The hf-efficient command line."""

import dataclasses
import subprocess
import sys
import time

import pytest

from hf_efficient import tuning
from hf_efficient.cli import main


def test_env_runs_and_reports_ops(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "op flash_attention:" in out and "patches:" in out
    assert "op decode_launch:" in out


def test_env_json(capsys, monkeypatch, tune):
    import json

    tune(gemv_max_m=1)  # every knob is reported, with where its value came from
    monkeypatch.setenv("HF_EFFICIENTLY_UNRELATED", "x")
    assert main(["env", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {"versions", "gpu", "ops", "nvcc", "tuning"} <= set(rep)
    knobs = {row["name"]: row for row in rep["tuning"]}
    assert set(knobs) == {f.name for f in dataclasses.fields(tuning.Tuning)}
    assert knobs["gemv_max_m"] == {**knobs["gemv_max_m"], "value": "1", "default": "2", "source": "override",
                                   "env": "HF_EFFICIENT_GEMV_MAX_M", "audience": "developer"}
    assert knobs["pdl"]["audience"] == "user" and knobs["pdl"]["default"] == "1"
    assert "HF_EFFICIENTLY_UNRELATED" not in rep["env_vars"]


def test_env_prints_every_knob_and_flags_unknown_variables(capsys, monkeypatch, tune):
    tune(paged_decode_backend="reference")
    monkeypatch.setenv("HF_EFFICIENT_GEMV_ROW_PARALLEL", "1")  # retired: reported, not read
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(tuning.Tuning):
        assert f.metadata["env"] in out, f.name
    line = next(x for x in out.splitlines() if x.split()[:1] == ["paged_decode_backend"])
    assert line.split()[1:5] == ["reference", "auto", "override", "user"]
    assert "op paged_decode: reference -- forced by the paged_decode_backend knob" in out
    assert "not knobs (misspelt or retired; ignored): HF_EFFICIENT_GEMV_ROW_PARALLEL" in out


@pytest.mark.quick
def test_env_reports_a_bad_knob_value(capsys, monkeypatch):
    monkeypatch.setattr(tuning, "_current", None)  # read the environment again (restored after the test)
    monkeypatch.setenv("HF_EFFICIENT_GEMV_MAX_M", "many")
    assert main(["env"]) == 2
    assert "HF_EFFICIENT_GEMV_MAX_M='many': expected an integer in 1-16" in capsys.readouterr().err


@pytest.mark.quick
@pytest.mark.parametrize(
    "argv",
    [
        ["generate"],
        ["generate", "hi", "--max-new-tokens", "0"],
        ["generate", "hi", "--temperature", "-1"],
        ["bench", "nope"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv):
    proc = subprocess.run([sys.executable, "-m", "hf_efficient.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0]


@pytest.mark.slow
def test_generate_smollm2_eight_tokens():
    proc = subprocess.run(
        [sys.executable, "-m", "hf_efficient.cli", "generate", "--max-new-tokens", "8", "Hi"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "no generated text"
    assert "tokens/s" in proc.stderr


@pytest.mark.quick
@pytest.mark.parametrize("argv,flag", [(["bench", "attention", "--sweep"], "--sweep"),
                                       (["bench", "decode", "--with-compile"], "--with-compile")])
def test_bench_flag_of_another_area_is_refused(argv, flag, capsys):
    assert main(argv) == 1
    _assert_one_error_line(capsys.readouterr().err, f"{flag} applies to")


def _cli(*argv, **kwargs):
    return subprocess.run([sys.executable, "-m", "hf_efficient.cli", *argv], capture_output=True, text=True,
                          **kwargs)


def _assert_one_error_line(err: str, text: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and "error" in lines[0] and text in lines[0], err


def _best_of(n: int, argv: list[str]) -> float:
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True)
        best = min(best, time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr
    return best


@pytest.mark.quick
def test_help_answers_about_as_fast_as_a_bare_python():
    """--help parses arguments before importing torch or transformers (which take seconds)."""
    bare = _best_of(3, [sys.executable, "-c", "pass"])
    helped = _best_of(3, [sys.executable, "-m", "hf_efficient.cli", "--help"])
    assert helped < 3 * bare + 0.5, (helped, bare)


@pytest.mark.quick
def test_parsing_imports_neither_torch_nor_transformers():
    code = ("import sys; from hf_efficient.cli import build_parser; "
            "build_parser().parse_args(['generate', 'hi']); "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


@pytest.mark.quick
def test_no_command_prints_the_usage_and_the_commands():
    proc = _cli()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "usage: hf-efficient" in proc.stderr
    for command in ("env", "generate", "bench"):
        assert f"    {command} " in proc.stderr, proc.stderr


@pytest.mark.quick
@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_refused(prompt):
    proc = _cli("generate", prompt)
    assert proc.returncode == 2
    _assert_one_error_line(proc.stderr, "the prompt is empty")


@pytest.mark.quick
def test_missing_model_directory_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["generate", "hi", "--model", str(missing)]) == 1
    _assert_one_error_line(capsys.readouterr().err, f"--model {missing}: no such file or directory")


def test_model_directory_without_config_is_one_line(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path), "--device", "cpu"]) == 1
    _assert_one_error_line(capsys.readouterr().err, "without config.json")


def test_debug_shows_the_traceback(tmp_path):
    from hf_efficient.cli import UserError

    with pytest.raises(UserError, match="no such file or directory"):
        main(["generate", "hi", "--model", str(tmp_path / "nope"), "--debug"])
    with pytest.raises(UserError):
        main(["--debug", "generate", "hi", "--model", str(tmp_path / "nope")])


@pytest.mark.quick
@pytest.mark.parametrize("area", ["attention", "decode", "generate", "sft_parity"])
def test_gpu_benchmark_without_a_gpu_is_one_line(area, monkeypatch, capsys, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", area]) == 1
    _assert_one_error_line(capsys.readouterr().err, f"the {area} benchmark needs a CUDA GPU")
    assert not any(tmp_path.iterdir())


def test_unexpected_error_is_one_line_with_a_hint(monkeypatch, capsys):
    from hf_efficient import cli

    def boom(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "_cmd_env", boom)
    assert main(["env"]) == 1
    _assert_one_error_line(capsys.readouterr().err, "RuntimeError: something broke (--debug shows the traceback)")


def test_bench_memory_writes_under_hf_efficient_bench_by_default(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "memory", "--quick"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_efficient_bench"]
    assert (tmp_path / "hf_efficient_bench" / "memory.json").is_file()
    assert main(["bench", "memory", "--quick", "--out", "elsewhere"]) == 0
    assert (tmp_path / "elsewhere" / "memory.json").is_file()


def test_bench_help_names_the_default_output(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "./hf_efficient_bench" in " ".join(capsys.readouterr().out.split())
