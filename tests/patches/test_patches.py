"""Patch core: apply/revert restore the exact original objects, double apply is harmless."""

import types

import pytest

import hf_efficient
from hf_efficient import patches
from hf_efficient.patches.core import Patch, PatchSet, _resolve


def _snapshot(ps: PatchSet):
    """(owner, attr, object currently installed or MISSING-marker) for every patch of a set."""
    out = []
    for p in ps.patches:
        owner = _resolve(p.target)
        if p.item:
            out.append((p.target, p.attr, owner.get(p.attr, "<missing>")))
        else:
            out.append((p.target, p.attr, owner.__dict__.get(p.attr, "<missing>")))
    return out


@pytest.mark.parametrize("name", patches.available())
def test_every_registered_patch_reverts_to_exact_originals(name):
    ps = patches.get(name)
    before = _snapshot(ps)
    patches.apply(name)
    patches.apply(name)  # double apply is harmless
    during = _snapshot(ps)
    assert name in patches.active()
    assert all(b[2] is not d[2] for b, d in zip(before, during)), "apply() must replace every target"
    patches.revert(name)
    patches.revert(name)  # double revert is harmless
    after = _snapshot(ps)
    assert all(b[2] is a[2] for b, a in zip(before, after))
    assert name not in patches.active()


@pytest.mark.parametrize("name", patches.available())
def test_context_manager_reverts_on_error(name):
    ps = patches.get(name)
    before = _snapshot(ps)
    with pytest.raises(RuntimeError, match="boom"):
        with patches.applied(name):
            assert ps.active
            raise RuntimeError("boom")
    assert all(b[2] is a[2] for b, a in zip(before, _snapshot(ps)))


def test_applied_leaves_previously_applied_patch_active():
    patches.apply("flash_attention_2")
    try:
        with patches.applied("flash_attention_2"):
            pass
        assert "flash_attention_2" in patches.active()
    finally:
        patches.revert("flash_attention_2")


def test_patch_on_module_attribute_and_missing_attribute():
    mod = types.ModuleType("hfe_test_mod")
    import sys

    sys.modules["hfe_test_mod"] = mod
    try:
        mod.f = original = lambda: 1
        p = Patch("hfe_test_mod", "f", lambda orig: (lambda: orig() + 1), wraps=True)
        p.apply()
        assert mod.f() == 2 and p.original() is original
        p.revert()
        assert mod.f is original
        with pytest.raises(AttributeError, match="does not exist"):
            Patch("hfe_test_mod", "nope", 1).apply()
        q = Patch("hfe_test_mod", "new", 5, allow_missing=True)
        q.apply()
        assert mod.new == 5
        q.revert()
        assert not hasattr(mod, "new")
    finally:
        del sys.modules["hfe_test_mod"]


def test_inherited_attribute_is_deleted_on_revert():
    class Base:
        def f(self):
            return "base"

    class Child(Base):
        pass

    import sys

    mod = types.ModuleType("hfe_test_mod2")
    mod.Child = Child
    sys.modules["hfe_test_mod2"] = mod
    try:
        p = Patch("hfe_test_mod2:Child", "f", lambda self: "patched")
        p.apply()
        assert Child().f() == "patched"
        p.revert()
        assert "f" not in Child.__dict__ and Child().f() == "base"
    finally:
        del sys.modules["hfe_test_mod2"]


def test_patch_set_is_all_or_nothing():
    import sys

    mod = types.ModuleType("hfe_test_mod3")
    mod.a = a = object()
    sys.modules["hfe_test_mod3"] = mod
    try:
        ps = PatchSet("t", "", [Patch("hfe_test_mod3", "a", 1), Patch("hfe_test_mod3", "missing", 2)])
        with pytest.raises(AttributeError):
            ps.apply()
        assert mod.a is a and not ps.active
    finally:
        del sys.modules["hfe_test_mod3"]


def test_unknown_patch_name_and_bad_options():
    with pytest.raises(KeyError, match="unknown patch"):
        patches.apply("nope")
    with pytest.raises(TypeError):
        patches.apply("flash_attention_2", colour="red")


def test_flash_attention_2_patch_routes_lazy_imports_to_ours():
    from transformers import modeling_flash_attention_utils as fa_utils

    with patches.applied("flash_attention_2", prefer_ours=True):
        fns = fa_utils._lazy_imports("flash_attention_2")
        from hf_efficient.attention import flash_api

        assert fns[0] is flash_api.flash_attn_func and fns[1] is flash_api.flash_attn_varlen_func
        assert fa_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2]["general_availability_check"]()
    assert hf_efficient.patches.active() == []
