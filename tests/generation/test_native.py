"""The engine's native decode step (fused kernels over the model's own weights) vs the model's forward.

On CPU the kernels run through Triton's interpreter, in float16 (the paged decode op takes fp16/bf16).
"""

import pytest
import torch
from greedy_compare import assert_within_noise  # tests/generation is on sys.path (rootdir import mode)

import hf_efficient  # noqa: F401  (registers the attention)
from hf_efficient.generation.engine import DecodeEngine
from hf_efficient.generation.native import unsupported_reason
from hf_efficient.generation.sampling import SamplingParams
from hf_efficient.models.tiny import tiny_model
from hf_efficient.ops import decode_linear as dl
from hf_efficient.ops.rmsnorm import fusable


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.skipif(not fusable(torch.zeros(1, dtype=torch.float16, device=_device())),
                                reason="needs CUDA or the Triton interpreter")


def _prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _engine(model, **kw):
    return DecodeEngine(model, max_batch=4, max_tokens=512, block_size=8, cuda_graphs=False, sync_every=4, **kw)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_native_matches_model_forward(family):
    """Mixed-length batch, greedy: the native step (and native prefill) and the model's forward agree (Mistral:
    sliding window shorter than the sequences; Qwen2: q/k/v biases)."""
    over = {"sliding_window": 12} if family == "mistral" else {}
    model = tiny_model(family, dtype=torch.float16, seed=3, **over).to(_device())
    prompts = _prompts([5, 17, 30], model.config.vocab_size, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    native = _engine(model)
    assert native.stats.native_reason is None
    forward = _engine(model, native=False)
    assert forward.stats.native_reason.startswith("disabled")
    for engine in (native, forward):
        runs = [g[0] for g in engine.generate(prompts, params)]
        assert_within_noise(model, prompts, runs)
    assert native.stats.native_prefills == 0 and forward.stats.native_prefills == 0  # several prompts at once
    # a prompt admitted alone is prefilled by the native kernels (flash attention; window for Mistral), and so are
    # several packed together when the engine allows it
    alone = native.generate([prompts[2]], params)[0][0]
    assert native.stats.native_prefills == 1
    assert_within_noise(model, prompts[2:], [alone])
    native.runner.native_prefill_prompts = 8
    packed = [g[0] for g in native.generate(prompts, params)]
    assert native.stats.native_prefills == 2
    assert_within_noise(model, prompts, packed)


def test_native_and_model_forward_buckets_share_the_cache():
    """Buckets above native_max_batch run the model's forward over the same pages: as requests finish, a sequence
    moves between the two paths mid-generation."""
    model = tiny_model("qwen2", dtype=torch.float16, seed=7).to(_device())
    prompts = _prompts([4, 9, 15, 6, 11], model.config.vocab_size, seed=7)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 14, 6, 10, 4)]
    engine = DecodeEngine(model, max_batch=8, max_tokens=512, block_size=8, cuda_graphs=False, sync_every=2,
                          native_max_batch=2)
    runs = [g[0] for g in engine.generate(prompts, params)]
    assert [len(r.output) for r in runs] == [3, 14, 6, 10, 4]
    assert_within_noise(model, prompts, runs)


def test_native_sees_live_weights():
    """In-place weight updates (as optimizers make) reach the next native generation."""
    model = tiny_model("llama", dtype=torch.float16, seed=5).to(_device())
    prompt = _prompts([8], model.config.vocab_size, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine = _engine(model)
    before = engine.generate(prompt, params)[0][0]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(-3.0)
    after = engine.generate(prompt, params)[0][0]
    assert after.output != before.output
    assert_within_noise(model, prompt, [after])


def test_unsupported_models_fall_back_with_a_reason():
    assert "gemma2" in unsupported_reason(tiny_model("gemma2", dtype=torch.float16))
    assert "dtype" in unsupported_reason(tiny_model("llama", dtype=torch.float32))
    model = tiny_model("llama", dtype=torch.float16).to(_device())
    assert unsupported_reason(model) is None
    engine = _engine(model)
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    try:
        assert "hooks" in unsupported_reason(model)
        engine.generate(_prompts([4], 100), SamplingParams(temperature=0.0, max_tokens=3))
        assert "hooks" in engine.stats.native_reason  # re-checked at every generate call
        with pytest.raises(ValueError, match="native=True.*hooks"):
            _engine(model, native=True)
    finally:
        handle.remove()
    engine.generate(_prompts([4], 100), SamplingParams(temperature=0.0, max_tokens=3))
    assert engine.stats.native_reason is None
    with pytest.raises(ValueError, match="native must be"):
        _engine(model, native="yes")


def test_auto_choice_gives_large_models_native_steps_at_small_batches_only(tune):
    """Above AUTO_MAX_HIDDEN the engine decodes natively at the batches the one-row kernels serve (up to
    GEMV_MAX_M; a prompt admitted alone is prefilled natively too) and leaves larger buckets to the model's forward;
    without the one-row kernels it leaves everything to the forward."""
    model = tiny_model("llama", dtype=torch.float16, hidden_size=1088, intermediate_size=64).to(_device())
    assert unsupported_reason(model) is None and dl.GEMV_MAX_M == 2
    engine = DecodeEngine(model, max_batch=8, max_tokens=256, block_size=8, cuda_graphs=False, sync_every=2)
    assert engine.stats.native_reason is None and engine.stats.native_max_batch == 2
    buckets, forward = [], engine.runner.native.forward

    def spy(tokens, *args, **kwargs):
        buckets.append(tokens.shape[0])
        return forward(tokens, *args, **kwargs)

    engine.runner.native.forward = spy
    lengths = (3, 3, 3, 3, 8, 12)  # bucket 8 (the forward) until four requests end, then 2, then 1 (native)
    prompts = _prompts([5, 9, 4, 7, 6, 3], model.config.vocab_size, seed=11)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    runs = [g[0] for g in engine.generate(prompts, params)]
    assert [len(r.output) for r in runs] == list(lengths)
    assert_within_noise(model, prompts, runs)
    alone = engine.generate(prompts[:1], params[-1])[0][0]
    assert_within_noise(model, prompts[:1], [alone])
    assert buckets and set(buckets) == {2, 1}, buckets
    assert engine.stats.native_prefills == 1  # the prompt admitted alone
    assert DecodeEngine(model, max_batch=8, max_tokens=64, native=True).runner.native_step(8)
    tune(gemv_max_m=1)
    assert DecodeEngine(model, max_batch=8, max_tokens=64).stats.native_max_batch == 1
    tune(gemv=False)
    stats = DecodeEngine(model, max_batch=1, max_tokens=64).stats
    assert "hidden_size 1088" in stats.native_reason and stats.native_max_batch == 0
    assert DecodeEngine(model, max_batch=1, max_tokens=64, native=True).stats.native_reason is None


def test_lora_adapters_are_served_by_the_model_forward():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", dtype=torch.float16).to(_device())
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert "nn.Linear" in unsupported_reason(lora)
