"""``model.generate`` on the decode engine.

transformers accepts a callable as ``custom_generate``: it prepares the inputs (tokenization already done by the
caller, left padding, ``num_return_sequences`` expansion, the GenerationConfig) and hands them to the callable in
place of its own sampling loop. :func:`engine_generate` is such a callable::

    out = model.generate(**batch, max_new_tokens=256, custom_generate=hf_efficient.engine_generate)

or, for every ``generate`` call inside a block (falls back to transformers' own loop for requests the engine does
not serve, e.g. beam search or assisted decoding)::

    with hf_efficient.patches.applied("fast_generate"):
        out = model.generate(**batch, max_new_tokens=256)

Supported GenerationConfig fields: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``min_p``,
``repetition_penalty``, ``max_new_tokens``/``max_length``, ``eos_token_id``, ``num_return_sequences``,
``stop_strings`` (with ``tokenizer=`` passed to generate), a ``streamer`` (batch 1). Anything else raises a
``ValueError`` naming it.
"""

from __future__ import annotations

import math

import torch

from .sampling import SamplingParams

# Logits processors / stopping criteria transformers builds from fields the engine reads itself.
_HANDLED_PROCESSORS = {
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper",
    "RepetitionPenaltyLogitsProcessor",
}
_HANDLED_CRITERIA = {"MaxLengthCriteria", "EosTokenCriteria", "StopStringCriteria", "MaxTimeCriteria"}
_ENGINE_ATTR = "_hf_efficient_engine"


class EngineUnsupported(ValueError):
    """The request uses a generate feature the engine does not serve."""


def _engine_for(model, batch: int, tokens: int):
    from .engine import DecodeEngine

    eng = getattr(model, _ENGINE_ATTR, None)
    max_batch = 1 << max(0, math.ceil(math.log2(max(batch, 1))))
    if eng is None or eng.max_batch < batch or (eng.max_blocks - 1) * eng.block_size < tokens:
        eng = DecodeEngine(model, max_batch=max_batch, max_tokens=max(tokens, 4096))
        setattr(model, _ENGINE_ATTR, eng)
    return eng


def engine_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
) -> torch.LongTensor:
    """transformers ``custom_generate`` callable: returns ``(batch, prompt_len + new)`` token ids, right-padded
    with ``pad_token_id`` where sequences stopped early."""
    unsupported = [type(p).__name__ for p in (logits_processor or []) if type(p).__name__ not in _HANDLED_PROCESSORS]
    unsupported += [type(c).__name__ for c in (stopping_criteria or []) if type(c).__name__ not in _HANDLED_CRITERIA]
    if unsupported:
        raise EngineUnsupported(
            f"hf_efficient's engine does not support these generate features: {sorted(set(unsupported))}; "
            "call generate without custom_generate for them"
        )
    if generation_config.return_dict_in_generate:
        raise EngineUnsupported("hf_efficient's engine returns token ids only; set return_dict_in_generate=False")
    batch, width = input_ids.shape
    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    if mask.dim() != 2 or mask.shape != input_ids.shape:
        raise ValueError("engine_generate needs a 2-D attention_mask shaped like input_ids")
    prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
    max_new = generation_config.max_new_tokens
    if max_new is None:
        max_new = generation_config.max_length - width
    try:
        params = SamplingParams.from_generation_config(generation_config, max_new_tokens=max_new)
    except ValueError as err:
        raise EngineUnsupported(str(err)) from err
    stops = generation_config.stop_strings
    tokenizer = model_kwargs.get("tokenizer")
    if stops:
        params = params.replace(stop=[stops] if isinstance(stops, str) else list(stops))
    # transformers repeated each prompt num_return_sequences times; the engine takes n samples per prompt.
    n = generation_config.num_return_sequences or 1
    groups = [prompts[i] for i in range(0, batch, n)]
    if any(prompts[i] != prompts[i - i % n] for i in range(batch)):
        groups, n = prompts, 1
    params = params.replace(n=n)
    eng = _engine_for(model, batch, sum(len(p) + max_new for p in prompts) + batch * 32)
    if streamer is not None:
        if batch != 1:
            raise ValueError("streamer supports batch size 1 only")
        streamer.put(input_ids.cpu())
    results = eng.generate(groups, params, tokenizer=tokenizer)
    outs = [r.output for group in results for r in group]
    if streamer is not None:
        streamer.put(torch.tensor(outs[0]))
        streamer.end()
    pad = generation_config._pad_token_tensor
    pad = int(pad) if pad is not None else 0
    new_width = max(len(o) for o in outs)
    tail = torch.full((batch, new_width), pad, dtype=input_ids.dtype)
    for i, o in enumerate(outs):
        tail[i, : len(o)] = torch.tensor(o, dtype=input_ids.dtype)
    return torch.cat([input_ids, tail.to(input_ids.device)], dim=1)
