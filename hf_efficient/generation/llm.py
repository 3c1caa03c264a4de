"""Offline batch API over the decode engine.

    from hf_efficient import LLM, SamplingParams
    llm = LLM(model, tokenizer)
    outs = llm.generate(["Hi", "Tell me a joke"], SamplingParams(temperature=0.7, max_tokens=128))
    print(outs[0].outputs[0].text, outs[0].outputs[0].logprobs)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .engine import DecodeEngine
from .sampling import SamplingParams


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None  # log-probability of each chosen token (see SamplingParams.logprobs)
    finish_reason: str  # "stop" (eos / stop id / stop string) or "length"


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


class LLM:
    """Generate for many prompts at once on one model (continuous batching, CUDA graphs on GPU).

    Args:
        model: a transformers causal LM (on CUDA for speed; CPU runs the same steps eagerly).
        tokenizer: its tokenizer (for text prompts, decoding, chat templates, eos and stop strings).
        **engine_kwargs: passed to :class:`~hf_efficient.generation.engine.DecodeEngine` (``max_batch``,
            ``max_tokens``, ``block_size``, ``cuda_graphs``, ``sync_every``).
    """

    def __init__(self, model, tokenizer, **engine_kwargs):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = DecodeEngine(model, tokenizer=tokenizer, **engine_kwargs)

    def _eos_ids(self) -> list[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if eos is None:
                continue
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        return sorted(ids)

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat: bool = False,
    ) -> list[RequestOutput]:
        """Generate completions.

        Args:
            prompts: a string, a list of strings, or a list of token-id lists. With ``chat=True`` each string is a
                user message formatted with the tokenizer's chat template.
            sampling_params: one :class:`SamplingParams` for all prompts or one per prompt (default: greedy, 16
                tokens). The tokenizer's/model's eos ids are added to ``stop_token_ids`` unless ``ignore_eos``.
            use_tqdm: show a progress bar (requests finished).

        Returns:
            one :class:`RequestOutput` per prompt, in order, each with ``n`` completions.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty string, list of strings or list of token-id lists")
        texts: list[str | None] = []
        token_lists: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                if chat:
                    ids = self.tokenizer.apply_chat_template(
                        [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
                    )
                    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
                else:
                    ids = self.tokenizer(p, add_special_tokens=True)["input_ids"]
                texts.append(p)
                token_lists.append(list(ids))
            elif isinstance(p, (list, tuple)) or hasattr(p, "tolist"):
                texts.append(None)
                token_lists.append(p)  # token ids: checked by the engine before any work
            else:
                raise ValueError(f"each prompt must be a string or a list of token ids, got {type(p).__name__}")
        if sampling_params is None:
            sampling_params = SamplingParams(temperature=0.0)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if not all(isinstance(p, SamplingParams) for p in params):
            bad = next(type(p).__name__ for p in params if not isinstance(p, SamplingParams))
            raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got {bad}")
        eos = self._eos_ids()
        params = [
            p if p.ignore_eos else p.replace(stop_token_ids=sorted(set(p.stop_token_ids) | set(eos))) for p in params
        ]
        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=sum(p.n for p in params), desc="generate", unit="req")
        try:
            groups = self.engine.generate(token_lists, params, progress=progress)
        finally:
            if progress is not None:
                progress.close()
        results = []
        for text, ids, group, p in zip(texts, token_lists, groups, params):
            outs = [
                CompletionOutput(
                    text=self.tokenizer.decode(r.output, skip_special_tokens=True),
                    token_ids=list(r.output),
                    logprobs=list(r.logprobs) if p.logprobs else None,
                    finish_reason=r.finish_reason,
                )
                for r in group
            ]
            results.append(RequestOutput(text, ids, outs))
        return results
