"""StopStringMatcher against a brute-force scan of the decoded output, on real (in-memory trained) tokenizers."""

from __future__ import annotations

import pytest

from hf_efficient.generation.sampling import StopMatch, StopStringMatcher

_CORPUS = [
    "the quick brown fox jumps over the lazy dog. ",
    "stop here: END of story\n\n### next\n",
    "日本語のテキスト、絵文字 😀🎉 and café naïve ",
    "def f(x):\n    return x + 1\n",
] * 20


@pytest.fixture(scope="module")
def bpe_tokenizers():
    """Two small real tokenizers trained in memory: byte-level BPE (GPT-2 style) and Metaspace (SentencePiece style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte = Tokenizer(models.BPE())
    byte.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte.decoder = decoders.ByteLevel()
    byte.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"],
        show_progress=False,
    ))
    meta = Tokenizer(models.BPE(unk_token="<unk>"))
    meta.pre_tokenizer = pre_tokenizers.Metaspace()
    meta.decoder = decoders.Metaspace()
    meta.train_from_iterator(_CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False,
    ))
    return [
        PreTrainedTokenizerFast(tokenizer_object=byte, eos_token="<eos>"),
        PreTrainedTokenizerFast(tokenizer_object=meta, eos_token="</s>", unk_token="<unk>"),
    ]


def _brute_force_stop(tokenizer, ids, stops):
    for m in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:m], skip_special_tokens=True)
        hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        if hits:
            end, _, stop = min(hits)
            return StopMatch(stop=stop, num_tokens=m, trailing_chars=len(text) - end)
    return None


_STOP_TEXTS = [
    ("the quick brown fox jumps over the lazy dog. " * 6 + "END of story", ["END"]),
    ("the lazy dog " * 8 + "story\n\n### next", ["\n\n###", "xyz"]),
    ("café naïve 日本語のテキスト 😀🎉 and more", ["😀", "never"]),
    ("return x + 1\n" * 5 + "絵文字", ["文字"]),
    ("the quick brown fox", ["nothing here"]),
    ("over the lazy dog", ["dog", "lazy dog", "the"]),  # several stops: the one completed first wins
    ("a" * 30 + "b", ["aab", "ab"]),
]


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("case", range(len(_STOP_TEXTS)))
def test_stop_string_matcher_incremental(bpe_tokenizers, which, case):
    tokenizer = bpe_tokenizers[which]
    text, stops = _STOP_TEXTS[case]
    ids = tokenizer.encode(text)
    if which == 0:
        ids = ids[:5] + [tokenizer.eos_token_id] + ids[5:]  # special tokens are skipped in the text
    matcher = StopStringMatcher(tokenizer, stops)
    want = _brute_force_stop(tokenizer, ids, stops)
    got = None
    for m in range(1, len(ids) + 1):  # as the engine calls it: after each new token
        got = matcher.find(ids[:m])
        if got is not None:
            break
    assert got == want
    assert matcher.find(ids, num_new=len(ids)) == want  # one scan of everything
    if want is not None:
        assert matcher.check(ids[: want.num_tokens]) == want.num_tokens
        full = tokenizer.decode(ids[: want.num_tokens], skip_special_tokens=True)
        cut, stop = matcher.truncate(full)
        assert stop == want.stop
        assert cut == full[: len(full) - want.trailing_chars - len(want.stop)]
        # Several new tokens at once (e.g. after a multi-step sync) locate the completing token too.
        k = min(4, want.num_tokens)
        last = min(len(ids), want.num_tokens + 2)
        assert matcher.find(ids[:last], num_new=last - want.num_tokens + k) == want


def test_stop_string_matcher_decodes_only_the_tail(bpe_tokenizers):
    tokenizer = bpe_tokenizers[0]
    calls = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog. " * 40)
    matcher = StopStringMatcher(Spy(), ["### next"])
    assert matcher.find(ids) is None
    assert max(calls) <= len("### next") + 8 + 1
    assert StopStringMatcher(tokenizer, []).find(ids) is None
    with pytest.raises(ValueError):
        StopStringMatcher(tokenizer, [""])


@pytest.mark.slow
def test_stop_string_matcher_smollm2(smollm2_tokenizer):
    text = "Sure! Here is the answer:\n\nThe capital of France is Paris.<|im_end|>\nUser: thanks"
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    stops = ["\nUser:", "Paris."]
    matcher = StopStringMatcher(smollm2_tokenizer, stops)
    got = next(m for i in range(1, len(ids) + 1) if (m := matcher.find(ids[:i])) is not None)
    assert got == _brute_force_stop(smollm2_tokenizer, ids, stops)
    assert got.stop == "Paris."
