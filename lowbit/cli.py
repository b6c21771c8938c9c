"""The ``lowbit`` console script.

    lowbit generate --preset demo                       # README demo model, random ternary weights
    lowbit generate --preset tiny --max-new-tokens 16 --backend eager
    lowbit generate --model path/to/hf-dir --prompt "Hello" --cache static
    lowbit generate --preset 1b --set n_layers=2 --json out.json

    lowbit compile --preset demo -o demo.lowbit         # an ahead-of-time artifact (see lowbit.aot)
    lowbit compile --preset demo -o demo-avx2.lowbit --target avx2

Subcommands: ``generate`` (greedy generation with llama.cpp-style timings; see lowbit.generate),
``compile`` (a preset Llama compiled to an artifact directory that runs without torch-mlir).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys


def _parse_prompt(text: str | None, length: int):
    if text is None:
        return length
    parts = [p for p in text.replace(",", " ").split()]
    if parts and all(p.lstrip("-").isdigit() for p in parts):
        return [int(p) for p in parts]
    return text  # free text: needs the model directory's tokenizer


def _config_overrides(cfg, items: list[str], command: str = "generate"):
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"lowbit {command}: --set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if key not in fields:
            raise SystemExit(f"lowbit {command}: unknown config field {key!r} (fields: {', '.join(fields)})")
        current = getattr(cfg, key)
        try:
            changes[key] = type(current)(value) if not isinstance(current, str) else value
        except ValueError:
            raise SystemExit(f"lowbit {command}: {key}={value!r} is not a valid {type(current).__name__}") from None
    try:
        return dataclasses.replace(cfg, **changes)
    except ValueError as e:
        raise SystemExit(f"lowbit {command}: {e}") from None


def _add_generate(sub) -> None:
    from lowbit.generate import ACTIVATION_CHOICES, BACKENDS, EMBEDDING_CHOICES, HEAD_CHOICES, PRESETS, WEIGHT_CHOICES
    p = sub.add_parser("generate", help="greedy generation with prefill/decode tok/s, compile time, peak RSS",
                       description="Greedy generation with a compiled low-bit model; prints tokens as they "
                                   "come and llama.cpp-style timings.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="built-in Llama-style model with random "
                     "deterministic ternary weights (default: demo)")
    src.add_argument("--model", metavar="DIR", help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset's LlamaConfig field (e.g. --set n_layers=4)")
    p.add_argument("--prompt", help="token ids ('1,2,3') or text (needs the model directory's tokenizer)")
    p.add_argument("--prompt-len", type=int, default=32, help="random prompt length when --prompt is not given")
    p.add_argument("--max-new-tokens", "-n", type=int, default=32)
    p.add_argument("--weights", choices=WEIGHT_CHOICES, help="decoder linears' format (presets: ternary; "
                   "HF models: none = as they are)")
    p.add_argument("--activations", choices=ACTIVATION_CHOICES, help="int8 (BitNet a8) or none")
    p.add_argument("--head", choices=HEAD_CHOICES, default="none",
                   help="output head format: none (fp), int8 or int4 (int8 activations; integer kernels)")
    p.add_argument("--embedding", choices=EMBEDDING_CHOICES, default="none",
                   help="embedding table format: none (fp), int8 (per row) or int4 (groups of 32); saves memory")
    p.add_argument("--backend", choices=BACKENDS, default="lowbit")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", "-t", type=int, default=None, help="threads (default: torch's)")
    p.add_argument("--cache", choices=["static", "dynamic"], default="static",
                   help="KV cache for Hugging Face models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="do not stream tokens")
    p.add_argument("--verbose", "-v", action="store_true", help="log lowbit's diagnostics")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    import torch  # noqa: F401  (import cost belongs to load time, not to parsing)
    from lowbit.generate import PRESETS, GenerationError, generate
    if args.model:
        target = args.model
        if args.set:
            raise SystemExit("lowbit generate: --set applies to presets, not to --model directories")
    else:
        target = _config_overrides(PRESETS[args.preset or "demo"], args.set)
    prompt = _parse_prompt(args.prompt, args.prompt_len)
    out = sys.stdout
    streamed = []

    def on_token(tok: int) -> None:
        streamed.append(tok)
        if not args.quiet:
            out.write(f"{tok} ")
            out.flush()

    if not args.quiet:
        name = args.model or args.preset or "demo"
        out.write(f"lowbit generate: {name}, backend {args.backend}; building, quantizing and compiling "
                  f"(first run compiles, this can take a while)...\n")
        out.flush()
    try:
        result = generate(target, prompt, args.max_new_tokens, weights=args.weights,
                          activations=args.activations, backend=args.backend, dtype=args.dtype,
                          threads=args.threads, seed=args.seed, cache=args.cache, head=args.head, embedding=args.embedding,
                          on_token=on_token, trust_on_token=True)  # it only prints
    except (GenerationError, ValueError, TypeError, FileNotFoundError, ImportError) as e:
        if not args.quiet and streamed:
            out.write("\n")
        print(f"lowbit generate: error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        out.write("\n")
        if result.text is not None:
            out.write(f"text: {result.text}\n")
    out.write(result.summary() + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.as_dict(), f, indent=1)
    return 0


def _add_compile(sub) -> None:
    from lowbit.generate import ACTIVATION_CHOICES, PRESETS, WEIGHT_CHOICES
    p = sub.add_parser("compile", help="compile a preset Llama ahead of time into an artifact directory",
                       description="Build a preset Llama (seeded weights), compile prefill (any length) and "
                                   "decode, and write code.so + weights.safetensors + manifest.json to -o. "
                                   "Load it with lowbit.aot.load / lowbit.aot.load_llama (no torch-mlir needed).")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="artifact directory to write")
    p.add_argument("--max-seq-len", type=int, default=256, help="KV cache length (longest prompt + new tokens)")
    p.add_argument("--target", choices=["avx512-bf16", "avx512", "avx2", "portable"], default=None,
                   help="CPU the code is built for (default: the best this CPU runs)")
    p.add_argument("--weights", choices=[w for w in WEIGHT_CHOICES if w != "none"], default="ternary")
    p.add_argument("--activations", choices=ACTIVATION_CHOICES, default="int8")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset's LlamaConfig field (e.g. --set n_layers=4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", "-f", action="store_true", help="replace DIR if it exists")
    p.add_argument("--verbose", "-v", action="store_true", help="log lowbit's diagnostics")
    p.set_defaults(func=_run_compile)


def _run_compile(args) -> int:
    import time

    import lowbit.aot
    from lowbit.compiler.artifact_format import ArtifactError
    from lowbit.generate import PRESETS

    cfg = _config_overrides(PRESETS[args.preset], args.set, "compile")
    t = time.perf_counter()
    try:
        path = lowbit.aot.compile_preset(cfg, args.output, max_seq_len=args.max_seq_len, seed=args.seed,
                                         weights=args.weights, activations=args.activations, target=args.target,
                                         overwrite=args.force)
    except (ArtifactError, ValueError) as e:
        print(f"lowbit compile: error: {e}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t
    art = lowbit.aot.load(path)
    print(f"{art.describe()}\ncompiled in {seconds:.1f} s (trace, compile, link: "
          f"{art.manifest['build']['seconds']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit", description="lowbit: low-bit LLMs compiled for the CPU")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    _add_compile(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
