"""Accuracy of greedy runs of a decode path, judged against the model's own forward's bf16/fp16 noise."""

import copy

import torch


def teacher_forced_logprobs(model, prompt, tokens):
    """log p(tokens[i] | prompt + tokens[:i]) under the model's forward (its dtype and attention), on CPU, fp32."""
    ids = torch.tensor([prompt + tokens], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
    chosen = torch.tensor(tokens, device=ids.device)[:, None]
    return torch.log_softmax(logits, -1).gather(1, chosen).squeeze(1).cpu()


def assert_within_noise(model, prompts, runs, factor=2.0, slack=0.02):
    """Each run's chosen-token logprobs vs a float32 copy of ``model`` (teacher-forced on the run's own tokens) within
    ``factor`` x the error of ``model``'s own forward in its precision (+ ``slack``). Returns the per-run report."""
    ref_model = copy.deepcopy(model).float()
    report = []
    for prompt, run in zip(prompts, runs, strict=True):
        ref = teacher_forced_logprobs(ref_model, prompt, run.output)
        own = teacher_forced_logprobs(model, prompt, run.output)
        err = (torch.tensor(run.logprobs) - ref).abs().max().item()
        noise = (own - ref).abs().max().item()
        report.append({"err": round(err, 4), "noise": round(noise, 4)})
        assert err <= factor * noise + slack, report
    return report
