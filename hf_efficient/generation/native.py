"""The engine's native decode step for Llama-family models: five fused kernels per decoder layer.

At small batch a decode step is bound by kernel launches, not bytes: transformers' modules issue ~17 kernels per
layer. For the families below the engine computes the decode step itself from the model's own parameters (read
from its modules at every call, so in-place optimizer updates are seen and nothing is copied):

=========================================================  ==========================================================
kernel                                                     replaces
=========================================================  ==========================================================
:func:`~hf_efficient.ops.decode_linear.norm_linear_rope`   input RMSNorm, q/k/v projections (+ biases), rotary
                                                           embedding of q and k, K/V write into the pages
:func:`~hf_efficient.ops.paged_decode.paged_decode`        attention over the paged cache (CUDA kernel)
:func:`~hf_efficient.ops.decode_linear.linear_residual`    o projection + residual add
:func:`~hf_efficient.ops.decode_linear.norm_linear`        post-attention RMSNorm, gate/up projections
``linear_residual`` (SiLU-mul prologue)                    SiLU(gate) * up, down projection + residual add
=========================================================  ==========================================================

plus the embedding lookup and the final norm + LM head (one ``norm_linear``). On Hopper the kernels use
programmatic dependent launch (see :func:`hf_efficient.ops.rmsnorm.pdl_enabled`). Short prefills (prompts with
nothing cached before them, up to ``NATIVE_PREFILL_TOKENS`` packed tokens) run through the same kernels with flash
attention over each prompt, instead of the model's forward; longer ones keep the model's forward (cuBLAS GEMMs).
:func:`unsupported_reason` says why a model is not served natively (other families, PEFT adapters or other wrapped
projections, module hooks, dynamic rotary scaling, ...); the engine then runs the model's forward for decode too.
The ``fused_rope`` knob off (``HF_EFFICIENT_FUSED_ROPE=0``) runs the rotary + K/V write as its own kernel (for
comparisons).
"""

from __future__ import annotations

import logging

import torch

from ..attention.flash_api import flash_attn_varlen_func
from ..ops.decode_linear import (
    gemv_max_m,
    gemv_plan,
    kernels_usable,
    linear_residual,
    norm_linear,
    norm_linear_rope,
)
from ..ops.paged_decode import paged_decode

FAMILIES = ("llama", "mistral", "qwen2")
#: Largest hidden size for which the engine picks the native step by itself at every small batch. Larger models
#: get it at the batches the one-row projection kernels serve (``decode_linear.gemv_max_m()``, 1 and 2, and the
#: native prefill of a prompt admitted alone), where those kernels stream the weights faster than cuBLAS; at larger
#: batches the GEMM tiles lose to cuBLAS there (measured on a 1B Llama shape: docs/benchmarks/NOTES.md).
AUTO_MAX_HIDDEN = 1024
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
#: Longest context attended without KV splits in a native step: at short contexts the split kernel and its merge
#: cost more than they save (measured at batch 1, SmolLM2 shape: docs/benchmarks/NOTES.md).
SHORT_CONTEXT = 1024
#: Longest prompt the engine prefills through the native kernels when it is admitted alone (longer prompts, and
#: several prompts admitted together, go through the model's forward: cuBLAS GEMMs, and no new prefill graph per
#: (tokens, prompts) bucket to capture while a batch warms up).
NATIVE_PREFILL_TOKENS = 1024


def _plain_linear(mod, name: str, bias_ok: bool = False) -> str | None:
    if type(mod) is not torch.nn.Linear:
        return f"{name} is a {type(mod).__name__}, not a plain nn.Linear (adapters or quantized layers)"
    if mod.bias is not None and not bias_ok:
        return f"{name} has a bias"
    return None


