"""PagedCache state: failing operations change nothing; crop removes positions of the padded batch (as
DynamicCache.crop does); bad indices and sizes give clear errors."""

import copy

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from hf_efficient import CacheFullError, PagedCache
from hf_efficient.models.tiny import tiny_model


def _batch(lengths, vocab=200, left=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[i, cols] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, cols] = 1
    return ids, mask


def _state(cache):
    a = cache.allocator
    return copy.deepcopy(
        (
            cache.seq_blocks,
            cache.seq_lens,
            cache.padded_len,
            getattr(cache, "seq_pads", None),
            cache.prompt_group_size,
            a.free_blocks(),
            [a.refcount(b) for b in range(a.num_blocks)],
        )
    )


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", attn_implementation="hf_efficient", seed=11)


def test_cache_full_on_first_prefill_leaves_cache_empty_and_retry_works(model):
    ids, mask = _batch([8, 8])
    cache = PagedCache(model.config, num_blocks=3, block_size=4)
    before = _state(cache)
    with torch.no_grad(), pytest.raises(CacheFullError):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    assert _state(cache) == before
    with torch.no_grad():  # a smaller batch fits: the failed step left nothing behind
        model(input_ids=ids[:1], attention_mask=mask[:1], past_key_values=cache)
    assert cache.seq_lens == [8]
    cache.blocks.check_refcounts(cache.seq_blocks)


def test_cache_full_on_later_step_changes_nothing(model):
    ids, mask = _batch([8, 6])
    cache = PagedCache(model.config, num_blocks=4, block_size=4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        before = _state(cache)
        m = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
        with pytest.raises(CacheFullError):
            model(input_ids=torch.randint(3, 200, (2, 3)), attention_mask=m, past_key_values=cache)
    assert _state(cache) == before


def test_grouped_first_step_failures_change_nothing(model):
    ids, mask = _batch([9, 9])
    ids, mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    cache = PagedCache(model.config, num_blocks=4, block_size=4, prompt_group_size=2)  # needs 2 groups x 3 blocks
    before = _state(cache)
    with torch.no_grad(), pytest.raises(CacheFullError):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    assert _state(cache) == before
    odd = PagedCache(model.config, num_blocks=64, block_size=4, prompt_group_size=2)
    before = _state(odd)
    with torch.no_grad(), pytest.raises(ValueError, match="does not divide"):
        model(input_ids=ids[:3], attention_mask=mask[:3], past_key_values=odd)
    assert _state(odd) == before
    with torch.no_grad():  # the same cache serves a valid batch afterwards
        model(input_ids=ids, attention_mask=mask, past_key_values=odd)
    assert odd.seq_lens == [9, 9, 9, 9]
    odd.blocks.check_refcounts(odd.seq_blocks)


def test_bad_indices_raise_and_change_nothing(model):
    ids, mask = _batch([7, 3])
    cache = PagedCache(model.config, max_tokens=256, block_size=4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    before = _state(cache)
    for bad in ([5], [-1], [0, 2]):
        with pytest.raises(IndexError, match=str(bad[-1])):
            cache.free(bad)
        assert _state(cache) == before
    with pytest.raises(IndexError, match="3"):
        cache.reorder_cache(torch.tensor([0, 3]))
    with pytest.raises(IndexError, match="-1"):
        cache.batch_select_indices(torch.tensor([-1]))
    with pytest.raises(ValueError, match="n >= 1"):
        cache.fork(0)
    with pytest.raises(TypeError, match="n must be an int"):
        cache.fork(1.5)
    with pytest.raises(TypeError, match="indices"):
        cache.free([0.0])
    assert _state(cache) == before
    cache.free([1])
    assert cache.seq_lens == [7]
    cache.blocks.check_refcounts(cache.seq_blocks)


def test_float_sizes_name_the_argument():
    cfg = tiny_model("llama").config
    with pytest.raises(TypeError, match="max_tokens"):
        PagedCache(cfg, max_tokens=64.0)
    with pytest.raises(TypeError, match="block_size"):
        PagedCache(cfg, max_tokens=64, block_size=16.0)
    with pytest.raises(TypeError, match="num_blocks"):
        PagedCache(cfg, num_blocks=2.5)
    with pytest.raises(ValueError, match="num_blocks"):
        PagedCache(cfg, num_blocks=0)
    assert PagedCache(cfg, max_tokens=np.int64(64), block_size=np.int32(16)).num_blocks == 4


def test_crop_after_right_padded_prefill_keeps_real_tokens(model):
    ids, mask = _batch([8, 5], left=False)
    cache = PagedCache(model.config, max_tokens=256, block_size=4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    cache.crop(-2)  # positions 6 and 7: two real tokens of row 0, padding of row 1
    assert cache.get_seq_length() == 6 and cache.seq_lens == [6, 5]
    cache.crop(5)  # legacy form: keep 5 positions
    assert cache.get_seq_length() == 5 and cache.seq_lens == [5, 5]
    cache.crop(-1)
    assert cache.seq_lens == [4, 4]
    cache.blocks.check_refcounts(cache.seq_blocks)


@pytest.mark.parametrize("left", [False, True])
def test_crop_matches_dynamic_cache(model, left):
    """Assisted decoding's rollback: prefill, append candidates, crop the rejected ones, continue."""
    ids, mask = _batch([8, 5, 2], left=left, seed=3)
    g = torch.Generator().manual_seed(4)
    steps = [torch.randint(3, 200, (3, n), generator=g) for n in (1, 4, 3)]
    crops = [0, -3, -2]
    logits = {}
    for name in ("paged", "dynamic"):
        cache = PagedCache(model.config, max_tokens=512, block_size=4) if name == "paged" else DynamicCache()
        m = mask
        out = []
        with torch.no_grad():
            model(input_ids=ids, attention_mask=m, past_key_values=cache)
            for new, k in zip(steps, crops):
                if k:
                    cache.crop(k)
                    m = m[:, :k]
                m = torch.cat([m, torch.ones(3, new.shape[1], dtype=torch.long)], 1)
                out.append(model(input_ids=new, attention_mask=m, past_key_values=cache).logits)
        assert cache.get_seq_length() == m.shape[1]
        logits[name] = out
    for a, b in zip(logits["paged"], logits["dynamic"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
