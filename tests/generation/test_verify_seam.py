"""The seam speculative decoding plugs into: score k tokens per sequence in one forward, roll rejected ones back."""

import torch

from hf_efficient.generation.engine import DecodeEngine
from hf_efficient.generation.prefill import prefill
from hf_efficient.generation.request import Request
from hf_efficient.generation.sampling import SamplingParams
from hf_efficient.models.tiny import tiny_model


def _reference_logits(model, ids, k):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -k:]


def test_score_k_tokens_then_rollback_matches_full_forward():
    torch.manual_seed(0)
    model = tiny_model("llama", attn_implementation="hf_efficient", seed=21)
    ref_model = tiny_model("llama", attn_implementation="eager", seed=21)
    engine = DecodeEngine(model, max_batch=2, max_tokens=256, block_size=4, cuda_graphs=False)
    sched, runner = engine.scheduler, engine.runner
    prompts = [torch.randint(3, 200, (n,)).tolist() for n in (6, 11)]
    for i, p in enumerate(prompts):
        sched.add([Request(i, p, SamplingParams(max_tokens=64))])
    with torch.no_grad():
        batch = sched.admit()
        prefill(runner, batch, chunk_tokens=1024)
        for group in batch.groups:
            sched.activate(group[0], 0)
        reqs = list(sched.active)
        history = [list(p) for p in prompts]
        for k, keep in ((5, (2, 5)), (3, (3, 0)), (16, (16, 9))):
            sched.reserve(k)
            tokens = torch.randint(3, 200, (2, k))
            logits = runner.score(tokens, [(r.blocks, r.stored) for r in reqs])
            for i, req in enumerate(reqs):
                want = _reference_logits(ref_model, history[i] + tokens[i].tolist(), k)
                torch.testing.assert_close(logits[i], want, rtol=1e-4, atol=1e-4)
                # accept the first `keep` tokens, roll the rest back
                sched.rollback(req, k - keep[i])
                history[i] += tokens[i, : keep[i]].tolist()
                assert req.stored == len(history[i])
                assert len(req.blocks) == -(-req.stored // 4)  # emptied blocks were freed
            engine.check_consistency()
    for req in reqs:
        engine.scheduler.retire(req)
    engine.check_consistency()
    assert engine.cache.blocks.num_free == engine.cache.num_blocks - 1
