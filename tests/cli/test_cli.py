"""The hf-efficient command line."""

import dataclasses
import subprocess
import sys

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


def test_env_reports_a_bad_knob_value(capsys, monkeypatch):
    monkeypatch.setattr(tuning, "_current", None)  # read the environment again (restored after the test)
    monkeypatch.setenv("HF_EFFICIENT_GEMV_MAX_M", "many")
    assert main(["env"]) == 2
    assert "HF_EFFICIENT_GEMV_MAX_M='many': expected an integer in 1-16" in capsys.readouterr().err


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
