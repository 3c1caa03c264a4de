"""GPU checks of the engine: CUDA-graph replay == eager steps, agreement with transformers, tiny families."""

import pytest
import torch

import hf_efficient
from hf_efficient.generation.engine import DecodeEngine
from hf_efficient.generation.sampling import SamplingParams
from hf_efficient.models.tiny import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def smollm2_bf16(smollm2_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_graph_replay_is_bitwise_identical_to_eager(smollm2_bf16, temperature):
    prompts = _prompts([40, 7, 130, 19, 64], smollm2_bf16.config.vocab_size)
    params = SamplingParams(temperature=temperature, top_p=0.95, max_tokens=48, seed=11, ignore_eos=True)
    graph = DecodeEngine(smollm2_bf16, max_batch=8, max_tokens=8192, cuda_graphs=True).generate(prompts, params)
    eager = DecodeEngine(smollm2_bf16, max_batch=8, max_tokens=8192, cuda_graphs=False).generate(prompts, params)
    for (a,), (b,) in zip(graph, eager):
        assert a.output == b.output
        assert a.logprobs == b.logprobs


def test_greedy_agrees_with_transformers_generate(smollm2_bf16):
    model = smollm2_bf16
    prompts = _prompts([33, 12, 90], model.config.vocab_size, seed=1)
    new = 64
    groups = DecodeEngine(model, max_batch=4, max_tokens=4096).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
    )
    report = []
    for prompt, (req,) in zip(prompts, groups):
        ids = torch.tensor([prompt], device="cuda")
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=2, output_scores=True, output_logits=True,
                             return_dict_in_generate=True)
        hf = out.sequences[0, len(prompt):].tolist()
        diverge = next((i for i, (x, y) in enumerate(zip(hf, req.output)) if x != y), None)
        # HF's logprob of our chosen tokens, up to the first divergence
        upto = diverge if diverge is not None else new
        hf_lp = [torch.log_softmax(out.logits[i][0].float(), -1)[req.output[i]].item() for i in range(upto)]
        err = max((abs(a - b) for a, b in zip(hf_lp, req.logprobs[:upto])), default=0.0)
        report.append((diverge, err))
        assert err < 0.1, f"logprob differs from transformers by {err}"
        assert diverge is None or diverge >= 8, f"diverged from transformers at token {diverge}"
    print("first divergence / max logprob error per prompt:", report)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2"])
def test_tiny_families_on_gpu_graphs(family):
    model = tiny_model(family, dtype=torch.bfloat16, attn_implementation="hf_efficient", seed=2).cuda()
    prompts = _prompts([5, 21, 13], model.config.vocab_size, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    a = DecodeEngine(model, max_batch=4, max_tokens=1024, block_size=16, cuda_graphs=True).generate(prompts, params)
    b = DecodeEngine(model, max_batch=4, max_tokens=1024, block_size=16, cuda_graphs=False).generate(prompts, params)
    assert [g[0].output for g in a] == [g[0].output for g in b]


def test_paged_cache_generate_matches_dynamic_bf16(smollm2_bf16):
    model = smollm2_bf16
    model.set_attn_implementation("hf_efficient")
    try:
        prompts = _prompts([30, 11, 57], model.config.vocab_size, seed=3)
        width = max(map(len, prompts))
        ids = torch.full((3, width), 2, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.cuda(), mask.cuda()
        kw = dict(attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=2)
        dyn = model.generate(ids, **kw)
        paged = model.generate(ids, past_key_values=hf_efficient.PagedCache(model.config, max_tokens=4096), **kw)
        agree = (dyn == paged).float().mean().item()
        print(f"PagedCache vs DynamicCache bf16 token agreement: {agree:.3f}")
        assert agree > 0.9
    finally:
        model.set_attn_implementation("sdpa")


def test_flash_attention_2_patch_runs_generate_batch(smollm2_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    with hf_efficient.patches.applied("flash_attention_2"):
        model = AutoModelForCausalLM.from_pretrained(
            smollm2_path, dtype=torch.bfloat16, attn_implementation="flash_attention_2"
        ).cuda().eval()
        prompts = _prompts([20, 45, 9], model.config.vocab_size, seed=4)
        cfg = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=-1, pad_token_id=2)
        out = model.generate_batch(inputs=prompts, generation_config=cfg)
        assert all(len(r.generated_tokens) == 16 for r in out.values())
        ids = torch.tensor([prompts[0]], device="cuda")
        ref = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=2)
        assert ref.shape[1] == len(prompts[0]) + 16
