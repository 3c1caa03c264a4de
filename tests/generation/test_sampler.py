"""BatchSampler's per-slot state: per-request seed reproducibility (slots, neighbours, moves, resume), logprob modes,
saved state, stop checks, fast-path flags, and the absence of host synchronisation (Dynamo full-graph tracing on
CPU, CUDA-graph capture on GPU).
"""

from __future__ import annotations

import pytest
import torch
from sampling_reference import make_sampler  # tests/generation is on sys.path (rootdir import mode)

from hf_efficient.generation.sampling import BatchSampler, SamplingParams, counter_uniform, stream_key

# ---------------------------------------------------------------------------------------------------- seeds


def _run_request(params, logits_seq, slot, batch, neighbour_seed, slots_perm=False, prompt=(3, 4)):
    """Tokens drawn by one request placed in ``slot`` of a batch of ``batch`` rows with random neighbours."""
    v = logits_seq.shape[-1]
    g = torch.Generator().manual_seed(neighbour_seed)
    sampler = BatchSampler(batch + 2, v, generator=g)
    for s in range(batch):
        if s != slot:
            sampler.set_slot(s, SamplingParams(temperature=1.3, repetition_penalty=1.5), [s])
    sampler.set_slot(slot, params, list(prompt))
    perm = torch.randperm(batch, generator=g) if slots_perm else torch.arange(batch)
    out = []
    for logits in logits_seq:
        rows = torch.randn(batch, v, generator=g)
        rows[(perm == slot).nonzero().item()] = logits
        tok, lp = sampler.sample(rows, slots=perm if slots_perm else None)
        out.append((int(tok[(perm == slot).nonzero().item()]), float(lp[(perm == slot).nonzero().item()])))
    return out


def test_seeded_request_reproducible_across_slots_and_neighbours():
    v = 40
    logits_seq = torch.randn(30, v, generator=torch.Generator().manual_seed(5)) * 2
    params = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.2, seed=1234)
    a = _run_request(params, logits_seq, slot=0, batch=2, neighbour_seed=1)
    b = _run_request(params, logits_seq, slot=5, batch=8, neighbour_seed=2)
    c = _run_request(params, logits_seq, slot=3, batch=6, neighbour_seed=3, slots_perm=True)
    assert a == b == c
    assert len({t for t, _ in a}) > 5  # it really samples
    d = _run_request(params.replace(seed=1235), logits_seq, slot=0, batch=2, neighbour_seed=1)
    assert [t for t, _ in d] != [t for t, _ in a]


def test_samples_of_one_request_use_distinct_streams():
    v = 50
    logits = torch.zeros(4, v)
    sampler = BatchSampler(4, v)
    p = SamplingParams(seed=7)
    for i in range(4):
        sampler.set_slot(i, p, sample_index=i)
    draws = torch.stack([sampler.sample(logits)[0] for _ in range(20)], 1)
    assert len({tuple(r) for r in draws.tolist()}) == 4


def test_unseeded_requests_follow_torch_generator():
    v = 50
    logits = torch.zeros(3, v)

    def run():
        s = make_sampler([SamplingParams()] * 3, v)
        return torch.stack([s.sample(logits)[0] for _ in range(10)]).tolist()

    torch.manual_seed(0)
    a = run()
    torch.manual_seed(0)
    assert run() == a
    assert run() != a


def test_move_slot_and_resume_keep_the_stream():
    v = 30
    logits_seq = torch.randn(12, v, generator=torch.Generator().manual_seed(6))
    params = SamplingParams(temperature=1.0, repetition_penalty=1.4, seed=99)
    ref = make_sampler([params], v, prompts=[[1, 2]])
    want = [int(ref.sample(lg[None])[0]) for lg in logits_seq]

    s = BatchSampler(4, v)
    s.set_slot(3, params, [1, 2])
    got = []
    for lg in logits_seq[:6]:
        rows = torch.randn(4, v)
        rows[3] = lg
        got.append(int(s.sample(rows)[0][3]))
    s.move_slot(3, 1)
    assert s.slot_params[3] is None and s.slot_params[1] is params
    for lg in logits_seq[6:9]:
        got.append(int(s.sample(lg[None].expand(2, v).contiguous())[0][1]))
    # Preempted: a new sampler resumes from the context with seed_offset = tokens drawn so far.
    r = BatchSampler(2, v)
    r.set_slot(0, params, [1, 2, *got], seed_offset=len(got))
    for lg in logits_seq[9:]:
        got.append(int(r.sample(lg[None])[0][0]))
    assert got == want


