"""The engine after errors, interrupts and unusual grad modes: exactly as before the call, and still correct."""

import pytest
import torch

from hf_efficient.generation import engine as engine_mod
from hf_efficient.generation.engine import DecodeEngine
from hf_efficient.generation.sampling import SamplingParams
from hf_efficient.models.tiny import tiny_model


def _prompts(lengths, vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


class Boom(Exception):
    pass


def _fail_on_call(obj, name, n):
    """Make ``obj.name`` raise Boom on its ``n``-th call (after doing its work), once."""
    original = getattr(obj, name)
    calls = {"n": 0}

    def wrapped(*a, **k):
        out = original(*a, **k)
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(name)
        return out

    setattr(obj, name, wrapped)
    return lambda: setattr(obj, name, original)


def _assert_clean(engine):
    assert engine.scheduler.active == [] and not engine.scheduler.waiting
    assert engine.cache.blocks.num_free == engine.cache.num_blocks - 1  # only the scratch block is held
    engine.check_consistency()
    assert int(engine.runner.active.sum()) == 0 and engine.runner.hist_count == 0
    assert all(p is None for p in engine.runner.sampler.slot_params)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", attn_implementation="hf_efficient", seed=11)


PROMPTS = _prompts([5, 12, 7, 3, 9], seed=11)
PARAMS = [SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=10 + i) for i in range(5)]


def _fresh(model, **kw):
    return DecodeEngine(model, max_batch=4, max_tokens=kw.pop("max_tokens", 512), block_size=4, sync_every=3, **kw)


@pytest.fixture(scope="module")
def expected(model):
    eng = _fresh(model)
    groups = eng.generate(PROMPTS, PARAMS)
    return [(g[0].output, g[0].logprobs) for g in groups], eng.stats.decode_steps


@pytest.mark.parametrize("where, n", [
    ("prefill", 1), ("prefill", 2),        # the first prefill, or one admitted later (others are decoding)
    ("first_tokens", 1),                   # sampling of the first tokens
    ("decode", 1), ("decode", 5),          # a decode step (the model's forward)
    ("sample_commit", 4),                  # sampling inside a decode step
    ("on_update", 2),                      # a user callback (e.g. a streamer) raising
    ("preempt", 1),                        # while preempting (a small cache)
])
def test_engine_is_as_before_after_an_exception(model, expected, where, n):
    want, want_steps = expected
    engine = _fresh(model, max_tokens=64 if where == "preempt" else 512)
    on_update = None
    if where == "prefill":
        undo = _fail_on_call(engine_mod, "prefill", n)
    elif where in ("first_tokens", "decode"):
        undo = _fail_on_call(engine.runner, where, n)
    elif where == "sample_commit":
        undo = _fail_on_call(engine.runner.sampler, where, n)
    elif where == "preempt":
        undo = _fail_on_call(engine, "_preempt", n)
    else:
        calls = []

        def on_update(reqs):
            calls.append(len(reqs))
            if len(calls) == n:
                raise Boom("on_update")
        undo = lambda: None  # noqa: E731
    try:
        with pytest.raises(Boom):
            engine.generate(PROMPTS, PARAMS, on_update=on_update)
    finally:
        undo()
    _assert_clean(engine)
    steps = engine.stats.decode_steps
    groups = engine.generate(PROMPTS, PARAMS)
    assert [g[0].output for g in groups] == [w[0] for w in want]
    if where != "preempt":  # (a small cache takes other steps)
        assert engine.stats.decode_steps - steps == want_steps  # no stale request decoded along
    _assert_clean(engine)


def test_keyboard_interrupt_mid_generate_leaves_engine_clean(model, expected):
    engine = _fresh(model)

    def interrupt(reqs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.generate(PROMPTS, PARAMS, on_update=interrupt)
    _assert_clean(engine)
    assert [g[0].output for g in engine.generate(PROMPTS, PARAMS)] == [w[0] for w in expected[0]]


@pytest.mark.parametrize("first", ["inference_mode", "no_grad", "grad"])
def test_engine_works_in_every_grad_mode_whichever_built_it(model, expected, first):
    """Built and first used under one grad mode, then used under the others."""
    modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}
    with modes[first]():
        engine = _fresh(model)
        got = engine.generate(PROMPTS[:2], PARAMS[:2])
    assert [g[0].output for g in got] == [w[0] for w in expected[0][:2]]
    for name, mode in modes.items():
        with mode():
            got = engine.generate(PROMPTS[:2], PARAMS[:2])
        assert [g[0].output for g in got] == [w[0] for w in expected[0][:2]], name
    _assert_clean(engine)


def test_a_bad_request_fails_before_any_work(model):
    engine = _fresh(model)
    good = PROMPTS[0]
    with pytest.raises(ValueError, match="needs a tokenizer"):
        engine.generate([good, good], [SamplingParams(max_tokens=3), SamplingParams(max_tokens=3, stop=["x"])])
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.generate([good], {"max_tokens": 3})
    with pytest.raises(ValueError, match="token ids"):
        engine.generate([good, [1.5, 2.0]], SamplingParams(max_tokens=3))
    assert engine.stats.decode_steps == 0 and engine.stats.prefill_tokens == 0
    _assert_clean(engine)
    # numpy ints and tensors are token ids too
    np = pytest.importorskip("numpy")
    a = engine.generate([np.array(good)], SamplingParams(temperature=0.0, max_tokens=4))
    b = engine.generate([torch.tensor(good)], SamplingParams(temperature=0.0, max_tokens=4))
    c = engine.generate([good], SamplingParams(temperature=0.0, max_tokens=4))
    assert a[0][0].output == b[0][0].output == c[0][0].output


