"""The hf-efficient command line."""

import subprocess
import sys

import pytest

from hf_efficient.cli import main


def test_env_runs_and_reports_ops(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "op flash_attention:" in out and "patches:" in out
    assert "op decode_launch:" in out


def test_env_json(capsys, monkeypatch):
    import json

    monkeypatch.setenv("HF_EFFICIENT_GEMV_MAX_M", "1")  # any knob of ours that is set is reported
    monkeypatch.setenv("HF_EFFICIENTLY_UNRELATED", "x")
    assert main(["env", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {"versions", "gpu", "ops", "nvcc"} <= set(rep)
    assert rep["env_vars"]["HF_EFFICIENT_GEMV_MAX_M"] == "1" and "HF_EFFICIENTLY_UNRELATED" not in rep["env_vars"]


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


@pytest.mark.parametrize("argv,flag", [(["bench", "attention", "--sweep"], "--sweep"),
                                       (["bench", "decode", "--with-compile"], "--with-compile")])
def test_bench_flag_of_another_area_is_refused(argv, flag):
    with pytest.raises(SystemExit, match=f"{flag} applies to"):
        main(argv)
