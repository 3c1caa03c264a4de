"""attn_implementation="hf_efficient" against transformers' own implementations on the tiny families (CPU, float32)."""

import logging

import pytest
import torch

import hf_efficient  # noqa: F401  (registers "hf_efficient")
from hf_efficient.attention import compute
from hf_efficient.models.tiny import TINY_FAMILIES, default_attn_implementation, tiny_model

LENGTHS = [21, 13, 17, 5]  # longer and shorter than the sliding window (8)


def _pair(family, seed=0):
    ref = tiny_model(family, attn_implementation=default_attn_implementation(family), seed=seed)
    ours = tiny_model(family, attn_implementation="hf_efficient", seed=seed)
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == "hf_efficient"
    return ref, ours


def _batch(vocab, lengths, left_pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        seq = torch.randint(3, vocab, (n,), generator=g)
        cols = slice(width - n, width) if left_pad else slice(0, n)
        ids[i, cols], mask[i, cols] = seq, 1
    return ids, mask


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("left_pad", [True, False])
def test_padded_logits_match_reference(family, left_pad):
    ref, ours = _pair(family)
    ids, mask = _batch(ref.config.vocab_size, LENGTHS, left_pad)
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = ours(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert torch.isfinite(b[keep]).all()
    assert _rel(b[keep], a[keep]) < 1e-4


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_training_step_loss_and_grads_match(family):
    ref, ours = _pair(family)
    ref.train(), ours.train()
    ids, mask = _batch(ref.config.vocab_size, LENGTHS, left_pad=False, seed=1)
    labels = ids.masked_fill(mask == 0, -100)
    la = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
    lb = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    la.backward(), lb.backward()
    assert abs(la.item() - lb.item()) <= 1e-5 * abs(la.item())
    for (name, pa), pb in zip(ref.named_parameters(), ours.parameters()):
        if pa.grad is None:
            assert pb.grad is None or pb.grad.abs().max() == 0, name
            continue
        assert _rel(pb.grad, pa.grad) < 1e-4, name


@pytest.mark.parametrize("family", [f for f in TINY_FAMILIES if f != "jamba"])
@pytest.mark.parametrize("style", ["position_ids", "cu_seq_lens"])
def test_packed_batch_matches_padded(family, style):
    """Padding-free packing (DataCollatorWithFlattening style) gives the padded batch's logits and grads."""
    _, ours = _pair(family)
    ids, mask = _batch(ours.config.vocab_size, LENGTHS, left_pad=False, seed=2)
    padded = ours(input_ids=ids, attention_mask=mask).logits
    seqs = [ids[i, :n] for i, n in enumerate(LENGTHS)]
    packed_ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    kwargs = {}
    if style == "cu_seq_lens":
        cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
        kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    packed = ours(input_ids=packed_ids, position_ids=position_ids, **kwargs).logits[0]
    expected = torch.cat([padded[i, :n] for i, n in enumerate(LENGTHS)])
    assert _rel(packed, expected) < 1e-4


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen3", "jamba"])
def test_greedy_generation_matches_reference(family):
    ref, ours = _pair(family, seed=3)
    ids, mask = _batch(ref.config.vocab_size, [12, 5, 9], left_pad=True, seed=3)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    a = ref.generate(ids, **kwargs)
    b = ours.generate(ids, **kwargs)
    assert torch.equal(a, b)


def test_output_attentions_raises_clear_error():
    _, ours = _pair("llama")
    ids, mask = _batch(ours.config.vocab_size, [4, 6])
    with pytest.raises(ValueError, match="output_attentions"):
        ours(input_ids=ids, attention_mask=mask, output_attentions=True)


def test_custom_4d_mask_falls_back_to_sdpa_with_one_warning(caplog):
    ref, ours = _pair("llama")
    ids, _ = _batch(ours.config.vocab_size, [6, 6])
    mask4 = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, 1, 6, 6).clone()
    mask4[1, :, :, 0] = False  # a custom pattern no padding mask can express
    compute._warned.discard("a custom 4-D attention mask was given")
    with caplog.at_level(logging.WARNING, logger="hf_efficient.attention.compute"):
        b = ours(input_ids=ids, attention_mask=mask4).logits
        ours(input_ids=ids, attention_mask=mask4)
    a = ref(input_ids=ids, attention_mask=mask4).logits
    assert sum("falling back to SDPA" in r.message for r in caplog.records) == 1
    assert _rel(b, a) < 1e-5


def test_static_cache_generation_matches_dynamic():
    _, ours = _pair("llama", seed=4)
    ids, mask = _batch(ours.config.vocab_size, [7, 3], left_pad=True, seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    a = ours.generate(ids, **kwargs)
    b = ours.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(a, b)


def test_inference_mode_padded_and_packed():
    ref, ours = _pair("llama")
    ids, mask = _batch(ref.config.vocab_size, LENGTHS, left_pad=True)
    with torch.inference_mode():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = ours(input_ids=ids, attention_mask=mask).logits
        packed = ours(input_ids=ids[:1, -LENGTHS[0]:], position_ids=torch.arange(LENGTHS[0])[None]).logits
    keep = mask.bool()
    assert _rel(b[keep], a[keep]) < 1e-4
    assert torch.isfinite(packed).all()