@pytest.mark.parametrize("kw, match", [
    (dict(prefill_tokens=0), "prefill_tokens"),
    (dict(prefill_tokens=-4), "prefill_tokens"),
    (dict(sync_every=0), "sync_every"),
    (dict(max_batch=0), "max_batch"),
    (dict(max_batch=2.5), "max_batch"),
    (dict(block_size=6), "block_size"),
    (dict(block_size=0), "block_size"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=10**13), "max_tokens"),  # a KV cache larger than the machine: named, before allocating
    (dict(native_max_batch=-1), "native_max_batch"),
])
def test_bad_engine_settings_get_named_errors(model, kw, match):
    base = dict(max_batch=2, max_tokens=64, block_size=4)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        DecodeEngine(model, **base)


def test_oversized_request_is_refused_up_front(model):
    engine = _fresh(model)
    with pytest.raises(ValueError, match="max_tokens=1000000000"):
        engine.generate([PROMPTS[0]], SamplingParams(max_tokens=10**9))
    _assert_clean(engine)


@pytest.mark.gpu
@pytest.mark.parametrize("where, n", [("prefill", 2), ("decode", 2), ("on_update", 2), ("sample_commit", 1),
                                      ("sample_commit", 3)])
def test_graph_engine_is_as_before_after_an_exception(where, n):
    """On the GPU with CUDA graphs: an exception in a prefill, a replayed step, a callback, a warm-up (sample_commit
    call 1) or a capture (call 3) leaves the engine clean and correct."""
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=11, dtype=torch.bfloat16).cuda()
    kw = dict(max_batch=4, max_tokens=512, block_size=16, sync_every=3, cuda_graphs=True)
    want = [g[0].output for g in DecodeEngine(model, **kw).generate(PROMPTS, PARAMS)]
    engine = DecodeEngine(model, **kw)
    on_update, undo = None, (lambda: None)
    if where == "prefill":
        undo = _fail_on_call(engine_mod, "prefill", n)
    elif where == "decode":
        undo = _fail_on_call(engine.runner, "decode", n)
    elif where == "sample_commit":
        undo = _fail_on_call(engine.runner.sampler, "sample_commit", n)
    else:
        def on_update(reqs, calls=[]):  # noqa: B006
            calls.append(1)
            if len(calls) == n:
                raise Boom("on_update")
    try:
        with pytest.raises(Boom):
            engine.generate(PROMPTS, PARAMS, on_update=on_update)
    finally:
        undo()
    torch.cuda.synchronize()
    _assert_clean(engine)
    assert [g[0].output for g in engine.generate(PROMPTS, PARAMS)] == want
    _assert_clean(engine)


def test_non_finite_logits_finish_that_request_alone():
    """One NaN weight row in the LM head makes every logit row NaN only for sequences whose hidden state meets it;
    here a NaN row for one token id poisons the whole distribution: the requests finish with a clear reason instead
    of sampling NaN-logprob tokens, and the engine stays usable."""
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=12)
    engine = DecodeEngine(model, max_batch=4, max_tokens=512, block_size=4, sync_every=3)
    good = engine.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=6))
    head = model.get_output_embeddings().weight
    saved = head[7].clone()
    with torch.no_grad():
        head[7] = float("nan")
    try:
        bad = engine.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=6))
    finally:
        with torch.no_grad():
            head[7] = saved
    for (req,) in bad:
        assert req.finish_reason.startswith("error: non-finite logits")
        assert all(lp == lp for lp in req.logprobs)  # no NaN logprob was kept
    _assert_clean(engine)
    again = engine.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=6))
    assert [g[0].output for g in again] == [g[0].output for g in good]


class _FlakyTokenizer:
    """Decodes token ids as text, but fails on one id (a tokenizer error while checking stop strings)."""

    def __init__(self, bad_id):
        self.bad_id = bad_id

    def decode(self, ids, skip_special_tokens=True):
        if self.bad_id in ids:
            raise RuntimeError("cannot decode")
        return " ".join(map(str, ids))


def test_a_request_failing_mid_run_fails_alone(model):
    """A request whose stop-string check raises finishes with an error reason; the others complete unchanged."""
    plain = _fresh(model).generate(PROMPTS, [p.replace(max_tokens=8) for p in PARAMS])
    victim_token = plain[1][0].output[2]
    params = [p.replace(max_tokens=8) for p in PARAMS]
    params[1] = params[1].replace(stop=["never appears"])
    engine = _fresh(model, tokenizer=_FlakyTokenizer(victim_token))
    groups = engine.generate(PROMPTS, params)
    assert groups[1][0].finish_reason.startswith("error: RuntimeError")
    assert groups[1][0].output == plain[1][0].output[:3]
    for i in (0, 2, 3, 4):
        if victim_token not in plain[i][0].output:
            assert groups[i][0].output == plain[i][0].output and groups[i][0].finish_reason == "length"
    _assert_clean(engine)


def test_prompt_beyond_max_position_embeddings_warns(model):
    engine = _fresh(model, max_tokens=2048)
    with pytest.warns(UserWarning, match="max_position_embeddings=512"):
        engine.generate([PROMPTS[0] * 110], SamplingParams(temperature=0.0, max_tokens=2))
