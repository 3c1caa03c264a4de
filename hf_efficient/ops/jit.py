"""Build CUDA C++ extensions at first use (FlashInfer-style JIT).

A :class:`JitSpec` names the sources of one extension and the flags to build it with. The first
call that needs it builds it with ``nvcc`` (kernels) and the host C++ compiler (the torch binding),
driven by ``ninja`` when it is installed, under a file lock, into a versioned cache directory::

    $HF_EFFICIENT_CACHE (the ``cache`` knob) or $XDG_CACHE_HOME/hf_efficient or ~/.cache/hf_efficient
        /<hf_efficient version>/<sm_XY>/<name>_<hash>/<name>.so   (+ build.ninja, build.log)

The hash covers the sources, the flags and the torch version, so an edited source or another
torch gets its own build. The library registers its operators with ``TORCH_LIBRARY`` and is loaded
with ``torch.ops.load_library``.

Knobs (:mod:`hf_efficient.tuning`):
    disable_jit (HF_EFFICIENT_DISABLE_JIT=1)   never compile; use a build already in the cache, else fall back.
    jit_verbose (HF_EFFICIENT_JIT_VERBOSE=1)   show the compiler output (``-Xptxas -v`` register/spill report).

Importing this module compiles nothing and never initialises CUDA.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import tuning
from .._version import __version__


def _csrc_dir() -> Path:
    """csrc/ ships as the package hf_efficient.csrc; a source checkout has it beside the package."""
    here = Path(__file__).resolve()
    candidates = [here.parents[1] / "csrc", here.parents[2] / "csrc"]
    try:
        spec = importlib.util.find_spec("hf_efficient.csrc")
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(p) for p in spec.submodule_search_locations]
    except (ImportError, ValueError):
        pass
    for c in candidates:
        if c.is_dir() and any(c.glob("*.cu")):
            return c
    return candidates[0]


CSRC_DIR = _csrc_dir()


def jit_disabled() -> bool:
    """True when the ``disable_jit`` knob (HF_EFFICIENT_DISABLE_JIT) forbids compiling."""
    return tuning.get().disable_jit


def jit_verbose() -> bool:
    """True when the ``jit_verbose`` knob (HF_EFFICIENT_JIT_VERBOSE) asks to show compiler output."""
    return tuning.get().jit_verbose


def cache_root() -> Path:
    """Root of hf_efficient's cache: the ``cache`` knob (HF_EFFICIENT_CACHE), else $XDG_CACHE_HOME/hf_efficient,
    else ~/.cache/hf_efficient."""
    explicit = tuning.get().cache
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hf_efficient"


def arch_tag(capability: tuple[int, int]) -> str:
    """``(9, 0) -> "sm_90"``."""
    return f"sm_{capability[0]}{capability[1]}"


def find_nvcc() -> str | None:
    """Path of nvcc: $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin; None if absent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def find_cxx() -> str | None:
    """Host C++ compiler: $CXX, else c++ or g++ on PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    return shutil.which("c++") or shutil.which("g++")


@dataclass(frozen=True)
class Unit:
    """One object file: a source under csrc/ and the macros it is compiled with."""

    source: str
    defines: tuple[str, ...] = ()

    @property
    def obj_name(self) -> str:
        tag = "_".join(d.replace("=", "").lower() for d in self.defines)
        return Path(self.source).stem + (f"_{tag}" if tag else "") + ".o"


@dataclass(frozen=True)
class JitSpec:
    """What to build: CUDA units (nvcc), host units (C++ against torch), and flags."""

    name: str
    cuda_units: tuple[Unit, ...]
    host_units: tuple[Unit, ...]
    headers: tuple[str, ...] = ()
    cuda_flags: tuple[str, ...] = ("-O3", "-std=c++17", "-lineinfo", "-Xptxas=-v")
    host_flags: tuple[str, ...] = ("-O2", "-std=c++20")
    source_dir: Path | None = None  # default: the package's csrc/

    @property
    def src(self) -> Path:
        return Path(self.source_dir) if self.source_dir is not None else CSRC_DIR

    # -- locations ------------------------------------------------------------------------------
    def digest(self) -> str:
        import torch

        h = hashlib.sha256()
        for rel in sorted({u.source for u in self.cuda_units + self.host_units} | set(self.headers)):
            h.update(rel.encode())
            h.update((self.src / rel).read_bytes())
        h.update(repr((self.cuda_units, self.host_units, self.cuda_flags, self.host_flags)).encode())
        h.update(torch.__version__.encode())
        return h.hexdigest()[:12]

    def build_dir(self, arch: str) -> Path:
        return cache_root() / __version__ / arch / f"{self.name}_{self.digest()}"

    def library_path(self, arch: str) -> Path:
        return self.build_dir(arch) / f"{self.name}.so"

    def is_built(self, arch: str) -> bool:
        return self.library_path(arch).is_file()

    # -- build ----------------------------------------------------------------------------------
    def commands(self, arch: str, nvcc: str, cxx: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
        """(object path, compile command) pairs and the link command."""
        import torch
        from torch.utils import cpp_extension

        bdir = self.build_dir(arch)
        num = arch.split("_", 1)[1]
        gencode = f"-gencode=arch=compute_{num},code=sm_{num}"
        compiles = []
        for u in self.cuda_units:
            out = str(bdir / u.obj_name)
            cmd = [nvcc, gencode, *self.cuda_flags, f"-ccbin={cxx}", "-Xcompiler", "-fPIC", f"-I{self.src}"]
            cmd += [f"-D{d}" for d in u.defines] + ["-c", str(self.src / u.source), "-o", out]
            compiles.append((out, cmd))
        abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
        incs = [f"-I{p}" for p in cpp_extension.include_paths()]
        for u in self.host_units:
            out = str(bdir / u.obj_name)
            cmd = [cxx, *self.host_flags, "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{self.src}", *incs]
            cmd += [f"-D{d}" for d in u.defines] + ["-x", "c++", "-c", str(self.src / u.source), "-o", out]
            compiles.append((out, cmd))
        torch_lib = cpp_extension.library_paths()[0]
        tmp = str(self.library_path(arch)) + ".tmp"  # renamed into place once linked
        # nvcc drives the link: it knows where its static CUDA runtime lives.
        link = [nvcc, "-shared", "--cudart=static", f"-ccbin={cxx}", "-o", tmp, *(o for o, _ in compiles)]
        link += [f"-L{torch_lib}", f"-Xlinker=-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"]
        return compiles, link

    def _write_ninja(self, bdir: Path, compiles, link, target: str) -> Path:
        def esc(path: str) -> str:
            return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

        lines = ["ninja_required_version = 1.3", "rule run", "  command = $cmd", "  description = $desc", ""]
        for out, cmd in compiles:
            lines += [f"build {esc(out)}: run", f"  cmd = {shlex.join(cmd)}", f"  desc = compile {Path(out).name}"]
        objs = " ".join(esc(o) for o, _ in compiles)
        lines += [f"build {esc(target)}: run {objs}", f"  cmd = {shlex.join(link)}", "  desc = link", ""]
        path = bdir / "build.ninja"
        path.write_text("\n".join(lines))
        return path

    def build(self, arch: str, verbose: bool = False) -> Path:
        """Compile and link into the cache (under a file lock). Raises BuildError with the log."""
        from filelock import FileLock

        nvcc, cxx = find_nvcc(), find_cxx()
        if nvcc is None:
            raise BuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        if cxx is None:
            raise BuildError("no host C++ compiler found (set CXX)")
        bdir = self.build_dir(arch)
        bdir.mkdir(parents=True, exist_ok=True)
        lib = self.library_path(arch)
        with FileLock(str(bdir.parent / f"{bdir.name}.lock")):
            if lib.is_file():  # built by another process while we waited
                return lib
            compiles, link = self.commands(arch, nvcc, cxx)
            ninja = shutil.which("ninja")
            if ninja:
                self._write_ninja(bdir, compiles, link, str(lib) + ".tmp")
                runs = [[ninja, "-C", str(bdir), "-v"]]
            else:
                runs = [cmd for _, cmd in compiles] + [link]
            log = []
            for cmd in runs:
                proc = subprocess.run(cmd, cwd=bdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                log.append(proc.stdout)
                if verbose:
                    sys.stderr.write(proc.stdout)
                if proc.returncode != 0:
                    (bdir / "build.log").write_text("".join(log))
                    raise BuildError(first_error_line("".join(log)), "".join(log))
            (bdir / "build.log").write_text("".join(log))
            os.replace(str(lib) + ".tmp", lib)
        return lib


class BuildError(RuntimeError):
    """A JIT build failed; ``args[0]`` is the first error line, ``log`` the whole output."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


