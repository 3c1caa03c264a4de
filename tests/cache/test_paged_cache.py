"""PagedCache: generation identical to DynamicCache, prefix sharing, crop/reorder, memory accounting, errors."""

import pytest
import torch

import hf_efficient
from hf_efficient import CacheFullError, PagedCache
from hf_efficient.cache.allocator import BlockAllocator
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


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen2"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_greedy_generate_matches_dynamic_cache(family, block_size):
    model = tiny_model(family, attn_implementation="hf_efficient", seed=1)
    ids, mask = _batch([19, 5, 12, 1])
    kw = dict(attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kw)
    cache = PagedCache(model.config, max_tokens=2048, block_size=block_size)
    got = model.generate(ids, past_key_values=cache, **kw)
    assert torch.equal(got, expected)
    stats = cache.memory_stats()
    assert stats["tokens"] == sum(cache.seq_lens) and stats["blocks_used"] * block_size >= stats["tokens"]


def test_right_padded_prompts_match_dynamic_cache():
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=2)
    ids, mask = _batch([9, 4, 7], left=False)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kw)
    got = model.generate(ids, past_key_values=PagedCache(model.config, max_tokens=512, block_size=4), **kw)
    assert torch.equal(got, expected)


def test_pad_tokens_are_not_stored_and_waste_is_bounded():
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=3)
    lengths = [30, 3, 17, 8]
    ids, mask = _batch(lengths)
    cache = PagedCache(model.config, max_tokens=4096, block_size=8)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    assert cache.seq_lens == lengths
    stats = cache.memory_stats()
    assert stats["blocks_used"] == sum(-(-n // 8) for n in lengths)
    assert stats["tokens_stored"] == sum(lengths)


def test_sampling_with_prompt_groups_equals_unshared_and_stores_prompt_once():
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=4)
    ids, mask = _batch([21, 14])
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, num_return_sequences=4, pad_token_id=0)
    torch.manual_seed(0)
    unshared_cache = PagedCache(model.config, max_tokens=4096, block_size=4)
    unshared = model.generate(ids, past_key_values=unshared_cache, **kw)
    torch.manual_seed(0)
    shared_cache = PagedCache(model.config, max_tokens=4096, block_size=4, prompt_group_size=4)
    shared = model.generate(ids, past_key_values=shared_cache, **kw)
    assert torch.equal(shared, unshared)
    s, u = shared_cache.memory_stats(), unshared_cache.memory_stats()
    assert s["tokens"] == u["tokens"]
    # Each prompt's full blocks are stored once instead of four times.
    full_prompt_blocks = 21 // 4 + 14 // 4
    assert u["blocks_used"] - s["blocks_used"] == 3 * full_prompt_blocks


@pytest.mark.quick
def test_fork_copy_on_write_keeps_parent_intact():
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=5)
    ids, mask = _batch([6, 9])
    cache = PagedCache(model.config, max_tokens=512, block_size=4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        cache.fork(2)
        assert cache.batch_size == 4 and cache.seq_blocks[0] == cache.seq_blocks[1]
        layer0 = cache.layers[0]
        shared_last = cache.seq_blocks[0][-1]
        before = layer0.k_pool[shared_last].clone()
        nxt = torch.tensor([[5], [6], [7], [8]])
        mask2 = torch.cat([mask.repeat_interleave(2, 0), torch.ones(4, 1, dtype=torch.long)], 1)
        model(input_ids=nxt, attention_mask=mask2, past_key_values=cache)
    # 6 % 4 != 0: the shared partial block was copied before the write, so the copies diverged safely.
    assert cache.seq_blocks[0][-1] != cache.seq_blocks[1][-1]
    assert cache.seq_blocks[0][0] == cache.seq_blocks[1][0]  # full blocks stay shared
    # the original block kept its first two tokens
    assert torch.equal(layer0.k_pool[shared_last][:2], before[:2])


def test_forked_decoding_matches_independent_prefill():
    model = tiny_model("mistral", attn_implementation="hf_efficient", seed=6)
    ids, mask = _batch([11, 6])
    steps = torch.randint(3, 200, (4, 5))
    with torch.no_grad():
        shared = PagedCache(model.config, max_tokens=1024, block_size=4)
        model(input_ids=ids, attention_mask=mask, past_key_values=shared)
        shared.fork(2)
        ind = PagedCache(model.config, max_tokens=1024, block_size=4)
        model(input_ids=ids.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0), past_key_values=ind)
        m = mask.repeat_interleave(2, 0)
        for t in range(steps.shape[1]):
            m = torch.cat([m, torch.ones(4, 1, dtype=torch.long)], 1)
            a = model(input_ids=steps[:, t : t + 1], attention_mask=m, past_key_values=shared).logits
            b = model(input_ids=steps[:, t : t + 1], attention_mask=m, past_key_values=ind).logits
            torch.testing.assert_close(a, b)


