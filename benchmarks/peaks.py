"""This machine's peaks, measured in one run with short native loops (issue 14, item 4).

Compute peaks: 24 independent accumulator chains of one instruction (runtime/native/src/
qbench_avx512.cpp), run on 1 and on 2 threads started together:

    vnni_zmm   vpdpbusd zmm    64 int8 MACs / instruction   (AVX512_VNNI)
    vnni_ymm   vpdpbusd ymm    32 int8 MACs                 (AVX512_VNNI + VL)
    bf16_zmm   vdpbf16ps zmm   32 bf16 MACs                 (AVX512_BF16)
    fma_zmm    vfmadd231ps zmm 16 fp32 MACs                 (AVX512F)
    fma_ymm    vfmadd231ps ymm  8 fp32 MACs                 (AVX512VL / FMA)
    amx_int8   tdpbsud         16384 int8 MACs (16x16x64)  (AMX-INT8; qbench_amx.cpp: 4
    amx_bf16   tdpbf16ps        8192 bf16 MACs (16x16x32)  (AMX-BF16)  independent C tiles)

A chain of dependent 1-cycle integer adds measures the core clock of the same run, so each
rate is also given in instructions per cycle (= the number of pipes that execute it).

Read bandwidth: 1 and 2 threads summing a buffer of max(4 x L3, 256 MiB) (the old 64 MiB
probe of microkernels.py fit in a 32 MiB-L3 machine's caches often enough to read 48 GB/s).

Rounds are interleaved (every kind, both thread counts, per round) and the table reports the
median and the spread (min..max) over rounds. Compute rates use each thread's CPU time
(preemption on a shared machine does not count; the wall-clock rates are in the JSON);
bandwidth uses wall-clock time. "peak" for the fraction-of-peak of other benchmarks is the
median over rounds.

    python benchmarks/peaks.py [--rounds 7] [--burst-ms 20] [--out benchmarks/results/peaks.json]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from lowbit.runtime import cpu_features, load_runtime

# name: (native kind, MACs per instruction, required features, what)
KINDS = {
    "vnni_zmm": (0, 64, {"avx512_vnni", "avx512f"}, "vpdpbusd zmm (int8)"),
    "vnni_ymm": (1, 32, {"avx512_vnni", "avx512vl"}, "vpdpbusd ymm (int8)"),
    "bf16_zmm": (2, 32, {"avx512_bf16"}, "vdpbf16ps zmm (bf16)"),
    "fma_zmm": (3, 16, {"avx512f"}, "vfmadd231ps zmm (fp32)"),
    "fma_ymm": (4, 8, {"avx512vl", "fma"}, "vfmadd231ps ymm (fp32)"),
    "amx_int8": (5, 16384, {"amx_int8"}, "tdpbsud tile (int8)"),
    "amx_bf16": (6, 8192, {"amx_bf16"}, "tdpbf16ps tile (bf16)"),
}
CLOCK_KIND = 100
CHAINS = 24  # instructions per loop iteration


def native():
    lib = load_runtime()
    lib.lowbit_qbench_peak.restype = ctypes.c_int64
    lib.lowbit_qbench_peak.argtypes = [ctypes.c_int32, ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p]
    lib.lowbit_qbench_read.restype = ctypes.c_int64
    lib.lowbit_qbench_read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int64]
    return lib


def cpu_description() -> dict:
    info = {"model": "unknown", "flags": [], "family": None, "model_id": None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key, val = key.strip(), val.strip()
                if key == "model name" and info["model"] == "unknown":
                    info["model"] = val
                elif key == "cpu family" and info["family"] is None:
                    info["family"] = int(val)
                elif key == "model" and info["model_id"] is None:
                    info["model_id"] = int(val)
                elif key == "flags" and not info["flags"]:
                    info["flags"] = [fl for fl in val.split() if fl.startswith(("avx", "amx", "fma"))]
    except OSError:
        pass
    info["cpus"] = os.cpu_count()
    info["l3_bytes"] = l3_bytes()
    info["detected"] = sorted(cpu_features())
    return info


def l3_bytes() -> int:
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (idx / "level").read_text().strip() != "3":
                continue
            txt = (idx / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


class Peaks:
    def __init__(self, lib=None):
        self.lib = lib or native()
        feats = cpu_features()
        self.available = {k: v[2] <= feats for k, v in KINDS.items()}
        self.iters: dict[str, int] = {}

    def _calibrate(self, kind: int, burst_s: float) -> int:
        iters = 10_000
        while True:
            ns = self.lib.lowbit_qbench_peak(kind, iters, 1, None)
            if ns >= 2e6 or iters > 1 << 34:
                return max(1000, int(iters * burst_s * 1e9 / ns))
            iters *= 4

    def burst(self, name: str, threads: int, burst_s: float = 0.02) -> dict:
        """One burst of `name` (or "clock") on `threads` threads: instructions/s per thread
        from CPU time (each thread's own), and the aggregate wall-clock rate."""
        kind = CLOCK_KIND if name == "clock" else KINDS[name][0]
        if name not in self.iters:
            self.iters[name] = self._calibrate(kind, burst_s)
        iters = self.iters[name]
        cpu = (ctypes.c_int64 * threads)()
        wall = self.lib.lowbit_qbench_peak(kind, iters, threads, cpu)
        insts = iters * CHAINS
        per_thread = [insts / (c * 1e-9) for c in cpu]
        return {"insts_per_s_threads": per_thread, "insts_per_s_wall": insts * threads / (wall * 1e-9)}

    def macs_per_s(self, name: str, threads: int = 1) -> float:
        """One burst of peak `name` as multiply-accumulates per second, summed over `threads`
        threads (each from its own CPU time)."""
        return sum(self.burst(name, threads)["insts_per_s_threads"]) * KINDS[name][1]

    def read_bandwidth(self, buf: np.ndarray, threads: int) -> float:
        nbytes = buf.nbytes // (512 * threads) * 512 * threads
        ns = self.lib.lowbit_qbench_read(buf.ctypes.data, nbytes, threads, 1)
        return nbytes / (ns * 1e-9)


def amx_missing(flag: str = "amx_int8") -> str | None:
    """Why this process cannot run AMX tiles needing `flag` (amx_int8, amx_bf16), or None."""
    from lowbit.runtime import supported_isas
    if flag not in cpu_features():
        return f"lacks {flag.upper().replace('_', '-')}"
    if "amx" not in supported_isas():
        return "has AMX but Linux refused the tile state"
    return None


def write_json(out: str | Path, result: dict) -> Path:
    """A benchmark's result file (parents created), reported on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return out


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def report_pair(rates: dict[str, list[float]], *, header: str, ratio_key: str, equal: bool,
                out: str | Path, **fields) -> dict:
    """Print and write a two-variant prefill comparison of one process: `rates` maps the
    first then the second variant to tok/s per round; the ratio is second / first per round.
    `fields` go into the JSON after the CPU; `equal`: whether their logits matched."""
    (first, a), (second, b) = rates.items()
    result = {"cpu": cpu_description(), **fields, "logits_equal": equal,
              "prefill_tok_s": {v: summarize(r) for v, r in rates.items()},
              ratio_key: summarize([y / x for x, y in zip(a, b)])}
    print(f"# {result['cpu'].get('model', '?')}; {header}")
    width = max(10, *(len(v) for v in rates))
    print(f"{'':{width}s} {'prefill tok/s median [min..max]':>34s}")
    for v, r in rates.items():
        print(f"{v:{width}s} {statistics.median(r):14.1f} [{min(r):.1f}..{max(r):.1f}]")
    r = result[ratio_key]
    print(f"{second} / {first}, median of per-round ratios: {r['median']:.3f} [{r['min']:.3f}..{r['max']:.3f}]; "
          f"logits equal bit for bit: {equal}")
    write_json(out, result)
    return result


def measure(rounds: int = 7, burst_ms: float = 20.0, threads=(1, 2), bandwidth: bool = True,
            kinds=None, log=print) -> dict:
    p = Peaks()
    kinds = [k for k in (kinds or KINDS) if p.available[k]]
    burst_s = burst_ms / 1000
    raw: dict[str, dict[int, list]] = {k: {t: [] for t in threads} for k in ["clock", *kinds]}
    buf = None
    bw: dict[int, list[float]] = {t: [] for t in threads}
    if bandwidth:
        size = max(4 * l3_bytes(), 256 << 20)
        buf = np.ones(size // 8, dtype=np.uint64)  # touched: no page faults while timing
    load0 = os.getloadavg()[0]
    t_start = time.time()
    for r in range(rounds):
        for name in ["clock", *kinds]:
            for t in threads:
                raw[name][t].append(p.burst(name, t, burst_s))
        if buf is not None:
            for t in threads:
                bw[t].append(p.read_bandwidth(buf, t))
        log(f"  round {r + 1}/{rounds} done")
    del buf
    out = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
           "cpu": cpu_description(), "load_average_start": load0,
           "load_average_end": os.getloadavg()[0], "seconds": time.time() - t_start,
           "rounds": rounds, "burst_ms": burst_ms, "threads": list(threads), "peaks": {},
           "bandwidth": {}}
    clock = {t: summarize([sum(b["insts_per_s_threads"]) / t for b in raw["clock"][t]]) for t in threads}
    out["clock_hz"] = clock
    for name in kinds:
        macs = KINDS[name][1]
        entry = {"what": KINDS[name][3], "macs_per_instruction": macs}
        for t in threads:
            cpu_rates = [sum(b["insts_per_s_threads"]) * macs for b in raw[name][t]]
            wall_rates = [b["insts_per_s_wall"] * macs for b in raw[name][t]]
            # instructions per cycle of one core, against the clock bursts of the same rounds
            ipc = [sum(b["insts_per_s_threads"]) / sum(c["insts_per_s_threads"])
                   for b, c in zip(raw[name][t], raw["clock"][t])]
            entry[f"{t}t"] = {"mac_per_s": summarize(cpu_rates), "mac_per_s_wall": summarize(wall_rates),
                              "instructions_per_cycle_per_core": summarize(ipc)}
        out["peaks"][name] = entry
    feats = cpu_features()
    for name in KINDS:
        if name not in kinds and name in KINDS and not p.available[name]:
            out["peaks"][name] = {"absent": f"CPU lacks {', '.join(sorted(KINDS[name][2] - feats))}"}
    if bandwidth:
        out["bandwidth"] = {"buffer_bytes": max(4 * l3_bytes(), 256 << 20),
                            **{f"{t}t": summarize(bw[t]) for t in threads}}
    return out


def peak_mac_per_s(result: dict, name: str, threads: int = 1, stat: str = "median") -> float | None:
    entry = result["peaks"].get(name, {})
    if "absent" in entry or f"{threads}t" not in entry:
        return None
    return entry[f"{threads}t"]["mac_per_s"][stat]


def format_table(res: dict) -> str:
    cpu = res["cpu"]
    lines = [f"# CPU: {cpu['model']} (family {cpu['family']}, model {cpu['model_id']}), "
             f"{cpu['cpus']} CPUs, L3 {cpu['l3_bytes'] >> 20} MiB",
             f"# flags: {' '.join(cpu['flags'])}",
             f"# load average {res['load_average_start']:.1f} -> {res['load_average_end']:.1f} "
             f"(machine shared); {res['rounds']} interleaved rounds of {res['burst_ms']:.0f} ms bursts; "
             "median [min..max] over rounds; compute from thread CPU time",
             ""]
    ck = res["clock_hz"]
    lines.append("core clock (dependent adds): " + ", ".join(
        f"{t}: {ck[t]['median'] / 1e9:.2f} GHz [{ck[t]['min'] / 1e9:.2f}..{ck[t]['max'] / 1e9:.2f}]"
        for t in ck))
    lines.append("")
    hdr = f"{'peak':10s} {'instruction':26s} " + " ".join(
        f"{f'{t} thread GMAC/s':>26s}" for t in res["threads"]) + f" {'instr/cycle/core':>18s}"
    lines += [hdr, "-" * len(hdr)]
    for name, e in res["peaks"].items():
        if "absent" in e:
            lines.append(f"{name:10s} {'absent: ' + e['absent']}")
            continue
        cells = []
        for t in res["threads"]:
            s = e[f"{t}t"]["mac_per_s"]
            cells.append(f"{s['median'] / 1e9:9.1f} [{s['min'] / 1e9:6.1f}..{s['max'] / 1e9:6.1f}]")
        ipc = e[f"{res['threads'][0]}t"]["instructions_per_cycle_per_core"]
        lines.append(f"{name:10s} {e['what']:26s} " + " ".join(f"{c:>26s}" for c in cells)
                     + f" {ipc['median']:8.2f} [{ipc['min']:.2f}..{ipc['max']:.2f}]")
    if res.get("bandwidth"):
        b = res["bandwidth"]
        lines.append("")
        lines.append(f"read bandwidth ({b['buffer_bytes'] >> 20} MiB buffer, wall clock): " + ", ".join(
            f"{t} thread(s) {b[f'{t}t']['median'] / 1e9:.1f} GB/s [{b[f'{t}t']['min'] / 1e9:.1f}.."
            f"{b[f'{t}t']['max'] / 1e9:.1f}]" for t in res["threads"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--burst-ms", type=float, default=20.0)
    ap.add_argument("--no-bandwidth", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "peaks.json"))
    args = ap.parse_args()
    res = measure(rounds=args.rounds, burst_ms=args.burst_ms, bandwidth=not args.no_bandwidth)
    print(format_table(res))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1))
    os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
