"""Tiny random models: every family builds, trains a step, generates, and has its features."""

import time

import pytest
import torch

from hf_efficient.models import (
    TINY_FAMILIES,
    TINY_FAMILY_FEATURES,
    TINY_SLIDING_WINDOW,
    default_attn_implementation,
    tiny_config,
    tiny_model,
)


def _ids(seqlen, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (batch, seqlen), generator=g)


def test_families_listed():
    assert TINY_FAMILIES == ("llama", "mistral", "qwen2", "qwen3", "gemma2", "jamba")
    assert set(TINY_FAMILY_FEATURES) == set(TINY_FAMILIES)
    with pytest.raises(ValueError, match="unknown tiny family"):
        tiny_config("gpt2")


def test_shape(tiny_family):
    c = tiny_config(tiny_family)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (64, 4, 2)
    assert c.hidden_size // c.num_attention_heads == 16
    assert getattr(c, "head_dim", 16) == 16
    assert c.vocab_size == 256 and c.max_position_embeddings == 512
    assert 2 <= c.num_hidden_layers <= 4


def test_forward_backward(tiny_family):
    start = time.perf_counter()
    model = tiny_model(tiny_family).train()
    ids = _ids(40)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    elapsed = time.perf_counter() - start
    assert out.logits.shape == (2, 40, 256) and out.logits.dtype == torch.float32
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert elapsed < 10, f"{tiny_family}: build + forward + backward took {elapsed:.1f} s"
    assert model.config._attn_implementation == default_attn_implementation(tiny_family)


def test_generate_with_padding(tiny_family):
    model = tiny_model(tiny_family)
    ids = _ids(12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    ids[1, :3] = 0
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
    )
    assert out.shape == (2, 17)


def test_features_present():
    mistral = tiny_config("mistral")
    assert mistral.sliding_window == TINY_SLIDING_WINDOW
    gemma2 = tiny_config("gemma2")
    assert gemma2.sliding_window == TINY_SLIDING_WINDOW
    assert gemma2.layer_types == ["sliding_attention", "full_attention"]
    assert gemma2.attn_logit_softcapping == 5.0 and gemma2.final_logit_softcapping == 10.0
    assert gemma2.query_pre_attn_scalar != gemma2.head_dim
    for family in ("qwen2", "qwen3"):
        c = tiny_config(family)
        assert c.sliding_window is None and set(c.layer_types) == {"full_attention"}
    assert tiny_model("qwen2").model.layers[0].self_attn.q_proj.bias is not None
    assert hasattr(tiny_model("qwen3").model.layers[0].self_attn, "q_norm")
    jamba = tiny_config("jamba")
    assert jamba.layer_types == ["linear_attention", "full_attention"] * 2  # Mamba, attention, ...
    assert default_attn_implementation("gemma2") == "eager"
    assert default_attn_implementation("llama") == "sdpa"


def test_overrides():
    assert tiny_config("llama", num_hidden_layers=3).num_hidden_layers == 3
    qwen = tiny_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert qwen.layer_types == ["full_attention", "sliding_attention"] and qwen.sliding_window == 8
    assert (
        tiny_config("gemma2", num_hidden_layers=4).layer_types == ["sliding_attention", "full_attention"] * 2
    )


@pytest.mark.parametrize(
    "family, full",
    [("mistral", dict(sliding_window=None)), ("gemma2", dict(layer_types=["full_attention"] * 2))],
)
def test_sliding_window_matters(family, full):
    windowed, unwindowed = tiny_model(family), tiny_model(family, **full)
    with torch.no_grad():
        short = _ids(TINY_SLIDING_WINDOW)
        torch.testing.assert_close(windowed(short).logits, unwindowed(short).logits)
        long = _ids(5 * TINY_SLIDING_WINDOW)
        diff = (windowed(long).logits - unwindowed(long).logits).abs()
    assert diff[:, :TINY_SLIDING_WINDOW].max() < 1e-5  # positions whose window holds every key
    assert diff[:, TINY_SLIDING_WINDOW:].max() > 1e-2


def test_softcap_matters():
    ids = _ids(40)
    with torch.no_grad():
        capped = tiny_model("gemma2")(ids).logits
        uncapped = tiny_model("gemma2", attn_logit_softcapping=None)(ids).logits
    assert (capped - uncapped).abs().max() > 1e-2
    assert capped.abs().max() <= 10.0 + 1e-4  # final_logit_softcapping


def test_attention_is_not_uniform():
    """At initializer_range 0.2 attention maps are peaked, so scale/mask errors change the logits."""
    model = tiny_model("llama", attn_implementation="eager")
    with torch.no_grad():
        attn = model(_ids(40), output_attentions=True).attentions[-1]
    entropy = -(attn.clamp_min(1e-12).log() * attn).sum(-1).mean()
    uniform = torch.log(torch.arange(1, 41, dtype=torch.float32)).mean()
    assert entropy < 0.9 * uniform


def test_seed_and_dtype():
    rng_state = torch.get_rng_state()
    a, b, c = tiny_model("llama", seed=1), tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    assert torch.equal(torch.get_rng_state(), rng_state), "the global RNG must be left alone"
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    half = tiny_model("llama", dtype=torch.float16, seed=1)
    assert half.dtype == torch.float16
    assert torch.equal(half.model.layers[0].self_attn.q_proj.weight, wa.half())
