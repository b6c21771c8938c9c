"""A Hugging Face BitNet model, compiled by lowbit, generating with HF's own `generate()`.

No hub access is needed: the script builds a small `BitNetForCausalLM` through transformers'
own BitNet integration (packed ternary weights, int8 activations) with random deterministic
weights, saves it as a model directory (config.json + model.safetensors), loads it back as a
user's checkpoint would be loaded, and then:

1. makes it compilable (`lowbit.hf.prepare`: transformers' BitLinear carries nested
   `@torch.compile` helpers that make dynamo fail under any outer torch.compile),
2. compiles `model.forward` with `backend="lowbit"` as Hugging Face documents torch.compile,
3. runs `model.generate()` greedily with a static KV cache and checks the tokens against eager,
4. runs the same directory through `lowbit.generate` for llama.cpp-style figures.

    pip install 'lowbit[hf]'
    python examples/generate_hf_bitnet.py                  # tiny: 2 layers, hidden 128
    python examples/generate_hf_bitnet.py --hidden 512 --layers 4 --new-tokens 16
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

import lowbit
from lowbit import hf
from lowbit.generate import CompileCounter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    config = hf.bitnet_config(hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                              num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
                              num_key_value_heads=max(1, args.hidden // 64), vocab_size=args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(hf.make_bitnet(config, seed=0), tmp)
        model = hf.load_pretrained(tmp)
        ids = torch.randint(3, args.vocab, (1, 12), generator=torch.Generator().manual_seed(0))
        gen = dict(max_new_tokens=args.new_tokens, do_sample=False, cache_implementation="static", pad_token_id=0)

        with torch.no_grad():
            eager = model.generate(ids, **gen)[0, ids.shape[1]:].tolist()
        hf.prepare(model)
        counter = CompileCounter("lowbit")
        model.forward = torch.compile(model.forward, backend=counter)
        t = time.perf_counter()
        with torch.no_grad():
            compiled = model.generate(ids, **gen)[0, ids.shape[1]:].tolist()
        print(f"HF generate() with backend=lowbit (static cache): {time.perf_counter() - t:.1f} s incl. compiling, "
              f"{counter.compiles} compile(s)")
        print(f"  eager tokens:    {eager}")
        print(f"  compiled tokens: {compiled}  same: {compiled == eager}")

        print("\nlowbit.generate on the same directory:")
        result = lowbit.generate(tmp, ids[0].tolist(), args.new_tokens, cache="static")
        print(result.summary())


if __name__ == "__main__":
    main()
