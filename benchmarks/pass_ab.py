"""End-to-end prefill with and without one lowbit pass, one process.

The preset (e2e.py's `lowbit-int4head` model: ternary layers, int8 activations, int4 head)
is compiled twice in this process: once with `LOWBIT_DISABLE_PASSES=<pass>` ("without"),
once with the default pipeline ("with"). Rounds alternate the order; each takes the best
of `--repeat` prefills of the same 128-token prompt per variant. Reported: tok/s median
[min..max] per variant and the median of per-round ratios with / without; the logits of
the two must be equal bit for bit unless `--allow-different` (a pass that changes
rounding).

    python benchmarks/pass_ab.py --disable lowbit-parallel-copy [--model 1b] [--rounds 15]
        [--repeat 3] [--threads 2] [--out benchmarks/results/pass_ab.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("LOWBIT_CACHE", "0")  # compile both variants here, not from the cache

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402
import peaks as peaks_mod  # noqa: E402

from lowbit.compiler.pipeline import default_stages  # noqa: E402
from lowbit.generate import CompileCounter, _LlamaRunner, build_llama  # noqa: E402

PROMPT = 128
SYSTEM = "lowbit-int4head"


def _runner(cfg, disable: str) -> _LlamaRunner:
    """The preset compiled with `disable` left out of the pipeline ('' : the default one)."""
    os.environ["LOWBIT_DISABLE_PASSES"] = disable
    spec = e2e.SYSTEMS[SYSTEM]
    model, _ = build_llama(cfg, 0, spec["weights"], spec["activations"], dtype=getattr(torch, spec["dtype"]),
                           head=spec["head"], fused=spec["fused"])
    counter = CompileCounter("lowbit")
    return _LlamaRunner(model, torch.compile(model, backend=counter), dynamic=True, counter=counter)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--disable", required=True, help="the lowbit pass to measure (its NAME)")
    ap.add_argument("--model", default="1b")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--repeat", type=int, default=3, help="prefills per variant per round (best kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--allow-different", action="store_true", help="logits may differ")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pass_ab.json"))
    args = ap.parse_args(argv)
    if not any(args.disable == p.split("{")[0] for stage in default_stages() for p in stage.passes):
        raise SystemExit(f"{args.disable} is not a pass of the default pipeline")
    torch.set_num_threads(args.threads)
    cfg = e2e._config(args.model, PROMPT)
    prompt = torch.tensor(e2e.prompt_ids(0, PROMPT, cfg.vocab_size))
    runners, logits = {}, {}
    before = os.environ.get("LOWBIT_DISABLE_PASSES")
    try:
        with torch.no_grad():
            for variant, disable in (("without", args.disable), ("with", "")):
                runners[variant] = _runner(cfg, disable)
                runners[variant].reset()
                logits[variant] = runners[variant].prefill(prompt).clone()  # compiles
    finally:
        if before is None:
            os.environ.pop("LOWBIT_DISABLE_PASSES", None)
        else:
            os.environ["LOWBIT_DISABLE_PASSES"] = before
    rates = {v: [] for v in runners}
    load0 = os.getloadavg()[0]
    with torch.no_grad():
        for rnd in range(args.rounds):
            for variant in (list(runners) if rnd % 2 == 0 else list(runners)[::-1]):
                best = float("inf")
                for _ in range(args.repeat):
                    runners[variant].reset()
                    t0 = time.perf_counter()
                    runners[variant].prefill(prompt)
                    best = min(best, time.perf_counter() - t0)
                rates[variant].append(PROMPT / best)
    equal = torch.equal(logits["with"], logits["without"])
    peaks_mod.report_pair(
        rates, header=f"{args.threads} threads; {SYSTEM} {args.model}; {args.disable} without / with; "
        f"{args.rounds} interleaved rounds, best of {args.repeat}; load average {load0:.1f}",
        ratio_key="with_over_without", equal=equal, out=args.out, **{"pass": args.disable},
        model=args.model, system=SYSTEM, threads=args.threads, prompt_tokens=PROMPT, rounds=args.rounds,
        repeat=args.repeat, loadavg=[load0, os.getloadavg()[0]])
    return 0 if equal or args.allow_different else 1


if __name__ == "__main__":
    sys.exit(main())
