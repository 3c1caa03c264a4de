"""The decode engine (eager path on CPU) against transformers' generate with the same attention."""

import pytest
import torch

import hf_efficient
from hf_efficient.generation.engine import DecodeEngine
from hf_efficient.generation.hf_generate import engine_generate
from hf_efficient.generation.llm import LLM
from hf_efficient.generation.sampling import SamplingParams
from hf_efficient.models.tiny import tiny_model


def _prompts(lengths, vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf_greedy(model, prompt, new):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_greedy_matches_hf_generate_mixed_lengths(family):
    model = tiny_model(family, attn_implementation="hf_efficient", seed=1)
    prompts = _prompts([3, 17, 9, 1, 25])
    engine = DecodeEngine(model, max_batch=8, max_tokens=4096, block_size=4, sync_every=5)
    groups = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24))
    for prompt, (req,) in zip(prompts, groups):
        assert req.output == _hf_greedy(model, prompt, 24)
        assert req.finish_reason == "length" and len(req.logprobs) == 24


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_long_prompts_are_prefilled_in_chunks(family):
    """Prompts longer than prefill_tokens are prefilled chunk by chunk (each chunk attends to the cached ones):
    greedy output equal to transformers' (Mistral's sliding window spans chunk boundaries)."""
    over = {"sliding_window": 12} if family == "mistral" else {}
    model = tiny_model(family, attn_implementation="hf_efficient", seed=4, **over)
    prompts = _prompts([61, 5, 40], seed=6)
    engine = DecodeEngine(model, max_batch=4, max_tokens=4096, block_size=4, prefill_tokens=16, sync_every=4)
    groups = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10))
    for prompt, (req,) in zip(prompts, groups):
        assert req.output == _hf_greedy(model, prompt, 10)
    assert engine.stats.prefill_tokens == 61 + 5 + 40


def test_decode_crosses_a_context_class():
    """Steps are captured per context-length class (256, 1024, ...): a sequence growing past 256 keys switches class
    mid-generation, next to a short one, and still matches transformers."""
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=9)
    prompts = _prompts([250, 6], seed=9)
    engine = DecodeEngine(model, max_batch=2, max_tokens=2048, block_size=8, sync_every=4)
    seen, context_class = set(), engine.runner.context_class
    engine.runner.context_class = lambda b, longest: seen.add(context_class(b, longest)) or context_class(b, longest)
    groups = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12))
    for prompt, (req,) in zip(prompts, groups):
        assert req.output == _hf_greedy(model, prompt, 12)
    assert seen == {256, 1024}


