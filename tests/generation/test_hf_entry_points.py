"""``model.generate`` on the engine through its two entry points, each exercised by a real ``model.generate`` call:
the ``fast_generate`` patch and ``custom_generate=engine_generate`` (bare, ``.bind(...)`` or ``functools.partial``).

What the engine serves must match transformers' own generate; what it does not serve must raise a clear error
(``custom_generate``) or run transformers' own loop with one warning (the patch); streamers get the tokens as they
are produced and are always ended.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, TextIteratorStreamer
from transformers.generation.logits_process import LogitsProcessor, TemperatureLogitsWarper
from transformers.generation.stopping_criteria import MaxLengthCriteria, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

import hf_efficient
from hf_efficient.generation.engine import DecodeEngine
from hf_efficient.generation.hf_generate import EngineUnsupported, engine_generate
from hf_efficient.models.tiny import tiny_model

_CORPUS = [
    "the quick brown fox jumps over the lazy dog. ",
    "stop here: END of story\n\n### next\n",
    "def f(x):\n    return x + 1\n",
    "a bird in the hand is worth two in the bush; ",
] * 20

GREEDY = dict(do_sample=False, eos_token_id=None)


@pytest.fixture(scope="module")
def tok():
    """A small real BPE tokenizer (SentencePiece style) trained in memory; the tiny models use its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=160, special_tokens=["<pad>", "<unk>", "</s>"], show_progress=False,
    ))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   padding_side="left")


def _model(tok, seed=1):
    return tiny_model("llama", attn_implementation="hf_efficient", seed=seed, vocab_size=len(tok))


@pytest.fixture
def model(tok):
    return _model(tok)


@pytest.fixture
def engine_spy(monkeypatch):
    """Counts engine runs and host syncs (``on_update`` calls); ``running`` is true inside the engine's generate."""
    spy = SimpleNamespace(calls=0, syncs=0, running=False)
    original = DecodeEngine.generate

    def generate(self, prompts, params, *args, on_update=None, **kwargs):
        spy.calls += 1

        def update(requests):
            spy.syncs += 1
            if on_update is not None:
                on_update(requests)

        spy.running = True
        try:
            return original(self, prompts, params, *args, on_update=update, **kwargs)
        finally:
            spy.running = False

    monkeypatch.setattr(DecodeEngine, "generate", generate)
    return spy


@pytest.fixture
def fallback_log(monkeypatch, caplog):
    """The patch's warnings, with its once-per-reason memory cleared."""
    import hf_efficient.patches.fast_generate as fast

    monkeypatch.setattr(fast, "_warned", set())
    caplog.set_level(logging.WARNING, logger=fast.logger.name)
    return lambda: [r.getMessage() for r in caplog.records if r.name == fast.logger.name]


class Recorder(BaseStreamer):
    """Records every put (with the engine's sync count at that moment) and end."""

    def __init__(self, spy=None):
        self.puts, self.ends, self.spy = [], 0, spy

    def put(self, value):
        spy = self.spy
        self.puts.append((value.clone(), spy.syncs if spy else None, spy.running if spy else None))

    def end(self):
        self.ends += 1

    def tokens(self):
        return [int(t) for v, _, _ in self.puts[1:] for t in v.flatten()]


def _batch(tok, texts=("the quick brown", "a bird")):
    return tok(list(texts), return_tensors="pt", padding=True)


def _entries(tok, **bound):
    """The ways into the engine, as (name, extra generate kwargs)."""
    return [
        ("bind", dict(custom_generate=engine_generate.bind(**bound))),
        ("partial", dict(custom_generate=functools.partial(engine_generate, **bound))),
    ]


def _patched(model, *args, **kwargs):
    with hf_efficient.patches.applied("fast_generate"):
        return model.generate(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ plain requests


def test_every_entry_point_matches_transformers(tok, model, engine_spy):
    batch = _batch(tok)
    kw = dict(max_new_tokens=12, pad_token_id=tok.pad_token_id, **GREEDY)
    expected = model.generate(**batch, **kw)
    assert torch.equal(model.generate(**batch, custom_generate=engine_generate, **kw), expected)
    for _, extra in _entries(tok, tokenizer=tok):
        assert torch.equal(model.generate(**batch, **kw, **extra), expected)
    assert torch.equal(_patched(model, **batch, **kw), expected)
    # positional inputs and generation_config reach the engine too
    cfg = GenerationConfig(max_new_tokens=12, pad_token_id=tok.pad_token_id, do_sample=False)
    cfg.eos_token_id = None
    assert torch.equal(_patched(model, batch["input_ids"], cfg, attention_mask=batch["attention_mask"]), expected)
    assert engine_spy.calls == 5


@pytest.mark.parametrize("extra", [
    dict(renormalize_logits=True),
    dict(output_scores=True),  # without return_dict_in_generate transformers returns the ids only, too
    dict(use_cache=False),
    dict(cache_implementation="dynamic"),
    dict(cache_implementation="static"),
    dict(logits_processor=[], stopping_criteria=[]),
], ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()))
def test_fields_that_do_not_change_the_tokens_run_on_the_engine(tok, model, engine_spy, fallback_log, extra):
    batch = _batch(tok)
    kw = dict(max_new_tokens=8, pad_token_id=tok.pad_token_id, **GREEDY)
    expected = model.generate(**batch, **kw)
    assert torch.equal(_patched(model, **batch, **kw, **extra), expected)
    assert torch.equal(model.generate(**batch, **kw, **extra, custom_generate=engine_generate), expected)
    assert engine_spy.calls == 2 and fallback_log() == []


