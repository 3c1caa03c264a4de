"""Patch ``"fused_layers"``: fused Triton kernels for RMSNorm, rotary embedding and SwiGLU.

transformers' modeling code spends ~40 small kernels per decoder layer; this patch swaps, per model family, the
narrow seams where those kernels come from for the fused ops of :mod:`hf_efficient.ops`:

=====================================  ========================================================================
seam (per modeling module)             replacement
=====================================  ========================================================================
``<Family>RMSNorm.forward``            :func:`~hf_efficient.ops.rmsnorm.rms_norm` (Gemma2: ``(1 + w)`` variant)
``apply_rotary_pos_emb`` (module       :func:`~hf_efficient.ops.rope.rope`: q and k in one kernel
global, looked up at call time by
``<Family>Attention.forward``)
``<Family>MLP.forward``                ``down_proj(silu_mul(gate_proj(x), up_proj(x)))``
=====================================  ========================================================================

Families: ``llama``, ``mistral``, ``qwen2``, ``qwen3`` (all three seams; Qwen3's per-head q/k norms are the same
RMSNorm class) and ``gemma2`` (RMSNorm and rotary only: its MLP is GELU).

Decoder-layer forwards are deliberately not replaced (folding the residual add into the second norm would save
one kernel per layer, but means copying transformers' layer code, which changes between releases);
:func:`~hf_efficient.ops.rmsnorm.rms_norm_add` is there for code that owns its layer.

Every replacement checks its inputs first (CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``; fp16, bf16 or
fp32; supported shapes; SiLU activation; no hooks on a norm it would bypass) and otherwise calls the original
function, so models of other configurations, devices or dtypes behave exactly as without the patch. The checks
read tensor metadata only: no host synchronisation, safe under CUDA-graph capture and ``torch.compile`` (the ops
are ``torch.library`` custom ops with fake implementations).
"""

from __future__ import annotations

import functools
import importlib.util

from .core import Patch, PatchSet, register

#: family -> (modeling module, class-name prefix, seams patched)
_FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "llama": ("transformers.models.llama.modeling_llama", "Llama", ("norm", "rope", "mlp")),
    "mistral": ("transformers.models.mistral.modeling_mistral", "Mistral", ("norm", "rope", "mlp")),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2", ("norm", "rope", "mlp")),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3", ("norm", "rope", "mlp")),
    "gemma2": ("transformers.models.gemma2.modeling_gemma2", "Gemma2", ("gemma_norm", "rope")),
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _ops():
    from hf_efficient.ops import rmsnorm, rope, swiglu

    return rmsnorm, rope, swiglu


def _norm_ok(x, weight) -> bool:
    rmsnorm = _ops()[0]
    return (
        weight.dim() == 1
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[0]
        and x.shape[-1] <= rmsnorm.MAX_FUSED_HIDDEN
        and rmsnorm.fusable(x, weight)
    )


# ----------------------------------------------------------------------------------------------
# Replacements (factories: original -> replacement)
# ----------------------------------------------------------------------------------------------


def _wrap_norm(original):
    @functools.wraps(original)
    def forward(self, hidden_states):
        if _norm_ok(hidden_states, self.weight):
            return _ops()[0].rms_norm(hidden_states, self.weight, self.variance_epsilon)
        return original(self, hidden_states)

    forward._hf_efficient_fused_norm = "llama"
    return forward


def _wrap_gemma_norm(original):
    @functools.wraps(original)
    def forward(self, x):
        if _norm_ok(x, self.weight):
            return _ops()[0].rms_norm(x, self.weight, self.eps, offset=1.0, cast_before_weight=False)
        return original(self, x)

    forward._hf_efficient_fused_norm = "gemma"
    return forward


def _wrap_rope(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        rmsnorm, rope, _ = _ops()
        if (
            unsqueeze_dim == 1
            and rmsnorm.fusable(q, k, cos, sin)
            and rope.rope_supported(q, k, cos, sin)
            and not (cos.requires_grad or sin.requires_grad)
        ):
            return rope.rope(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    return apply_rotary_pos_emb


def _silu_act(act) -> bool:
    import torch

    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # pragma: no cover - older transformers
        SiLUActivation = torch.nn.SiLU
    return type(act) in (SiLUActivation, torch.nn.SiLU)


def _wrap_mlp(original):
    @functools.wraps(original)
    def forward(self, x):
        if _silu_act(self.act_fn) and _ops()[0].fusable(x):
            gate = self.gate_proj(x)
            up = self.up_proj(x)
            if _ops()[0].fusable(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype:
                return self.down_proj(_ops()[2].silu_mul(gate, up))
            return self.down_proj(self.act_fn(gate) * up)
        return original(self, x)

    return forward


_WRAPPERS = {"norm": _wrap_norm, "gemma_norm": _wrap_gemma_norm, "mlp": _wrap_mlp}
_CLASS_SUFFIX = {"norm": "RMSNorm", "gemma_norm": "RMSNorm", "mlp": "MLP"}


def _patches() -> list[Patch]:
    out = []
    for module, prefix, seams in _FAMILIES.values():
        try:
            present = importlib.util.find_spec(module) is not None
        except ImportError:
            present = False
        if not present:
            continue
        for seam in seams:
            if seam == "rope":
                out.append(Patch(module, "apply_rotary_pos_emb", _wrap_rope, wraps=True))
            else:
                out.append(Patch(f"{module}:{prefix}{_CLASS_SUFFIX[seam]}", "forward", _WRAPPERS[seam], wraps=True))
    return out


def _available() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


@register("fused_layers")
def _build() -> PatchSet:
    return PatchSet(
        name="fused_layers",
        doc="fused Triton RMSNorm, rotary embedding and SwiGLU for Llama/Mistral/Qwen2/Qwen3 "
        "(Gemma2: norm and rotary)",
        patches=_patches(),
        available=_available,
    )
