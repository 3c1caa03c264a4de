"""Register ``"hf_efficient"`` with transformers without importing torch or transformers at ``import hf_efficient``.

When transformers is already imported, :func:`register_with_transformers` registers at once. Otherwise it adds a
one-shot finder to ``sys.meta_path`` that registers right after ``import transformers`` has run, so
``attn_implementation="hf_efficient"`` works whichever of the two packages is imported first, and
``import hf_efficient`` (and so the ``hf-efficient`` command line's argument parsing) stays fast.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _register() -> None:
    from .attention.hf_integration import register

    register()


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Finds ``transformers`` through the other finders and registers once its module has been executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        _remove_finder()
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_module_then_register(module):
            exec_module(module)
            _register()

        loader.exec_module = exec_module_then_register
        return spec


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterTransformersImport)]


def register_with_transformers() -> None:
    """Register now if transformers is imported, else as soon as it is (idempotent)."""
    if "transformers" in sys.modules:
        _remove_finder()
        _register()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
