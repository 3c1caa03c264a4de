"""KV-cache memory: bytes held by PagedCache vs a padded DynamicCache for the same requests.

Drives the real PagedCache bookkeeping (allocator, block tables, prompt groups) step by step with the SmolLM2
shape (30 layers, 3 KV heads, head_dim 64, bf16); the pools live on the ``meta`` device, so no memory is touched and
the run takes seconds on any machine. A padded DynamicCache holds ``batch x longest sequence`` tokens in every layer.

    python -m hf_efficient.bench.memory --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from ..cache.paged import PagedCache
from . import DEFAULT_OUT

SMOLLM2 = dict(num_hidden_layers=30, num_key_value_heads=3, head_dim=64)


class _Config:
    def __init__(self, num_hidden_layers):
        self.num_hidden_layers = num_hidden_layers
        self.layer_types = None


def _init_pools(cache: PagedCache, batch: int, dtype=torch.bfloat16) -> None:
    key = torch.empty(batch, SMOLLM2["num_key_value_heads"], 1, SMOLLM2["head_dim"], dtype=dtype, device="meta")
    for layer in cache.layers:
        layer.lazy_initialization(key, key)


def _token_bytes(dtype=torch.bfloat16) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return SMOLLM2["num_hidden_layers"] * 2 * SMOLLM2["num_key_value_heads"] * SMOLLM2["head_dim"] * elem


def _run_requests(prompts: list[int], outputs: list[int], block_size: int, group: int = 1) -> dict:
    """Prefill all prompts (padded batch), then decode until every request has produced its output."""
    batch = len(prompts)
    width = max(prompts)
    total = sum(p + o for p, o in zip(prompts, outputs)) + batch * block_size
    cache = PagedCache(_Config(SMOLLM2["num_hidden_layers"]), max_tokens=total, block_size=block_size,
                       prompt_group_size=group)
    _init_pools(cache, batch)
    mask = torch.zeros(batch, width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        mask[i, width - p :] = True
    cache.plan_step(width, mask, torch.device("meta"))
    for step in range(max(outputs)):
        # Finished requests stop growing: model them as padding in the step (their tokens are not stored).
        alive = torch.tensor([[step < o] for o in outputs])
        cache.plan_step(1, alive, torch.device("meta"))
    final = cache.memory_stats()
    padded_tokens = batch * (width + max(outputs))
    return {"final": final, "padded_bytes": padded_tokens * _token_bytes(), "logical_tokens": final["tokens"]}


def run(out_dir: str | Path = DEFAULT_OUT, quick: bool = False, seed: int = 0) -> dict:
    rng = random.Random(seed)
    rows = []
    # 64 requests, prompt + output lengths spread 32..2048
    lengths = [rng.randint(32, 2048) for _ in range(64)]
    prompts = [max(1, int(n * rng.uniform(0.2, 0.8))) for n in lengths]
    outputs = [n - p for n, p in zip(lengths, prompts)]
    for bs in (16, 32) if not quick else (16,):
        r = _run_requests(prompts, outputs, bs)
        f = r["final"]
        rows.append({
            "case": f"64 requests, lengths 32-2048, block {bs}",
            "paged_bytes_held": f["bytes_held"],
            "bytes_of_tokens": f["bytes_tokens"],
            "waste": f["waste"],
            "dynamic_padded_bytes": r["padded_bytes"],
            "paged_vs_dynamic": f["bytes_held"] / r["padded_bytes"],
        })
    # 16 prompts x 8 samples: prompt stored once per group
    prompts16 = [rng.randint(64, 512) for _ in range(16)]
    samples = 8
    outs = [rng.randint(16, 256) for _ in range(16 * samples)]
    rep = [p for p in prompts16 for _ in range(samples)]
    shared = _run_requests(rep, outs, 16, group=samples)["final"]
    unshared = _run_requests(rep, outs, 16, group=1)["final"]
    rows.append({
        "case": "16 prompts x 8 samples, block 16",
        "paged_bytes_held": shared["bytes_held"],
        "unshared_bytes_held": unshared["bytes_held"],
        "prompt_tokens_once": sum(prompts16),
        "tokens_stored": shared["tokens_stored"],
        "tokens_logical": shared["tokens"],
        "expected_stored_if_prompts_once": sum(prompts16) + sum(outs),
        "waste": shared["waste"],
    })
    result = {"unit": "bytes", "model_shape": "SmolLM2-135M (30 layers, 3 KV heads, d64, bf16)", "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(result, indent=1))
    lines = ["| case | PagedCache held | padded DynamicCache / unshared | waste |", "|---|---|---|---|"]
    for r in rows:
        other = r.get("dynamic_padded_bytes", r.get("unshared_bytes_held"))
        lines.append(
            f"| {r['case']} | {r['paged_bytes_held'] / 2**20:.1f} MiB | {other / 2**20:.1f} MiB "
            f"({r['paged_bytes_held'] / other:.2f}x) | {100 * r['waste']:.2f}% |"
        )
    (out / "memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hf-efficient bench memory")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    run(args.out, args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