def first_error_line(log: str) -> str:
    """The first line of a compiler log that names an error (else its last non-empty line)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for ln in lines:
        low = ln.lower()
        if "error" in low and not low.startswith("ninja: build stopped"):
            return ln[:300]
    return lines[-1][:300] if lines else "unknown build error"


class Extension:
    """Lazily built, loaded once per process; remembers why it is unavailable."""

    def __init__(self, spec: JitSpec, namespace: str):
        self.spec = spec
        self.namespace = namespace
        self._ops = None
        self._failure: str | None = None

    def _arch(self, device=None) -> str:
        import torch

        return arch_tag(torch.cuda.get_device_capability(device))

    def status(self, device=None) -> tuple[bool, str]:
        """(usable, reason) without building anything."""
        import torch

        if self._ops is not None:
            return True, "loaded"
        if self._failure is not None:
            return False, self._failure
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        missing = [u.source for u in self.spec.cuda_units if not (self.spec.src / u.source).is_file()]
        if missing:
            return False, f"CUDA sources not found ({', '.join(sorted(set(missing)))})"
        arch = self._arch(device)
        if self.spec.is_built(arch):
            return True, f"prebuilt in {self.spec.build_dir(arch)}"
        if jit_disabled():
            return False, "JIT disabled (HF_EFFICIENT_DISABLE_JIT=1) and no prebuilt library in the cache"
        if find_nvcc() is None:
            return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        return True, f"will be built at first use into {self.spec.build_dir(arch)}"

    def load(self, device=None):
        """torch.ops.<namespace>, building first if needed; None (with the reason kept) if unusable."""
        if self._ops is not None or self._failure is not None:
            return self._ops
        import torch

        ok, reason = self.status(device)
        if not ok:
            self._failure = reason
            return None
        arch = self._arch(device)
        try:
            lib = self.spec.library_path(arch)
            if not lib.is_file():
                lib = self.spec.build(arch, verbose=jit_verbose())
            torch.ops.load_library(str(lib))
            self._ops = getattr(torch.ops, self.namespace)
        except BuildError as exc:
            self._failure = f"build failed: {exc.args[0]}"
        except Exception as exc:  # loading can fail on a broken toolchain; never kill the run
            self._failure = f"load failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return self._ops

    @property
    def failure(self) -> str | None:
        return self._failure