@pytest.mark.quick
def test_crop_rolls_back_and_regenerates_identically():
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=7)
    ids, mask = _batch([8, 5])
    cache = PagedCache(model.config, max_tokens=512, block_size=4)
    extra = torch.randint(3, 200, (2, 6))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        used_before = cache.allocator.num_used
        m = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
        first = model(input_ids=extra, attention_mask=m, past_key_values=cache).logits
        cache.crop(-6)
        assert cache.get_seq_length() == ids.shape[1] and cache.seq_lens == [8, 5]
        assert cache.allocator.num_used == used_before
        again = model(input_ids=extra, attention_mask=m, past_key_values=cache).logits
    torch.testing.assert_close(again, first)


@pytest.mark.quick
def test_reorder_and_select():
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=8)
    ids, mask = _batch([7, 3, 5])
    cache = PagedCache(model.config, max_tokens=512, block_size=4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    blocks = [list(b) for b in cache.seq_blocks]
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert cache.seq_lens == [5, 7, 7] and cache.seq_blocks == [blocks[2], blocks[0], blocks[0]]
    assert all(cache.allocator.refcount(b) == 2 for b in blocks[0])
    assert all(cache.allocator.refcount(b) == 0 for b in blocks[1])  # sequence 1 was dropped: blocks freed
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.seq_lens == [7] and all(cache.allocator.refcount(b) == 1 for b in blocks[0])


@pytest.mark.quick
def test_out_of_blocks_raises_and_leaves_data_intact():
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=9)
    ids, mask = _batch([8, 8])
    cache = PagedCache(model.config, num_blocks=4, block_size=4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)  # exactly 4 blocks
        pools = [layer.k_pool.clone() for layer in cache.layers]
        state = (list(cache.seq_lens), [list(b) for b in cache.seq_blocks], cache.get_seq_length())
        m = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        with pytest.raises(CacheFullError, match=r"needs 2 block\(s\).*only 0 are free"):
            model(input_ids=torch.tensor([[5], [6]]), attention_mask=m, past_key_values=cache)
    assert (list(cache.seq_lens), [list(b) for b in cache.seq_blocks], cache.get_seq_length()) == state
    assert all(torch.equal(p, layer.k_pool) for p, layer in zip(pools, cache.layers))


def test_requires_hf_efficient_attention():
    model = tiny_model("llama", attn_implementation="sdpa", seed=0)
    ids, mask = _batch([4, 4])
    with pytest.raises(RuntimeError, match="hf_efficient"):
        model(input_ids=ids, attention_mask=mask, past_key_values=PagedCache(model.config, max_tokens=64))


@pytest.mark.quick
def test_bad_arguments():
    cfg = tiny_model("llama").config
    with pytest.raises(ValueError, match="block_size"):
        PagedCache(cfg, max_tokens=64, block_size=12)
    with pytest.raises(ValueError, match="exactly one"):
        PagedCache(cfg)
    with pytest.raises(ValueError, match="attention layers"):
        PagedCache(tiny_model("jamba").config, max_tokens=64)


@pytest.mark.quick
def test_allocator_refcounts():
    a = BlockAllocator(4, 16)
    x = a.allocate(3)
    a.incref(x[:1])
    a.release(x)
    assert a.num_free == 3 and a.refcount(x[0]) == 1
    with pytest.raises(CacheFullError):
        a.allocate(4)
    a.release(x[:1])
    with pytest.raises(RuntimeError, match="released"):
        a.release(x[:1])


def test_top_level_exports():
    assert hf_efficient.PagedCache is PagedCache