def test_sampling_with_num_return_sequences_on_the_engine(tok, model, engine_spy):
    batch = _batch(tok)
    out = _patched(model, **batch, max_new_tokens=6, do_sample=True, top_p=0.9, num_return_sequences=3,
                   pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert out.shape == (6, batch["input_ids"].shape[1] + 6) and engine_spy.calls == 1
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"].repeat_interleave(3, 0))


# ------------------------------------------------------------------------------------------------ stop strings


def _stop_case(tok, model):
    """A prompt and a stop string that greedy decoding completes a few tokens in (taken from its own output)."""
    ids = tok("the quick brown", return_tensors="pt")
    free = model.generate(**ids, max_new_tokens=24, pad_token_id=tok.pad_token_id, **GREEDY)
    new = free[0, ids["input_ids"].shape[1]:].tolist()
    prompt_text = tok.decode(ids["input_ids"][0])
    for k in range(3, len(new)):
        piece = tok.decode(new[k : k + 1]).strip()
        before = tok.decode(new[:k])
        if len(piece) >= 2 and piece not in before and piece not in prompt_text:
            return ids, piece
    pytest.skip("no usable stop string in this model's output")


def test_stop_strings_with_tokenizer_through_every_entry_point(tok, model, engine_spy):
    ids, stop = _stop_case(tok, model)
    kw = dict(max_new_tokens=24, pad_token_id=tok.pad_token_id, **GREEDY)
    expected = model.generate(**ids, stop_strings=[stop], tokenizer=tok, **kw)  # transformers' own loop
    assert expected.shape[1] < ids["input_ids"].shape[1] + 24, "the stop string must end generation early"
    assert torch.equal(_patched(model, **ids, stop_strings=[stop], tokenizer=tok, **kw), expected)
    cfg = GenerationConfig(stop_strings=[stop], max_new_tokens=24, pad_token_id=tok.pad_token_id, do_sample=False)
    cfg.eos_token_id = None
    assert torch.equal(_patched(model, **ids, generation_config=cfg, tokenizer=tok), expected)
    for _, extra in _entries(tok, tokenizer=tok):
        assert torch.equal(model.generate(**ids, stop_strings=[stop], **kw, **extra), expected)
    bound = engine_generate.bind(tokenizer=tok, stop_strings=[stop])
    assert torch.equal(model.generate(**ids, custom_generate=bound, **kw), expected)
    assert engine_spy.calls == 5


def test_stop_strings_of_the_model_config_fall_back_under_the_patch(tok, model, engine_spy, fallback_log):
    """transformers merges the model's own stop strings into every call and then needs a tokenizer, which it does
    not hand to a custom_generate callable: the patch runs those calls on transformers' loop."""
    ids, stop = _stop_case(tok, model)
    kw = dict(max_new_tokens=24, pad_token_id=tok.pad_token_id, tokenizer=tok, **GREEDY)
    model.generation_config.stop_strings = [stop]
    expected = model.generate(**ids, **kw)
    assert expected.shape[1] < ids["input_ids"].shape[1] + 24
    for _ in range(2):
        assert torch.equal(_patched(model, **ids, **kw), expected)
    assert engine_spy.calls == 0 and len(fallback_log()) == 1 and "stop_strings" in fallback_log()[0]


def test_custom_generate_stop_strings_without_bound_tokenizer_raise(tok, model, engine_spy):
    ids = tok("the quick brown", return_tensors="pt")
    for extra in (dict(), dict(tokenizer=tok)):  # tokenizer= given to generate does not reach the callable
        with pytest.raises(EngineUnsupported, match=r"stop_strings.*bind"):
            model.generate(**ids, max_new_tokens=8, stop_strings=["fox"], custom_generate=engine_generate, **extra)
    assert engine_spy.calls == 0


# ------------------------------------------------------------------------------------------------ what is not served

_DRAFT = object()  # stands for a draft model, built in the test

# (generate kwargs, the name the error must give); all greedy, so transformers' result is deterministic.
_UNSERVED = [
    (dict(num_beams=2), "num_beams"),
    (dict(bad_words_ids=[[5]]), "bad_words_ids"),
    (dict(suppress_tokens=[5, 6]), "suppress_tokens"),
    (dict(begin_suppress_tokens=[5]), "begin_suppress_tokens"),
    (dict(min_new_tokens=4), "min_new_tokens"),
    (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
    (dict(encoder_repetition_penalty=1.2), "encoder_repetition_penalty"),
    (dict(guidance_scale=1.5), "guidance_scale"),
    (dict(forced_bos_token_id=5), "forced_bos_token_id"),
    (dict(forced_eos_token_id=5), "forced_eos_token_id"),
    (dict(sequence_bias={(5,): 3.0}), "sequence_bias"),
    (dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=2), "exponential_decay_length_penalty"),
    (dict(watermarking_config={"bias": 2.0}), "watermarking_config"),
    (dict(remove_invalid_values=True), "remove_invalid_values"),
    (dict(typical_p=0.5), "typical_p"),
    (dict(epsilon_cutoff=0.01), "epsilon_cutoff"),
    (dict(max_time=100.0), "max_time"),
    (dict(return_dict_in_generate=True, output_scores=True), "return_dict_in_generate"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha"),
    (dict(dola_layers="high"), "dola_layers"),
    (dict(prompt_lookup_num_tokens=2), "prompt_lookup_num_tokens"),
    (dict(assistant_early_exit=1), "assistant_early_exit"),
    (dict(use_mtp=True), "use_mtp"),
    (dict(assistant_model=_DRAFT), "assistant_model"),
    (dict(cache_implementation="offloaded"), "cache_implementation"),
    (dict(logits_processor="custom"), "logits processor"),
    (dict(logits_processor="temperature"), "TemperatureLogitsWarper"),
    (dict(stopping_criteria="custom"), "stopping criteria"),
    (dict(stopping_criteria="max_length"), "MaxLengthCriteria"),
    (dict(prefix_allowed_tokens_fn=lambda b, ids: [5, 6]), "PrefixConstrained"),
    (dict(past_key_values="filled"), "past_key_values"),
    (dict(position_ids="shifted"), "position_ids"),
    (dict(token_healing=True, tokenizer="tok"), "token.healing"),
]


class _BanToken(LogitsProcessor):
    def __call__(self, input_ids, scores):
        scores[:, 7] = -float("inf")
        return scores


class _StopNever(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _materialize(extra: dict, model, tok, ids) -> dict:
    """Build the objects the table names (they need the model or are stateful)."""
    out = dict(extra)
    if out.get("assistant_model") is _DRAFT:
        out["assistant_model"] = _model(tok, seed=2)
    if out.get("logits_processor") == "custom":
        out["logits_processor"] = [_BanToken()]
    elif out.get("logits_processor") == "temperature":
        out["logits_processor"] = [TemperatureLogitsWarper(0.5)]
    if out.get("stopping_criteria") == "custom":
        out["stopping_criteria"] = [_StopNever()]
    elif out.get("stopping_criteria") == "max_length":
        out["stopping_criteria"] = [MaxLengthCriteria(ids.shape[1] + 3)]
    if out.get("past_key_values") == "filled":
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids[:, :-1], past_key_values=cache)
        out["past_key_values"] = cache
    if out.get("tokenizer") == "tok":
        out["tokenizer"] = tok
    if out.get("position_ids") == "shifted":
        out["position_ids"] = torch.arange(ids.shape[1]).unsqueeze(0) + 3
    return out


def _run(fn):
    try:
        return fn(), None
    except Exception as err:  # noqa: BLE001
        return None, err


@pytest.mark.parametrize("extra,name", _UNSERVED, ids=[n for _, n in _UNSERVED])
def test_custom_generate_names_what_it_does_not_serve(tok, model, engine_spy, extra, name):
    ids = tok("the quick brown", return_tensors="pt")["input_ids"]
    kw = _materialize(extra, model, tok, ids)
    with pytest.raises(ValueError, match=name):
        model.generate(ids, **{**GREEDY, **kw}, max_new_tokens=6, pad_token_id=tok.pad_token_id,
                       custom_generate=engine_generate)
    assert engine_spy.calls == 0


@pytest.mark.parametrize("extra,name", _UNSERVED, ids=[n for _, n in _UNSERVED])
def test_fast_generate_falls_back_with_one_warning(tok, model, engine_spy, fallback_log, extra, name):
    """The patch runs transformers' own generate for what the engine does not serve (same result, or the same
    error transformers gives), warning once for repeated calls."""
    ids = tok("the quick brown", return_tensors="pt")["input_ids"]
    base = dict(max_new_tokens=6, pad_token_id=tok.pad_token_id, **GREEDY)

    def call(patched):
        kw = _materialize(extra, model, tok, ids)  # fresh objects (caches, processors) per call
        fn = _patched if patched else type(model).generate
        return _run(lambda: fn(model, ids, **{**base, **kw}))

    expected, expected_err = call(False)
    for _ in range(2):
        got, err = call(True)
        if expected_err is not None:
            assert type(err) is type(expected_err) and str(err) == str(expected_err)
        else:
            assert err is None, err
            assert torch.equal(getattr(got, "sequences", got), getattr(expected, "sequences", expected))
    assert engine_spy.calls == 0
    warnings = fallback_log()
    assert len(warnings) == 1, warnings
    short = {"logits processor": "logits_processor", "stopping criteria": "stopping_criteria",
             "PrefixConstrained": "prefix_allowed_tokens_fn", "token.healing": "token_healing"}.get(name, name)
    assert short in warnings[0]


def test_custom_generate_with_assistant_model_is_refused(tok, model, engine_spy):
    """transformers does not hand assistant_model to the callable: it must not run without it silently."""
    ids = tok("the quick brown", return_tensors="pt")
    draft = _model(tok, seed=2)
    for gen in (engine_generate, engine_generate.bind(tokenizer=tok)):
        with pytest.raises(EngineUnsupported, match="assistant_model"):
            model.generate(**ids, max_new_tokens=6, assistant_model=draft, custom_generate=gen, **GREEDY)
    assert engine_spy.calls == 0


# ------------------------------------------------------------------------------------------------ streamers


def _stream_entries(tok):
    """(name, call(model, streamer, **kw)) for each way of streaming through the engine."""
    return [
        ("patch", lambda m, s, **kw: _patched(m, streamer=s, **kw)),
        ("bind", lambda m, s, **kw: m.generate(custom_generate=engine_generate.bind(tokenizer=tok, streamer=s), **kw)),
        ("partial", lambda m, s, **kw: m.generate(custom_generate=functools.partial(engine_generate, streamer=s),
                                                  **kw)),
        # passed to generate as well as bound: transformers puts the prompt, the engine does not repeat it
        ("bind+generate", lambda m, s, **kw: m.generate(streamer=s, custom_generate=engine_generate.bind(streamer=s),
                                                        **kw)),
    ]


@pytest.mark.parametrize("entry", range(4), ids=["patch", "bind", "partial", "bind+generate"])
def test_streamer_gets_tokens_at_every_sync(tok, model, engine_spy, entry):
    _, run = _stream_entries(tok)[entry]
    ids = tok("the quick brown", return_tensors="pt")
    rec = Recorder(engine_spy)
    out = run(model, rec, **ids, max_new_tokens=40, pad_token_id=tok.pad_token_id, **GREEDY)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    assert torch.equal(rec.puts[0][0].reshape(1, -1), ids["input_ids"])  # the prompt, once
    assert rec.tokens() == new and len(new) == 40
    assert all(v.shape == (1,) for v, _, _ in rec.puts[1:])  # one token per put, as transformers' loop
    during = {sync for _, sync, running in rec.puts[1:] if running}
    assert len(during) >= 2, "tokens must reach the streamer at each host sync, not at the end"
    assert rec.ends == 1


@pytest.mark.parametrize("entry", range(3), ids=["patch", "bind", "partial"])
def test_text_iterator_streamer_consumed_from_another_thread(tok, model, entry):
    _, run = _stream_entries(tok)[entry]
    ids = tok("the quick brown", return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=60)
    result = {}

    def produce():
        result["out"] = run(model, streamer, **ids, max_new_tokens=30, pad_token_id=tok.pad_token_id, **GREEDY)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        text = "".join(streamer)  # queue.Empty after 60 s if end() never comes
    finally:
        thread.join(timeout=120)
    assert not thread.is_alive()
    new = result["out"][0, ids["input_ids"].shape[1]:]
    assert text == tok.decode(new, skip_special_tokens=True) and text


def _consume(streamer, timeout=60):
    pieces = []
    try:
        for piece in streamer:
            pieces.append(piece)
    except queue.Empty:
        return None  # end() never came
    return pieces


@pytest.mark.parametrize("entry", range(3), ids=["patch", "bind", "partial"])
def test_streamer_is_ended_when_generation_fails(tok, model, monkeypatch, entry):
    _, run = _stream_entries(tok)[entry]

    def failing(self, prompts, params, *args, on_update=None, **kwargs):
        if on_update is not None:
            on_update([SimpleNamespace(output=[5, 6, 7], rid=0, finish_reason=None)])
        raise RuntimeError("engine failed")

    monkeypatch.setattr(DecodeEngine, "generate", failing)
    ids = tok("the quick brown", return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=30)
    rec = Recorder()
    with pytest.raises(RuntimeError, match="engine failed"):
        run(model, streamer, **ids, max_new_tokens=10, pad_token_id=tok.pad_token_id, **GREEDY)
    assert "".join(_consume(streamer)) == tok.decode([5, 6, 7])
    with pytest.raises(RuntimeError, match="engine failed"):
        run(model, rec, **ids, max_new_tokens=10, pad_token_id=tok.pad_token_id, **GREEDY)
    assert rec.ends == 1 and rec.tokens() == [5, 6, 7]


def test_bound_streamer_is_ended_when_the_request_is_refused(tok, model):
    ids = tok("the quick brown", return_tensors="pt")
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=30)
    with pytest.raises(EngineUnsupported, match="num_beams"):
        model.generate(**ids, max_new_tokens=6, num_beams=2, custom_generate=engine_generate.bind(streamer=streamer))
    assert _consume(streamer) is not None


def test_streamer_given_to_generate_with_bare_custom_generate_is_refused_and_ended(tok, model, engine_spy):
    ids = tok("the quick brown", return_tensors="pt")
    rec = Recorder()
    with pytest.raises(EngineUnsupported, match="bind"):
        model.generate(**ids, max_new_tokens=6, streamer=rec, custom_generate=engine_generate, **GREEDY)
    assert rec.ends == 1 and engine_spy.calls == 0


def test_streamer_batch_of_two(tok, model, engine_spy, fallback_log):
    """Streamers take one sequence: the bare callable refuses a batch (ending the streamer); the patch runs
    transformers' loop, which puts whole batches."""
    batch = _batch(tok)
    kw = dict(max_new_tokens=5, pad_token_id=tok.pad_token_id, **GREEDY)
    rec = Recorder()
    with pytest.raises(EngineUnsupported, match="streamer"):
        model.generate(**batch, **kw, custom_generate=engine_generate.bind(streamer=rec))
    assert rec.ends == 1
    rec = Recorder()
    expected = model.generate(**batch, **kw)
    assert torch.equal(_patched(model, **batch, **kw, streamer=rec), expected)
    assert engine_spy.calls == 0 and len(fallback_log()) == 1
    assert rec.ends == 1 and rec.puts[0][0].shape == batch["input_ids"].shape and len(rec.puts) == 6


def test_patch_fallback_leaves_the_streamer_to_transformers(tok, model, engine_spy, fallback_log):
    """A refused request under the patch: transformers' loop streams it, prompt once, end once."""
    ids = tok("the quick brown", return_tensors="pt")
    kw = dict(max_new_tokens=6, pad_token_id=tok.pad_token_id, prompt_lookup_num_tokens=2, **GREEDY)
    rec = Recorder()
    out = _patched(model, **ids, **kw, streamer=rec)
    assert torch.equal(out, model.generate(**ids, **kw))
    assert engine_spy.calls == 0 and rec.ends == 1
    assert torch.equal(rec.puts[0][0].reshape(1, -1), ids["input_ids"])
    assert rec.tokens() == out[0, ids["input_ids"].shape[1]:].tolist()


# ------------------------------------------------------------------------------------------------ autograd modes


@pytest.mark.parametrize("entry", ["patch", "custom_generate"])
def test_generate_under_inference_mode_no_grad_and_grad(tok, entry):
    """Every autograd mode, one after another on the same model (the engine kept on the model is reused)."""
    model = _model(tok)
    ids = tok("the quick brown", return_tensors="pt")
    kw = dict(max_new_tokens=8, pad_token_id=tok.pad_token_id, **GREEDY)
    expected = model.generate(**ids, **kw)
    modes = [torch.inference_mode, torch.no_grad, torch.enable_grad, torch.inference_mode, torch.enable_grad]
    for mode in modes:
        with mode():
            if entry == "patch":
                out = _patched(model, **ids, **kw)
            else:
                out = model.generate(**ids, **kw, custom_generate=engine_generate)
        assert torch.equal(out, expected), mode
