"""Padding-free SFT of SmolLM2 with attn_implementation="hf_efficient" vs "sdpa": loss curves and step time.

    python -m hf_efficient.bench.sft_parity --out docs/benchmarks [--steps 200]

Data: synthetic chat exchanges (two-digit arithmetic, counting, word reversal) built in code, tokenized with the
model's chat template, packed padding-free with transformers' ``DataCollatorWithFlattening`` into batches of about
8k tokens. Three runs of ``--steps`` AdamW steps from the same weights: sdpa with data seed 0, hf_efficient with data
seed 0, and sdpa with data seed 1. The spread between the two sdpa runs is the run-to-run noise; hf_efficient's
curve must stay within it (compared on 10-step moving averages).
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import time
from pathlib import Path

import torch

from . import DEFAULT_OUT

WORDS = "apple river stone cloud garden window planet silver forest candle bridge marble orange tiger".split()


def _examples(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = []
        for _ in range(rng.randint(1, 6)):
            kind = rng.randrange(3)
            if kind == 0:
                a, b = rng.randint(10, 99), rng.randint(10, 99)
                q, ans = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
            elif kind == 1:
                k = rng.randint(3, 12)
                q, ans = f"Count from 1 to {k}.", ", ".join(str(i) for i in range(1, k + 1)) + "."
            else:
                ws = rng.sample(WORDS, rng.randint(2, 6))
                q, ans = "Reverse these words: " + " ".join(ws), " ".join(reversed(ws))
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]
        out.append(msgs)
    return out


def _batches(tokenizer, steps: int, tokens_per_batch: int, data_seed: int):
    from transformers import DataCollatorWithFlattening

    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=False, return_position_ids=True)
    rng = random.Random(1000 + data_seed)
    pool = [
        tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"] for m in _examples(4000)
    ]
    batches = []
    for _ in range(steps):
        feats, total = [], 0
        while total < tokens_per_batch:
            ids = list(pool[rng.randrange(len(pool))])
            feats.append({"input_ids": ids, "labels": ids})
            total += len(ids)
        batches.append(collate(feats))
    return batches


def _train(path, attn: str, batches, lr: float):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation=attn).cuda()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    losses, times = [], []
    for batch in batches:
        batch = {k: v.cuda() for k, v in batch.items()}
        torch.cuda.synchronize()
        t = time.perf_counter()
        # use_cache=False: with a cache object present, transformers' sdpa path does not detect the packed
        # sequences in position_ids and attends across them (hf_efficient's attention handles both cases).
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    del model, opt
    torch.cuda.empty_cache()
    return losses, times


def _smooth(x, w=10):
    return [sum(x[max(0, i - w + 1) : i + 1]) / len(x[max(0, i - w + 1) : i + 1]) for i in range(len(x))]


def run(out_dir=DEFAULT_OUT, steps: int = 200, tokens_per_batch: int = 8192, lr: float = 2e-5) -> dict:
    from transformers import AutoTokenizer

    from ..env import versions_short
    from ..models import resolve_model

    path = resolve_model("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    runs = {}
    for name, attn, seed in [("sdpa", "sdpa", 0), ("hf_efficient", "hf_efficient", 0), ("sdpa_seed1", "sdpa", 1)]:
        batches = _batches(tok, steps, tokens_per_batch, seed)
        losses, times = _train(path, attn, batches, lr)
        runs[name] = {"losses": losses, "median_step_s": sorted(times[5:])[len(times[5:]) // 2]}
        print(f"{name}: first {losses[0]:.3f} last {losses[-1]:.3f} median step {runs[name]['median_step_s'] * 1e3:.1f} ms",
              flush=True)
    s0, s1, ours = (_smooth(runs[k]["losses"]) for k in ("sdpa", "sdpa_seed1", "hf_efficient"))
    noise = max(abs(a - b) for a, b in zip(s0, s1))
    dev = max(abs(a - b) for a, b in zip(s0, ours))
    name = torch.cuda.get_device_name()
    slug = "h100" if "H100" in name else "h200" if "H200" in name else name.split()[-1].lower()
    result = {
        "gpu": name, "date": datetime.date.today().isoformat(), "versions": versions_short(),
        "steps": steps, "tokens_per_batch": tokens_per_batch, "lr": lr,
        "max_dev_smoothed_vs_sdpa": dev, "run_to_run_noise_smoothed": noise, "within_noise": dev <= noise,
        "step_time_ms": {k: v["median_step_s"] * 1e3 for k, v in runs.items()},
        "losses": {k: v["losses"] for k, v in runs.items()},
    }
    out = Path(out_dir) / slug
    out.mkdir(parents=True, exist_ok=True)
    (out / "sft_parity.json").write_text(json.dumps(result, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=90)
        for k, style in (("sdpa", "-"), ("sdpa_seed1", ":"), ("hf_efficient", "--")):
            ax.plot(_smooth(runs[k]["losses"]), style, label=k, lw=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (10-step mean)")
        ax.set_title(f"SmolLM2 packed SFT, {name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "sft_parity.png")
    except ImportError:
        print("matplotlib not installed: no plot")
    print(f"max smoothed deviation vs sdpa {dev:.4f}; run-to-run noise {noise:.4f}; step ms {result['step_time_ms']}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hf-efficient bench sft_parity")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="40 steps")
    args = parser.parse_args(argv)
    run(args.out, 40 if args.quick else args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
