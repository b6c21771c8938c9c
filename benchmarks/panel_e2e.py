"""End-to-end prefill with the AVX-512 panel tiles against the register tiles, one process.

The 1b (or any e2e.py) preset is compiled once under LOWBIT_ISA=avx512 (the path of a CPU
without AMX); compiled code dispatches its tiles per call, so setting `qgemm.panel_rule()`
between rounds switches every prefill tile of 1-/2-/4-bit codes past the panel thresholds
between the panel tiles ("always") and the register tiles ("never"). The header states what
the default "measured" rule chose on this CPU (`qgemm.panel_speedup`). Rounds
alternate the order; each prefills the same 128-token prompt. Reported: tok/s median
[min..max] per path and the median of per-round ratios; the two paths' logits must be equal
bit for bit (the panel tiles share the register tiles' flush).

    python benchmarks/panel_e2e.py [--model 1b] [--rounds 12] [--threads 2]
        [--out benchmarks/results/panel_e2e.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["LOWBIT_ISA"] = "avx512"
os.environ.setdefault("LOWBIT_CACHE", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import e2e  # noqa: E402
import peaks as peaks_mod  # noqa: E402

from lowbit.generate import CompileCounter, _LlamaRunner, build_llama  # noqa: E402
from lowbit.runtime import qgemm  # noqa: E402

PROMPT = 128


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "panel_e2e.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = e2e._config(args.model, PROMPT)
    spec = e2e.SYSTEMS["lowbit-int4head-avx512"]  # e2e.py's system held to VNNI, the same model
    model, _ = build_llama(cfg, 0, spec["weights"], spec["activations"], dtype=getattr(torch, spec["dtype"]),
                           head=spec["head"], fused=spec["fused"])
    counter = CompileCounter("lowbit")
    runner = _LlamaRunner(model, torch.compile(model, backend=counter), dynamic=True, counter=counter)
    prompt = torch.tensor(e2e.prompt_ids(0, PROMPT, cfg.vocab_size))
    paths = {"register": "never", "panel": "always"}
    speedups = {bits: round(qgemm.panel_speedup(bits), 3) for bits in (1, 2, 4)}
    rates = {p: [] for p in paths}
    logits = {}
    load0 = os.getloadavg()[0]
    with torch.no_grad():
        runner.reset()
        runner.prefill(prompt)  # compile and warm up
        for rnd in range(args.rounds):
            for path in (paths if rnd % 2 == 0 else list(paths)[::-1]):
                old = qgemm.panel_rule(paths[path])
                try:
                    before = qgemm.panel_invocations()
                    runner.reset()
                    t0 = time.perf_counter()
                    out = runner.prefill(prompt)
                    t1 = time.perf_counter()
                    if (qgemm.panel_invocations() > before) != (path == "panel"):
                        raise SystemExit(f"the {path} rounds did not run the {path} tiles")
                finally:
                    qgemm.panel_rule(old)
                logits.setdefault(path, out.clone())
                rates[path].append(PROMPT / (t1 - t0))
    equal = torch.equal(logits["panel"], logits["register"])
    peaks_mod.report_pair(
        rates, header=f"{args.threads} threads; LOWBIT_ISA=avx512; model {args.model}; {args.rounds} "
        f"interleaved rounds; load average {load0:.1f}; the measured rule's speedups per code "
        f"width {speedups} (panel taken above 1)", ratio_key="panel_over_register", equal=equal,
        out=args.out, model=args.model, threads=args.threads, isa="avx512", prompt_tokens=PROMPT,
        rounds=args.rounds, measured_speedups=speedups, loadavg=[load0, os.getloadavg()[0]])
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