def test_peft_lora_model_matches_hf_generate():
    """A PEFT LoRA model (adapters with non-zero weights) generates what transformers' generate does with it."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=8)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # LoRA B starts at zero: make the adapters change the output
    lora.eval()
    prompts = _prompts([6, 13], seed=8)
    engine = DecodeEngine(lora, max_batch=4, max_tokens=1024, block_size=4)
    groups = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12))
    with lora.disable_adapter():
        base = [_hf_greedy(lora, p, 12) for p in prompts]
    for prompt, (req,) in zip(prompts, groups):
        assert req.output == _hf_greedy(lora, prompt, 12)
    assert [g[0].output for g in groups] != base  # the adapters were in effect


def test_continuous_batching_more_requests_than_slots_and_preemption():
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=2)
    prompts = _prompts([5, 12, 7, 3, 9, 14, 6, 2], seed=2)
    # 4 slots for 8 requests; a small cache forces preemption mid-generation.
    engine = DecodeEngine(model, max_batch=4, max_tokens=96, block_size=4, sync_every=3)
    groups = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    assert engine.stats.preemptions > 0
    for prompt, (req,) in zip(prompts, groups):
        assert req.output == _hf_greedy(model, prompt, 16)
    assert engine.cache.allocator.num_used == 1  # only the scratch block is left


@pytest.mark.parametrize("max_tokens", [1024, 80])  # 80: a preemption
def test_run_ahead_steps_change_nothing(max_tokens):
    """A step queued before the host reads the window (run_ahead) gives the same tokens, logprobs and finish
    reasons: requests stopping on an end token mid-window, different max_tokens, seeded sampling, more requests
    than slots (admission after a run-ahead step) and preemption."""
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=5)
    prompts = _prompts([5, 12, 7, 3, 9, 14, 6, 2, 11, 4], seed=5)
    probe = DecodeEngine(model, max_batch=4, max_tokens=1024, block_size=4, run_ahead=False).generate(
        prompts[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    stop = probe[0][0].output[4]  # a token greedy decoding reaches mid-window
    params = [SamplingParams(temperature=0.0 if i % 3 else 0.8, seed=i, max_tokens=6 + 2 * i,
                             stop_token_ids=[stop]) for i in range(len(prompts))]
    runs = {}
    for ahead in (False, True):
        engine = DecodeEngine(model, max_batch=4, max_tokens=max_tokens, block_size=4, sync_every=4, run_ahead=ahead)
        groups = engine.generate(prompts, params)
        runs[ahead] = [(r.output, r.finish_reason, r.logprobs) for (r,) in groups]
        assert (engine.stats.run_ahead_steps > 0) == ahead
        assert (engine.stats.preemptions > 0) == (max_tokens == 80)
        assert engine.cache.allocator.num_used == 1  # only the scratch block is left
    assert [r[:2] for r in runs[True]] == [r[:2] for r in runs[False]]
    for (_, _, a), (_, _, b) in zip(runs[True], runs[False]):  # requests meet in other batch buckets: fp32 noise
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)
    assert any(reason == "stop" for _, reason, _ in runs[True]) and any(r == "length" for _, r, _ in runs[True])


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=3)
    prompts = _prompts([6, 11, 4], seed=3)
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=12, seed=1234)
    a = DecodeEngine(model, max_batch=4, max_tokens=1024, block_size=4).generate(prompts, params)
    b = DecodeEngine(model, max_batch=2, max_tokens=1024, block_size=8).generate(prompts[::-1], params)
    assert [g[0].output for g in a] == [g[0].output for g in b][::-1]


def test_n_samples_share_prompt_blocks():
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=4)
    prompt = _prompts([21], seed=4)[0]
    engine = DecodeEngine(model, max_batch=8, max_tokens=1024, block_size=4)
    (group,) = engine.generate([prompt], SamplingParams(temperature=1.0, n=4, max_tokens=6, seed=7))
    assert len(group) == 4
    assert len({tuple(r.output) for r in group}) > 1  # different samples


def test_engine_sees_live_weights_after_optimizer_step():
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=5)
    prompt = _prompts([8], seed=5)[0]
    engine = DecodeEngine(model, max_batch=2, max_tokens=512, block_size=4)
    before = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10))[0][0].output
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    ids = torch.tensor([prompt + before])
    model(input_ids=ids, labels=ids).loss.neg().backward()  # push the model away from its own output
    opt.step()
    after = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10))[0][0].output
    assert after == _hf_greedy(model, prompt, 10)
    assert after != before


def test_llm_api_texts_and_logprobs(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, attn_implementation="sdpa").eval()
    llm = LLM(model, tok, max_batch=4, max_tokens=2048)
    outs = llm.generate(
        ["What is the capital of France?", "Name a color."],
        SamplingParams(temperature=0.0, max_tokens=24, logprobs=True),
        chat=True,
        use_tqdm=False,
    )
    assert model.config._attn_implementation == "sdpa"  # restored after generation
    assert "Paris" in outs[0].outputs[0].text
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason in ("stop", "length") and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)


def test_engine_generate_via_custom_generate_matches_hf():
    model = tiny_model("qwen3", attn_implementation="hf_efficient", seed=6)
    prompts = _prompts([7, 3, 12], seed=6)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = model.generate(ids, **kw)
    got = model.generate(ids, custom_generate=engine_generate, **kw)
    assert torch.equal(got, expected)
    with hf_efficient.patches.applied("fast_generate"):
        patched = model.generate(ids, **kw)
    assert torch.equal(patched, expected)


def test_bad_requests_fail_before_work():
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=0)
    engine = DecodeEngine(model, max_batch=2, max_tokens=64, block_size=4)
    with pytest.raises(ValueError, match="cache blocks"):
        engine.generate([[5] * 60], SamplingParams(max_tokens=30))
    with pytest.raises(ValueError, match="token ids"):
        engine.generate([[5, 10_000]], SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="n=4"):
        engine.generate([[5, 6]], SamplingParams(max_tokens=3, n=4))
