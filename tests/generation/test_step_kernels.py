"""The fused step kernels (Triton interpreter on CPU) against the engine's PyTorch ops, and the engine with them."""

import pytest
import torch

from hf_efficient import tuning
from hf_efficient.generation import step_kernels as sk
from hf_efficient.generation.engine import DecodeEngine
from hf_efficient.generation.sampling import SamplingParams
from hf_efficient.models.tiny import tiny_model

pytestmark = pytest.mark.skipif(not sk.usable(torch.device("cpu")), reason="needs triton (interpreter on CPU)")


@pytest.mark.parametrize("b", [1, 5, 33])
def test_step_inputs_match_the_engine_ops(b):
    g = torch.Generator().manual_seed(b)
    bs, cols = 4, 9
    table = torch.randperm(400, generator=g)[: b * cols].view(b, cols).to(torch.int32)
    pos = torch.randint(0, bs * cols, (b,), generator=g)
    outs = []
    for fn in (sk.step_inputs, sk.step_inputs_reference):
        seq, slots = torch.full((b,), -7, dtype=torch.int32), torch.full((b,), -7, dtype=torch.long)
        fn(pos, table, bs, seq, slots)
        outs.append((seq, slots))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def _state(b, vocab, width, g):
    return dict(
        steps=torch.randint(0, 50, (b, 4), generator=g)[:, 2],  # a strided view, like the sampler's counters
        seen=torch.rand(b, vocab, generator=g) < 0.1,
        tokens=torch.randint(0, vocab, (b,), generator=g),
        positions=torch.randint(0, 100, (b,), generator=g),
        active=torch.randint(0, 2, (b,), generator=g),
        history=torch.randint(0, vocab, (b, width), generator=g),
        history_lp=torch.randn(b, width, generator=g),
        hist_idx=torch.tensor([[2]]),
    )


def _commit(state, counter):
    return sk.StepCommit(state["tokens"], state["positions"], state["active"], state["history"],
                         state["history_lp"], state["hist_idx"], counter)


@pytest.mark.parametrize("b,vocab", [(1, 40000), (3, 4096), (4, 300)])
def test_greedy_commit_matches_the_sampler_and_commit_ops(b, vocab):
    """Same tokens (first maximum on ties, also across 16384-wide blocks), step counters, seen sets, positions and
    history columns; log-probabilities to float32 rounding; the arrival counter back at zero."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(b, vocab, generator=g)
    logits[0, [7, vocab - 3]] = 9.0  # a tie between the first and the last block: index 7 wins
    if b > 1:
        logits[1, [vocab // 2, vocab // 2 + 1]] = 8.0
    base = _state(b, vocab, 6, g)
    ours = {k: v.clone() for k, v in base.items()}
    ref = {k: v.clone() for k, v in base.items()}
    # clone() of the strided view is contiguous: give the kernel a strided view again (the sampler's layout)
    parent = torch.zeros(b, 4, dtype=torch.long)
    parent[:, 2] = base["steps"]
    ours["steps"] = parent[:, 2]
    assert ours["steps"].stride(0) == 4
    counter = torch.zeros(1, dtype=torch.int32)
    sk.greedy_commit(logits, ours["steps"], ours["seen"], _commit(ours, counter))
    sk.greedy_commit_reference(logits, ref["steps"], ref["seen"], _commit(ref, torch.zeros(1, dtype=torch.int32)))
    assert ours["tokens"][0].item() == 7
    for k in ("steps", "seen", "tokens", "positions", "history", "hist_idx"):
        assert torch.equal(ours[k], ref[k]), k
    torch.testing.assert_close(ours["history_lp"], ref["history_lp"], rtol=0, atol=1e-5)
    assert counter.item() == 0


def test_greedy_commit_rejects_strided_logits():
    g = torch.Generator().manual_seed(0)
    st = _state(2, 64, 4, g)
    with pytest.raises(ValueError, match="unit last stride"):
        sk.greedy_commit(torch.randn(64, 2).t(), st["steps"], st["seen"], _commit(st, torch.zeros(1, dtype=torch.int32)))


def test_engine_with_fused_step_gives_the_same_tokens_and_logprobs():
    """Greedy requests (fused path) and a sampled one (the batch then takes the sampler's general path) over
    several sync windows and batch buckets."""
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=7)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 12, 3, 9)]
    runs = {}
    for fused in (False, True):
        with tuning.override(fused_step=fused):
            engine = DecodeEngine(model, max_batch=4, max_tokens=512, block_size=4, sync_every=4)
        assert engine.fused_step == fused  # read when the engine is built
        greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True))
        mixed = engine.generate(prompts[:2], [SamplingParams(temperature=0.0, max_tokens=9),
                                              SamplingParams(temperature=0.9, seed=3, max_tokens=9)])
        runs[fused] = [(r.output, r.logprobs) for (r,) in greedy + mixed]
    for (ta, la), (tb, lb) in zip(runs[True], runs[False]):
        assert ta == tb
        torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=0, atol=1e-5)