def unsupported_reason(model) -> str | None:
    """Why the native decode step cannot serve ``model`` (None when it can)."""
    cfg = model.config.get_text_config(decoder=True)
    kind = getattr(cfg, "model_type", None)
    if kind not in FAMILIES:
        return f"model type {kind!r} (native decode serves {', '.join(FAMILIES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (needs silu)"
    if getattr(cfg, "final_logit_softcapping", None):
        return "final logit softcapping"
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if base is None or any(not hasattr(base, p) for p in parts):
        return "the decoder does not expose embed_tokens/layers/norm/rotary_emb"
    if type(base.embed_tokens) is not torch.nn.Embedding:
        return f"embed_tokens is a {type(base.embed_tokens).__name__}"
    rot = base.rotary_emb
    if getattr(rot, "rope_type", "default") not in _STATIC_ROPE:
        return f"rope_type {rot.rope_type!r} updates its frequencies at run time"
    head = model.get_output_embeddings()
    if (why := _plain_linear(head, "lm_head")) is not None:
        return why
    for mod in model.modules():
        if mod._forward_hooks or mod._forward_pre_hooks or hasattr(mod, "_hf_hook"):
            return f"a {type(mod).__name__} module has forward hooks"
    for i, layer in enumerate(base.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return f"layer {i} lacks self_attn/mlp"
        for name in ("q_proj", "k_proj", "v_proj"):
            if (why := _plain_linear(getattr(attn, name, None), f"layers[{i}].self_attn.{name}", True)):
                return why
        checks = [(attn, "o_proj"), (mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")]
        for owner, name in checks:
            if (why := _plain_linear(getattr(owner, name, None), f"layers[{i}].{name}")) is not None:
                return why
        if getattr(mlp, "act_fn", None) is not None and type(mlp.act_fn).__name__ not in ("SiLU", "SiLUActivation"):
            return f"layers[{i}].mlp activation is {type(mlp.act_fn).__name__}"
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name, None)
            if norm is None or not type(norm).__name__.endswith("RMSNorm") or not hasattr(norm, "variance_epsilon"):
                return f"layers[{i}].{name} is not an RMSNorm"
        if any(hasattr(attn, n) for n in ("q_norm", "k_norm", "sinks")):
            return "attention with q/k norms or sinks"
    first = next(model.parameters())
    if first.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {first.dtype} (needs float16 or bfloat16)"
    if not kernels_usable(first):
        return f"the fused kernels cannot run on {first.device}"
    for p in model.parameters():
        if p.dtype != first.dtype or p.device != first.device:
            return "parameters of mixed dtypes or devices"
    return None


def structure_key(model) -> tuple:
    """Identity of every module and parameter, with hook counts and parameter dtypes/devices: while it is unchanged,
    so is :func:`unsupported_reason`'s verdict (a cheap walk; adapters, hooks and casts all change it)."""
    out, stack = [], [model]
    while stack:
        mod = stack.pop()
        d = mod.__dict__
        out.append((id(mod), len(d.get("_forward_hooks", ())), len(d.get("_forward_pre_hooks", ())),
                    "_hf_hook" in d))
        out.extend((id(p), p.dtype, p.device) for p in d.get("_parameters", {}).values() if p is not None)
        stack.extend(c for c in d.get("_modules", {}).values() if c is not None)
    return tuple(out)


def auto_choice(model) -> tuple[int | None, str | None]:
    """For a supported model: (the largest batch the engine decodes natively by itself, None for no cap below
    ``native_max_batch``; why not at all, None when it does at least at batch 1)."""
    cfg = model.config.get_text_config(decoder=True)
    hidden = cfg.hidden_size
    if hidden <= AUTO_MAX_HIDDEN:
        return None, None
    widest = max(hidden, getattr(cfg, "intermediate_size", hidden) or hidden)
    if gemv_plan(1, widest) is not None:
        return gemv_max_m(), None
    return 0, (f"hidden_size {hidden} > {AUTO_MAX_HIDDEN}: cuBLAS projections are faster at this size "
                   "(pass native=True to force the native step)")


def decide(model, request: bool | None, max_batch: int) -> tuple[int, str | None]:
    """The engine's native decode choice: (largest batch bucket decoded natively, why not at all or None).

    ``request``: the engine's ``native`` argument (``None`` auto, ``True`` required, ``False`` off)."""
    if request is False:
        return max_batch, "disabled (native=False)"
    reason = unsupported_reason(model)
    if reason is not None and request:
        raise ValueError(f"native=True, but the native decode step cannot serve this model: {reason}")
    if reason is None and request is None:
        cap, reason = auto_choice(model)
        if cap is not None and reason is None:
            _logger.info("native decode steps up to batch %d (hidden size > %d); larger batches run the model's "
                         "forward", min(cap, max_batch), AUTO_MAX_HIDDEN)
            return min(cap, max_batch), None
    return max_batch, reason


_logger = logging.getLogger(__name__)


class NativeDecoder:
    """One decode token per sequence through fused kernels; see the module docstring.

    Args:
        model: a causal LM for which :func:`unsupported_reason` returns None.
        cache: the engine's :class:`~hf_efficient.cache.PagedCache` (pools initialised).
    """

    def __init__(self, model, cache):
        cfg = model.config.get_text_config(decoder=True)
        self.model, self.cache = model, cache
        self.base = model.get_decoder()
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        windows = []
        for layer in self.base.layers:
            w = getattr(layer.self_attn, "sliding_window", None)
            if w is None and cfg.model_type == "mistral":
                w = getattr(cfg, "sliding_window", None)
            windows.append((w - 1, w - 1) if w else (-1, -1))
        self.windows = windows

    def forward(self, tokens, positions, slots, seqlens, block_table, max_context: int | None = None) -> torch.Tensor:
        """tokens/positions ``(b,)`` int64, slots ``(b,)`` int64 flat cache slot of each new token, seqlens ``(b,)``
        int32 keys per sequence including the new one, block_table ``(b, max_blocks)`` int32. ``max_context``: a
        bound on seqlens that plans the attention's KV splits (longer sequences are still served, less evenly
        split); up to ``SHORT_CONTEXT`` keys the attention runs unsplit. Returns logits ``(b, vocab)`` in the model
        dtype. No host synchronisation (CUDA-graph safe)."""
        b, h_, d = tokens.shape[0], self.heads, self.head_dim
        splits = 1 if max_context is not None and max_context <= SHORT_CONTEXT else 0

        def attend(i, q, attn):
            o = paged_decode(q.view(b, 1, h_, d), self.cache.layers[i].k_pool, self.cache.layers[i].v_pool,
                             seqlens, block_table, softmax_scale=attn.scaling, causal=True,
                             window_size=self.windows[i], num_splits=splits, max_seqlen_k=max_context)
            return o.view(b, h_ * d)

        return self._layers(tokens, positions, slots, attend)

    def prefill(self, tokens, positions, slots, cu_seqlens, max_seqlen: int, last) -> torch.Tensor:
        """Prompts with nothing cached before them, packed: tokens/positions/slots ``(T,)`` int64, ``cu_seqlens``
        ``(prompts + 1,)`` int32 offsets of each prompt, ``last`` ``(prompts,)`` int64 rows whose logits are
        returned ``(prompts, vocab)``. Writes every token's K/V to its slot. Projections run as Triton GEMM tiles
        (meant for short prefills, where the model's forward is bound by its ~17 launches per layer)."""
        t, h_, hk, d = tokens.shape[0], self.heads, self.kv_heads, self.head_dim

        def attend(i, q, attn):
            pool = self.cache.layers[i]
            k = pool.k_pool.view(-1, hk, d).index_select(0, slots)
            v = pool.v_pool.view(-1, hk, d).index_select(0, slots)
            o = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                       softmax_scale=attn.scaling, causal=True, window_size=self.windows[i])
            return o.view(t, h_ * d)

        return self._layers(tokens, positions, slots, attend, last)

    def _layers(self, tokens, positions, slots, attend, last=None) -> torch.Tensor:
        base = self.base
        h_, hk = self.heads, self.kv_heads
        rot = base.rotary_emb
        scaling = float(getattr(rot, "attention_scaling", 1.0))
        h = torch.nn.functional.embedding(tokens, base.embed_tokens.weight)
        for i, layer in enumerate(base.layers):
            attn, mlp, pool = layer.self_attn, layer.mlp, self.cache.layers[i]
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            projs = (attn.q_proj, attn.k_proj, attn.v_proj)
            biases = [p.bias for p in projs] if any(p.bias is not None for p in projs) else None
            q = norm_linear_rope(h, [p.weight for p in projs], ln1.weight, ln1.variance_epsilon, biases, positions,
                                 rot.inv_freq, scaling, h_, hk, pool.k_pool, pool.v_pool, slots)
            linear_residual(attend(i, q, attn), attn.o_proj.weight, h, out=h)
            gu = norm_linear(h, [mlp.gate_proj.weight, mlp.up_proj.weight], ln2.weight, ln2.variance_epsilon)
            linear_residual(gu, mlp.down_proj.weight, h, silu_mul=True, out=h)
        if last is not None:
            h = h.index_select(0, last)
        return norm_linear(h, [self.model.get_output_embeddings().weight], base.norm.weight,
                           base.norm.variance_epsilon)
