"""Declarative, revertible monkey-patches.

A :class:`Patch` replaces one attribute of one target (a module or class, named by import path) and remembers the
exact original object so that :meth:`Patch.revert` puts it back. A :class:`PatchSet` groups the patches of one named
feature; :data:`REGISTRY` maps feature names to patch sets. The public helpers in :mod:`hf_efficient.patches`
(``apply``, ``revert``, ``applied``) work on names from the registry.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

_MISSING = object()
_lock = threading.RLock()


def _resolve(path: str):
    """Import ``"pkg.mod"`` or ``"pkg.mod:Class.attr"`` and return the object."""
    module_name, _, attr_path = path.partition(":")
    obj = importlib.import_module(module_name)
    for part in filter(None, attr_path.split(".")):
        if isinstance(obj, dict):
            obj = obj[int(part)] if part.isdigit() and int(part) in obj else obj[part]
        else:
            obj = getattr(obj, part)
    return obj


@dataclass
class Patch:
    """Replace ``attr`` on ``target`` with ``replacement``.

    Args:
        target: import path of the owner: ``"transformers.modeling_utils"`` (a module) or
            ``"transformers.modeling_utils:PreTrainedModel"`` (an object inside a module).
        attr: the attribute to replace. It may be absent on the target only if ``allow_missing`` is set.
        replacement: the new object, or a factory ``original -> new object`` when ``wraps`` is set (so the
            replacement can call the original).
        item: the target is a dict and ``attr`` one of its keys (for registries kept in dicts).
    """

    target: str
    attr: str
    replacement: object
    wraps: bool = False
    allow_missing: bool = False
    item: bool = False
    _original: object = field(default=_MISSING, init=False, repr=False)
    _installed: object = field(default=_MISSING, init=False, repr=False)

    @property
    def active(self) -> bool:
        return self._installed is not _MISSING

    def apply(self) -> None:
        """Install the replacement. Applying an active patch again does nothing."""
        with _lock:
            if self.active:
                return
            owner = _resolve(self.target)
            if self.item:
                original = owner.get(self.attr, _MISSING)
            else:
                original = owner.__dict__.get(self.attr, _MISSING) if hasattr(owner, "__dict__") else _MISSING
            if original is _MISSING and not self.item:
                original = getattr(owner, self.attr, _MISSING)
                if original is not _MISSING:
                    # Inherited attribute: record that the owner had none of its own, so revert deletes ours.
                    original = _Inherited(original)
            if original is _MISSING and not self.allow_missing:
                raise AttributeError(f"cannot patch {self.target}.{self.attr}: the attribute does not exist")
            base = original.value if isinstance(original, _Inherited) else original
            new = self.replacement(base) if self.wraps else self.replacement
            if self.item:
                owner[self.attr] = new
            else:
                setattr(owner, self.attr, new)
            self._original, self._installed = original, new

    def revert(self) -> None:
        """Restore the exact original object. Reverting an inactive patch does nothing."""
        with _lock:
            if not self.active:
                return
            owner = _resolve(self.target)
            if self.item:
                if self._original is _MISSING:
                    owner.pop(self.attr, None)
                else:
                    owner[self.attr] = self._original
            elif self._original is _MISSING or isinstance(self._original, _Inherited):
                if self.attr in getattr(owner, "__dict__", {}):
                    delattr(owner, self.attr)
            else:
                setattr(owner, self.attr, self._original)
            self._original, self._installed = _MISSING, _MISSING

    def original(self):
        """The object the patch replaced (only while active)."""
        if isinstance(self._original, _Inherited):
            return self._original.value
        return None if self._original is _MISSING else self._original


@dataclass(frozen=True)
class _Inherited:
    value: object


@dataclass
class PatchSet:
    """The patches of one named feature, applied and reverted together (all or nothing)."""

    name: str
    doc: str
    patches: list[Patch]
    available: Callable[[], str | None] = lambda: None
    on_apply: Callable[[], None] | None = None
    on_revert: Callable[[], None] | None = None

    @property
    def active(self) -> bool:
        return any(p.active for p in self.patches)

    def apply(self) -> None:
        with _lock:
            if self.active:
                return
            reason = self.available()
            if reason:
                raise RuntimeError(f"patch {self.name!r} cannot be applied: {reason}")
            done: list[Patch] = []
            try:
                for p in self.patches:
                    p.apply()
                    done.append(p)
            except Exception:
                for p in reversed(done):
                    p.revert()
                raise
            if self.on_apply is not None:
                self.on_apply()

    def revert(self) -> None:
        with _lock:
            for p in reversed(self.patches):
                p.revert()
            if self.on_revert is not None:
                self.on_revert()


REGISTRY: dict[str, Callable[[], PatchSet]] = {}
_instances: dict[str, PatchSet] = {}


def register(name: str):
    """Decorator registering a factory ``() -> PatchSet`` under ``name`` (built lazily, once)."""

    def deco(factory: Callable[[], PatchSet]):
        REGISTRY[name] = factory
        return factory

    return deco


def get(name: str) -> PatchSet:
    if name not in REGISTRY:
        raise KeyError(f"unknown patch {name!r}; registered patches: {sorted(REGISTRY)}")
    with _lock:
        if name not in _instances:
            _instances[name] = REGISTRY[name]()
        return _instances[name]
