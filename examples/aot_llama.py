"""Compile a Llama once into an artifact, then generate from it in a process without the compiler.

    python examples/aot_llama.py                         # demo preset -> demo.lowbit, then generate
    python examples/aot_llama.py --preset tiny --out /tmp/tiny.lowbit -n 8
    python examples/aot_llama.py --run-only --out demo.lowbit   # just load and generate

The second step runs in a fresh interpreter in which importing torch-mlir raises: the artifact
needs only torch, lowbit's runtime library and OpenMP.
"""
import argparse
import os
import subprocess
import sys
import time


def compile_artifact(args) -> None:
    import lowbit.aot

    t = time.perf_counter()
    lowbit.aot.compile_preset(args.preset, args.out, max_seq_len=args.max_seq_len, target=args.target,
                              overwrite=True)
    print(f"compiled {args.preset} -> {args.out} in {time.perf_counter() - t:.1f} s")


def run(args) -> None:
    import torch

    import lowbit.aot

    t = time.perf_counter()
    llama = lowbit.aot.load_llama(args.out)
    print(f"loaded {llama.artifact.describe()} in {time.perf_counter() - t:.3f} s "
          f"(torch-mlir imported: {'torch_mlir' in sys.modules})")
    prompt = torch.randint(0, llama.vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    tokens = llama.generate(prompt, args.n)
    print(f"{args.n} greedy tokens in {time.perf_counter() - t:.3f} s: {tokens}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--out", default="demo.lowbit")
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--target", default=None, choices=["avx512-bf16", "avx512", "avx2", "portable"])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("-n", type=int, default=16)
    ap.add_argument("--run-only", action="store_true", help="load and generate only (no compiling)")
    ap.add_argument("--no-block", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_only:
        run(args)
        return
    compile_artifact(args)
    # A fresh process that cannot import the compiler loads the artifact and generates.
    blocker = ("import sys\n"
               "class B:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('torch_mlir', 'mlir'):\n"
               "            raise ImportError(name + ' is not available here')\n"
               "sys.meta_path.insert(0, B())\n"
               f"sys.argv = {[__file__, '--run-only', '--out', args.out, '--prompt-len', str(args.prompt_len), '-n', str(args.n)]!r}\n"
               f"exec(open({os.path.abspath(__file__)!r}).read())\n")
    subprocess.run([sys.executable, "-c", blocker], check=True)


if __name__ == "__main__":
    main()
