"""The ``hf-efficient`` command line: ``env``, ``generate``, ``bench``.

Arguments are parsed before anything heavy is imported (``import hf_efficient`` loads neither torch nor
transformers), so ``--help`` and argument errors answer at once; each command imports what it needs. A mistake
ends in one line on stderr and a non-zero exit status (2 for bad arguments, 1 otherwise); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from .bench import DEFAULT_OUT as BENCH_OUT

BENCH_AREAS = ("attention", "decode", "generate", "memory", "sft_parity")
GPU_BENCH_AREAS = ("attention", "decode", "generate", "sft_parity")

SMOLLM2_NAMES = ("smollm2", "smollm2-135m-instruct")  # as hf_efficient.models.smollm2, without importing torch


class _Parser(argparse.ArgumentParser):
    """Bad arguments give one line on stderr and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError('the prompt is empty; give the message to answer, e.g. hf-efficient '
                                         'generate "What is the capital of France?"')
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hf-efficient",
        description="Attention kernels, a paged KV cache and a generation engine for Hugging Face transformers.",
        epilog="Run 'hf-efficient <command> --help' for a command's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="command", parser_class=_Parser)
    # --debug is accepted after the command too; SUPPRESS keeps the top-level value when it is not given there.
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")

    env = sub.add_parser("env", parents=[debug],
                         help="versions, GPU, compilers, which kernel each op uses, and every knob")
    env.add_argument("--json", action="store_true", help="print the report as JSON")

    gen = sub.add_parser("generate", parents=[debug],
                         help="chat with a model (default: the embedded SmolLM2-135M-Instruct)")
    gen.add_argument("prompt", type=_prompt, help="the user message")
    gen.add_argument("--model", default="smollm2", help="'smollm2', a transformers model directory, or a .gguf file")
    gen.add_argument("--attn", default="hf_efficient", help="attn_implementation (hf_efficient, sdpa, eager, ...)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=128)
    gen.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=_non_negative_float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    gen.add_argument("--system", default=None, help="optional system message")
    gen.add_argument(
        "--engine", default="auto", choices=["auto", "on", "off"],
        help="hf_efficient's decode engine (auto: on CUDA) or transformers' generate",
    )

    bench = sub.add_parser(
        "bench", parents=[debug],
        help=f"run a benchmark and write its results under --out (default: ./{BENCH_OUT}/)",
        description="Run a benchmark. attention, decode, generate and sft_parity need a CUDA GPU and write "
                    "<out>/<gpu>/<area>.json and .md; memory runs on any machine and writes <out>/memory.json "
                    "and .md.",
    )
    bench.add_argument("area", choices=BENCH_AREAS)
    bench.add_argument("--out", default=BENCH_OUT,
                       help=f"output folder, created if missing (default: ./{BENCH_OUT} in the current directory)")
    bench.add_argument("--quick", action="store_true", help="fewer sizes (smoke run)")
    bench.add_argument("--with-compile", action="store_true",
                       help="generate: also time transformers' static cache + torch.compile (~100 s of compiling)")
    bench.add_argument("--sweep", action="store_true",
                       help="decode: also time every kernel variant x split count (tuning table in the JSON)")
    return parser


def _cmd_env(args) -> int:
    from . import env, tuning

    try:
        tuning.get()
    except ValueError as err:  # a knob's variable holds a bad value
        sys.stderr.write(f"hf-efficient env: error: {err}\n")
        return 2
    rep = env.report()
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    print(f"hf_efficient {rep['hf_efficient']}  python {rep['python']}  ({rep['platform']})")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items() if v))
    missing = [k for k, v in rep["versions"].items() if not v]
    if missing:
        print("not installed: " + ", ".join(missing))
    gpu = rep["gpu"]
    if gpu["available"]:
        print(
            f"GPU: {gpu['name']} (compute capability {gpu['compute_capability']}, {gpu['memory_gib']} GiB, "
            f"{gpu['multiprocessors']} SMs, CUDA runtime {gpu['cuda_runtime']})"
        )
    else:
        print(f"GPU: none (torch CUDA build: {rep['torch_cuda_build']})")
    print(f"nvcc: {rep['nvcc'] or 'not found'}")
    for op, info in rep["ops"].items():
        print(f"op {op}: {info['impl']} -- {info['why']}")
    from . import patches

    print("patches: " + ", ".join(f"{n}{' (active)' if n in patches.active() else ''}" for n in patches.available()))
    print(_knob_table(rep["tuning"]))
    known = {row["env"] for row in rep["tuning"]}
    unknown = [k for k in rep["env_vars"] if k not in known and k != "TRITON_INTERPRET"]
    if unknown:
        print("not knobs (misspelt or retired; ignored): " + ", ".join(unknown))
    return 0