# ---------------------------------------------------------------------------------------------------- engine helpers


def test_logprobs_modes():
    g = torch.Generator().manual_seed(7)
    v = 100
    logits = torch.randn(3, v, generator=g)
    params = [SamplingParams(temperature=0.5, top_k=10, seed=1), SamplingParams(seed=2), SamplingParams(temperature=0)]
    s = make_sampler(params, v)
    state = s.save_state()
    proc_full = s.processed_logprobs(logits)
    tok, proc, raw = s.sample(logits, logprobs="both")
    torch.testing.assert_close(proc, proc_full.gather(1, tok[:, None]).squeeze(1))
    torch.testing.assert_close(raw, torch.log_softmax(logits, -1).gather(1, tok[:, None]).squeeze(1))
    assert proc.dtype == raw.dtype == torch.float32 and tok.dtype == torch.int64
    assert float(proc[2]) == 0.0
    s.restore_state(state)
    tok2, raw2 = s.sample(logits, logprobs="raw")
    assert torch.equal(tok, tok2) and torch.equal(raw, raw2)
    with pytest.raises(ValueError, match="logprobs"):
        s.sample(logits, logprobs="scores")


def test_save_restore_state():
    v = 20
    s = make_sampler([SamplingParams(seed=1, repetition_penalty=1.5)] * 2, v, prompts=[[0], [1]])
    logits = torch.randn(2, v)
    state = s.save_state()
    a = [s.sample(logits)[0] for _ in range(5)]
    assert s.steps[:2].tolist() == [5, 5]
    s.restore_state(state)
    assert s.steps[:2].tolist() == [0, 0] and s.seen[:, 2:].sum() == 0
    b = [s.sample(logits)[0] for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_check_stop():
    v = 10
    params = [
        SamplingParams(stop_token_ids=[2, 3], max_tokens=5),
        SamplingParams(stop_token_ids=[2], ignore_eos=True, max_tokens=3),
        SamplingParams(max_tokens=1),
    ]
    s = make_sampler(params, v, max_stop_ids=8)
    s.sample(torch.zeros(3, v))
    assert s.check_stop(torch.tensor([3, 2, 0])).tolist() == [True, False, True]
    assert s.check_stop(torch.tensor([4, 2, 0])).tolist() == [False, False, True]
    s.sample(torch.zeros(3, v))
    s.sample(torch.zeros(3, v))
    assert s.check_stop(torch.tensor([4, 2, 0])).tolist() == [False, True, True]
    assert s.check_stop(torch.tensor([2, 4]), slots=torch.tensor([0, 1])).tolist() == [True, True]
    with pytest.raises(ValueError, match="max_stop_ids"):
        s.set_slot(0, SamplingParams(stop_token_ids=list(range(9))))
    s.set_slot(0, SamplingParams(stop_token_ids=list(range(9)), ignore_eos=True))  # not stored: fine


def test_set_slot_errors_and_flags():
    s = BatchSampler(2, 10)
    with pytest.raises(ValueError, match="slot"):
        s.set_slot(2, SamplingParams())
    with pytest.raises(ValueError, match="prompt_ids"):
        s.set_slot(0, SamplingParams(), [10])
    with pytest.raises(TypeError):
        s.set_slot(0, {"temperature": 1.0})
    with pytest.raises(ValueError, match="shape"):
        s.sample(torch.zeros(2, 11))
    with pytest.raises(ValueError, match="rows"):
        s.sample(torch.zeros(3, 10))
    s.set_slot(0, SamplingParams(temperature=0, top_p=0.5))
    assert s.static_flags(2) == {"greedy_only": True, "skip_penalty": True, "candidates": 0}  # slot 1 is free
    s.set_slot(1, SamplingParams(repetition_penalty=1.1))
    assert s.static_flags([0]) == {"greedy_only": True, "skip_penalty": True, "candidates": 0}
    assert s.static_flags([0, 1]) == {"greedy_only": False, "skip_penalty": False, "candidates": 0}
    s.set_slot(1, SamplingParams(top_k=50, top_p=0.9))
    assert s.static_flags([0, 1])["candidates"] == 64
    s.set_slot(1, SamplingParams(top_k=65))
    assert s.static_flags([0, 1])["candidates"] == 1024
    assert s.static_flags([0, 1], candidate_buckets=(8, 100))["candidates"] == 100
    s.set_slot(1, SamplingParams(top_k=2000))
    assert s.static_flags([0, 1])["candidates"] is None
    s.set_slot(1, SamplingParams(top_p=0.9))
    assert s.static_flags([0, 1])["candidates"] is None
    s.clear_slot(1)
    assert s.static_flags(2)["greedy_only"]
    s.set_slot(1, SamplingParams(), torch.tensor([[1, 2], [3, 9]]))  # tensor prompt, any shape
    assert s.seen[1].nonzero().flatten().tolist() == [1, 2, 3, 9]


def test_top_k_larger_than_vocab_and_single_token_vocab():
    s = make_sampler([SamplingParams(top_k=1000, seed=0), SamplingParams(top_p=0.1, seed=1)], 1)
    tok, lp = s.sample(torch.tensor([[0.3], [-5.0]]))
    assert tok.tolist() == [0, 0] and lp.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------------- no host sync


def test_sample_traces_as_one_graph_on_cpu():
    """Dynamo full-graph tracing fails on any .item()/.tolist()/data-dependent branch: the sampler has none."""
    torch._dynamo.reset()
    v, b = 64, 6
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=5, seed=1), SamplingParams(top_p=0.7),
              SamplingParams(min_p=0.1, repetition_penalty=1.3), SamplingParams(), SamplingParams(seed=3)]
    s = make_sampler(params, v, prompts=[[1, 2]] * b, max_batch=8)
    logits = torch.randn(b, v)
    slots = torch.tensor([7, 0, 1, 2, 3, 4])
    s.set_slot(7, SamplingParams(seed=5))

    def step(lg):
        tok, lp, raw = s.sample(lg, logprobs="both")
        done = s.check_stop(tok)
        tok2, lp2 = s.sample(lg, slots, observe=False)
        s.observe(tok2, slots)
        g, _ = s.sample(lg, greedy_only=True, skip_penalty=True, observe=False)
        tok3, _ = s.sample(lg, candidates=8, observe=False)
        tok4, _ = s.sample(lg, candidates=0, skip_penalty=True, observe=False)
        return tok, lp, raw, done, tok2, lp2, g, tok3, tok4, s.processed_logprobs(lg)

    state = s.save_state()
    want = step(logits)
    s.restore_state(state)
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    got = compiled(logits)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_cuda_graph_capture_and_no_sync():
    dev = torch.device("cuda")
    v, b = 151_936, 16
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=50, seed=1), SamplingParams(top_p=0.9),
              SamplingParams(min_p=0.05, repetition_penalty=1.3)] * 4
    cpu_ids = [[1, 2, 3]] * b
    s = make_sampler(params, v, prompts=cpu_ids, device=dev, max_batch=32)
    static_logits = torch.randn(b, v, device=dev) * 3
    slots = torch.arange(b, device=dev).flip(0)

    def body():
        tok, lp, raw = s.sample(static_logits, logprobs="both")
        tok2, _ = s.sample(static_logits, slots)
        tok3, _ = s.sample(static_logits, candidates=64, observe=False)
        tok4, _ = s.sample(static_logits, candidates=0, skip_penalty=True, observe=False)
        return tok, lp, raw, s.check_stop(tok), tok2, tok3, tok4

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        state = s.save_state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            want = [x.clone() for x in body()]  # warm-up, and the eager reference; raises on any sync
            s.restore_state(state)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = body()
        s.restore_state(state)
        graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for x, y in zip(out, want):
        assert torch.equal(x, y)
    assert s.steps[:b].tolist() == [4] * b
    # Fast paths draw the same tokens on the GPU too (bf16 logits of a real-size vocab: many ties).
    params = [SamplingParams(temperature=0.7, top_k=40 + i, top_p=0.9, seed=i) for i in range(b)]
    s = make_sampler(params, v, device=dev)
    logits = (torch.randn(b, v, device=dev) * 4).to(torch.bfloat16)
    state = s.save_state()
    full = [s.sample(logits) for _ in range(4)]
    s.restore_state(state)
    fast = [s.sample(logits, **s.static_flags(b)) for _ in range(4)]
    assert s.static_flags(b)["candidates"] == 64
    for (t0, l0), (t1, l1) in zip(full, fast):
        assert torch.equal(t0, t1) and torch.equal(l0, l1)
    # The device hash equals the host reference.
    keys = torch.tensor([stream_key(i) for i in range(64)])
    steps = torch.arange(64) * 1_000_003
    assert counter_uniform(keys.to(dev), steps.to(dev)).cpu().tolist() == counter_uniform(keys, steps).tolist()
