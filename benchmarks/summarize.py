"""Turn a pytest-benchmark JSON file into the Markdown tables of benchmarks/RESULTS.md.

    python benchmarks/summarize.py results.json > summary.md

Each group (one shape / setting) becomes a table: every implementation's mean time and its
speed-up over the group's baseline (``eager`` when present), measured in the same run, plus
the throughput figures the benchmark stored in ``extra_info``.
"""

import json
import sys
from collections import defaultdict

SHOWN_EXTRA = ("images_per_s", "GBps_effective", "pct_of_copy", "copy_GBps", "per_op_us",
               "step_ms", "mfu", "tflops", "speedup_vs_eager", "compile_s", "first_call_s",
               "dtype", "target", "note")


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def impl_name(bench: dict) -> str:
    extra = bench.get("extra_info", {})
    return str(extra.get("impl") or extra.get("mode") or bench["name"])


def summarize(data: dict) -> str:
    info = data.get("machine_info", {})
    out = [
        f"Device: {info.get('rcfd_device', '?')}; torch {info.get('torch', '?')}, "
        f"triton {info.get('triton', '?')}; run {data.get('datetime', '?')}",
        "",
    ]
    groups = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench.get("group") or bench["name"]].append(bench)
    for group in sorted(groups):
        benches = groups[group]
        # the baseline is the eager PyTorch implementation of the group
        base = next((b for b in benches if "eager" in impl_name(b)), None)
        out += [f"### {group}", "", "| impl | mean | speed-up vs " + (impl_name(base) if base else "-")
                + " | rounds | notes |", "|---|---|---|---|---|"]
        for b in sorted(benches, key=lambda b: b["stats"]["mean"], reverse=True):
            mean = b["stats"]["mean"]
            extra = b.get("extra_info", {})
            per_call = extra.get("ops_per_call") or extra.get("calls_per_round")
            shown = dict((k, extra[k]) for k in SHOWN_EXTRA if k in extra)
            if per_call:
                shown["per_op"] = fmt_time(mean / per_call)
            notes = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
            ratio = f"{base['stats']['mean'] / mean:.2f}x" if base else "-"
            out.append(f"| {impl_name(b)} | {fmt_time(mean)} | {ratio} | {b['stats']['rounds']} | {notes} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(summarize(json.load(f)))