def _knob_table(rows: list[dict]) -> str:
    """The tuning table as aligned text: knob, current value, default, source, audience (docs/tuning.md)."""
    head = ("knob", "value", "default", "source", "audience", "variable")
    cells = [head] + [(r["name"], r["value"], r["default"], r["source"], r["audience"], r["env"]) for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(head))]
    lines = ["knobs (docs/tuning.md; source: default, environment or override):"]
    lines += ["  " + "  ".join(str(c[i]).ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells]
    return "\n".join(lines)


def _cmd_generate(args) -> int:
    if args.model.lower() not in SMOLLM2_NAMES and not Path(args.model).expanduser().exists():
        raise UserError(f"--model {args.model}: no such file or directory (give 'smollm2', a transformers model "
                        "directory or a .gguf file; models are not downloaded from a hub)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from .models import resolve_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda given but no CUDA GPU is available (use --device cpu)")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=args.attn).to(device).eval()

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    if tokenizer.chat_template:
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(args.prompt, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    torch.manual_seed(args.seed)
    sampling = args.temperature > 0
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling)
    if sampling:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)
    start = time.perf_counter()
    if args.engine == "on" or (args.engine == "auto" and device.startswith("cuda")):
        new_tokens = _generate_engine(model, tokenizer, inputs["input_ids"][0].tolist(), args)
    else:
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            out = model.generate(**inputs, streamer=streamer, pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
        new_tokens = out.shape[1] - inputs["input_ids"].shape[1]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(
        f"[{new_tokens} tokens in {elapsed:.2f} s: {new_tokens / elapsed:.1f} tokens/s; "
        f"{device}, {str(dtype).removeprefix('torch.')}, attn={args.attn}, "
        f"{'engine' if args.engine == 'on' or (args.engine == 'auto' and device.startswith('cuda')) else 'transformers generate'}]",
        file=sys.stderr,
    )
    return 0


def _generate_engine(model, tokenizer, prompt_ids: list[int], args) -> int:
    """Generate with hf_efficient's engine, streaming text at every host sync. Returns the new token count."""
    from .generation.llm import LLM
    from .generation.sampling import SamplingParams

    llm = LLM(model, tokenizer, max_batch=1, max_tokens=len(prompt_ids) + args.max_new_tokens + 64, sync_every=4)
    shown = [""]

    def stream(requests):
        text = tokenizer.decode(requests[0].output, skip_special_tokens=True)
        sys.stdout.write(text[len(shown[0]):])
        sys.stdout.flush()
        shown[0] = text

    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens, seed=args.seed,
        stop_token_ids=llm._eos_ids(),
    )
    (group,) = llm.engine.generate([prompt_ids], params, on_update=stream)
    text = tokenizer.decode(group[0].output, skip_special_tokens=True)
    sys.stdout.write(text[len(shown[0]):] + "\n")
    return len(group[0].output)


def _cmd_bench(args) -> int:
    argv = ["--out", args.out] + (["--quick"] if args.quick else [])
    if args.with_compile:
        if args.area != "generate":
            raise UserError("--with-compile applies to 'generate' only")
        argv.append("--with-compile")
    if args.sweep:
        if args.area != "decode":
            raise UserError("--sweep applies to 'decode' only")
        argv.append("--sweep")
    if args.area in GPU_BENCH_AREAS:
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"the {args.area} benchmark needs a CUDA GPU and none is available "
                            "('hf-efficient bench memory' runs on any machine)")
    module = importlib.import_module(f"hf_efficient.bench.{args.area}")
    return int(module.main(argv) or 0)


class UserError(Exception):
    """A mistake the user can fix; reported as one line without a traceback."""


def _one_line(err: BaseException) -> str:
    """The error as one line: the message alone for a user's mistake, else its type, message and a hint."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, (UserError, FileNotFoundError, NotADirectoryError)) or type(err).__name__.endswith(
        "UnavailableError"
    ):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text} (--debug shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        sys.stderr.write(parser.format_help())
        return 2
    handlers = {"env": _cmd_env, "generate": _cmd_generate, "bench": _cmd_bench}
    prog = f"hf-efficient {args.command}"
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        sys.stderr.write(f"{prog}: interrupted\n")
        return 130
    except Exception as err:
        if args.debug:
            raise
        sys.stderr.write(f"{prog}: error: {_one_line(err)}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
