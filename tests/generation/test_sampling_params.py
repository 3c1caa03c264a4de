"""SamplingParams: validation, normalization and the mapping from a transformers GenerationConfig."""

from __future__ import annotations

import pytest

from hf_efficient.generation.sampling import SAMPLING_EPS, SamplingParams


@pytest.mark.parametrize(
    "name,value",
    [
        ("n", 0),
        ("n", 1.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -2),
        ("top_k", 2.0),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("min_p", -0.01),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("max_tokens", 0),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", 5),
        ("stop", [""]),
        ("stop", [3]),
        ("ignore_eos", 1),
        ("seed", 1.0),
        ("seed", "7"),
        ("logprobs", "yes"),
    ],
)
def test_invalid_params_raise_naming_the_field(name, value):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} must be"):
        SamplingParams(**{name: value})
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name} must be"):
        SamplingParams().replace(**{name: value})


def test_params_normalization_and_help():
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=(2, 3), temperature=1)
    assert p.top_k == 0 and p.stop == ["###"] and p.stop_token_ids == [2, 3]
    assert isinstance(p.temperature, float)
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=SAMPLING_EPS / 2).greedy
    assert not SamplingParams(temperature=SAMPLING_EPS).greedy
    import dataclasses

    for f in dataclasses.fields(SamplingParams):
        assert f.metadata.get("help"), f.name


def test_from_generation_config_mapping():
    from transformers import GenerationConfig

    p = SamplingParams.from_generation_config(GenerationConfig())
    assert p.greedy and p.top_k == 0 and p.repetition_penalty == 1.0 and p.max_tokens == 16 and p.n == 1
    p = SamplingParams.from_generation_config(GenerationConfig(do_sample=True))
    assert p.temperature == 1.0 and p.top_k == 50 and p.top_p == 1.0 and p.min_p == 0.0  # transformers' defaults
    gc = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
        max_new_tokens=99, eos_token_id=[2, 3], num_return_sequences=4, stop_strings=["\n\n"],
    )
    p = SamplingParams.from_generation_config(gc)
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.7, 20, pytest.approx(0.9), pytest.approx(0.05))
    assert p.repetition_penalty == pytest.approx(1.1) and p.max_tokens == 99 and p.n == 4
    assert p.stop_token_ids == [2, 3] and p.stop == ["\n\n"]
    p = SamplingParams.from_generation_config(gc, max_new_tokens=7, seed=11, logprobs=True)
    assert p.max_tokens == 7 and p.seed == 11 and p.logprobs
    # Greedy ignores the sampling fields but keeps the repetition penalty.
    p = SamplingParams.from_generation_config(
        GenerationConfig(do_sample=False, top_k=5, repetition_penalty=1.3, eos_token_id=0)
    )
    assert p.greedy and p.top_k == 0 and p.repetition_penalty == pytest.approx(1.3) and p.stop_token_ids == [0]
    # Neutral values of unsupported fields are fine.
    SamplingParams.from_generation_config(GenerationConfig(num_beams=1, typical_p=1.0, no_repeat_ngram_size=0))


@pytest.mark.parametrize(
    "kwargs,names",
    [
        ({"num_beams": 4}, ["num_beams"]),
        ({"do_sample": True, "typical_p": 0.9}, ["typical_p"]),
        ({"penalty_alpha": 0.6, "top_k": 4}, ["penalty_alpha"]),
        ({"no_repeat_ngram_size": 3}, ["no_repeat_ngram_size"]),
        ({"bad_words_ids": [[5]]}, ["bad_words_ids"]),
        ({"min_new_tokens": 3}, ["min_new_tokens"]),
        ({"num_beams": 2, "do_sample": True, "epsilon_cutoff": 3e-4}, ["num_beams", "epsilon_cutoff"]),
    ],
)
def test_from_generation_config_unsupported_fields(kwargs, names):
    from transformers import GenerationConfig

    gc = GenerationConfig()
    for k, v in kwargs.items():  # set after construction: skip transformers' own validation
        setattr(gc, k, v)
    with pytest.raises(ValueError, match="not supported") as err:
        SamplingParams.from_generation_config(gc)
    for name in names:
        assert name in str(err.value)


def test_from_generation_config_greedy_with_several_sequences_raises():
    from transformers import GenerationConfig

    gc = GenerationConfig()
    gc.num_return_sequences = 3
    with pytest.raises(ValueError, match="num_return_sequences"):
        SamplingParams.from_generation_config(gc)
