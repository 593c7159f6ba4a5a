"""Sweep the launch settings of the feature-KL forward kernel on a GPU.

    python benchmarks/tune_feature_kl.py [--json out.json] [--shapes 128x2048 16384x4096]
                                         [--dtypes float32 bfloat16]

For each shape and dtype it times the forward kernel alone (loss and gradient, as a training
step runs it) under every launch setting worth trying: rows per program and ``num_warps`` for
the whole-row kernel; chunk width and ``num_warps`` for the two-pass online kernel on long
rows; persistent programs with pipelined loads when there are many rows; always keeping 8 to
32 elements per thread per input. Each setting runs 16 calls over a pool of inputs larger
than L2, captured in a CUDA graph so that the GPU time is measured without host overhead;
the figure is the median of 10 replays. The table marks the setting that
:func:`rcfd.core.kernels.feature_kl.launch_config` picks today and the fastest one, with
bandwidth on the ``3 * itemsize`` minimum traffic against a device copy measured in the same
run. When the fastest beats today's pick by more than noise, retune ``ROW_TILE`` /
``ELEMS_PER_THREAD`` / ``MAX_ROW_BLOCK`` (or make :func:`launch_config` return the
persistent setting) in ``rcfd/core/kernels/feature_kl.py``.
"""

import argparse
import itertools
import json
import math
import statistics
import sys

import gpu_timing
import torch

from rcfd.core.kernels import feature_kl as fk

CALLS = 16  # forward calls per captured graph
POOL_BYTES = 256 << 20  # input pool per shape: well past any L2
DEFAULT_SHAPES = ("128x512", "128x2048", "16384x4096")
ROWS = (1, 2, 4, 8, 16, 32)
WARPS = (1, 2, 4, 8, 16)
ONLINE_CHUNKS = (512, 1024, 2048)
PER_SM, STAGES, PERSISTENT_WARPS = (1, 2), (2, 3), (8, 16)
PERSISTENT_MIN_TILES_PER_SM = 8
ELEMS_PER_THREAD = (8, 32)  # inclusive bounds, per input


def _fits(elems: int, warps: int) -> bool:
    return ELEMS_PER_THREAD[0] <= elems // (32 * warps) <= ELEMS_PER_THREAD[1]


def candidates(n_rows: int, n_cols: int, sms: int = 0) -> list[fk.LaunchConfig]:
    """Every launch setting inside the per-thread bounds: whole rows (several per program);
    for rows of 2048 columns or more the two-pass online kernel over narrower chunks
    (lighter programs, more of them per SM; the second pass re-reads from L2); and, given
    the GPU's ``sms``, persistent programs (1 or 2 per SM) looping over single rows with
    their loads pipelined 2 or 3 deep."""
    if n_cols > fk.MAX_ROW_BLOCK:
        raise SystemExit(f"{n_cols} columns take the online kernel; this sweep tunes rows "
                         f"of up to {fk.MAX_ROW_BLOCK} columns")
    block = max(fk.MIN_BLOCK, fk._next_pow2(n_cols))
    out = []
    for rows, warps in itertools.product(ROWS, WARPS):
        if rows <= n_rows and rows * block <= 32768 and _fits(rows * block, warps):
            out.append(fk.LaunchConfig(False, block, rows, warps, -(-n_rows // rows)))
    for chunk, warps in itertools.product(ONLINE_CHUNKS, WARPS):
        if 2 * chunk <= n_cols and _fits(chunk, warps):
            out.append(fk.LaunchConfig(True, chunk, 1, warps, n_rows))
    if sms and n_rows >= PERSISTENT_MIN_TILES_PER_SM * sms:  # enough tiles to loop over
        for per_sm, stages, warps in itertools.product(PER_SM, STAGES, PERSISTENT_WARPS):
            one_row = fk.LaunchConfig(False, block, 1, warps, n_rows)
            if _fits(block, warps):
                out.append(fk.persistent(one_row, per_sm * sms, stages))
    current = fk.launch_config(n_rows, n_cols)
    if current not in out:
        out.append(current)
    return out


def time_config(pool, cfg: fk.LaunchConfig) -> float:
    """Median GPU seconds of one forward call with launch setting ``cfg``."""
    def run():
        for i in range(CALLS):
            s, t = pool[i % len(pool)]
            fk._forward(s, t, 0.9, 1.0, "batchmean", True, cfg)

    return statistics.median(gpu_timing.replay_seconds(gpu_timing.capture(run))) / CALLS


def sweep(shape: str, dtype: torch.dtype, copy_gbps: float) -> list[dict]:
    n_rows, n_cols = map(int, shape.split("x"))
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = max(2, min(64, math.ceil(POOL_BYTES / (2 * n_rows * n_cols * itemsize))))
    pool = [tuple((torch.randn(n_rows, n_cols, device="cuda") * 3).to(dtype) for _ in "st")
            for _ in range(count)]
    current = fk.launch_config(n_rows, n_cols)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    records = []
    for cfg in candidates(n_rows, n_cols, sms):
        seconds = time_config(pool, cfg)
        gbps = 3 * itemsize * n_rows * n_cols / seconds / 1e9
        records.append(dict(shape=shape, dtype=str(dtype).removeprefix("torch."),
                            kernel="online" if cfg.online else "rows", rows=cfg.rows,
                            num_warps=cfg.num_warps, block_d=cfg.block_d, grid=cfg.grid,
                            stages=cfg.stages,
                            us=round(seconds * 1e6, 2), GBps=round(gbps, 1),
                            pct_of_copy=round(100 * gbps / copy_gbps, 1),
                            current=cfg == current))
    return records


def table(records: list[dict]) -> str:
    best = min(r["us"] for r in records)
    lines = ["| kernel | block | rows | warps | programs | stages | us per call | GB/s | "
             "% of copy | |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(records, key=lambda r: r["us"]):
        mark = ", ".join(m for m, on in (("today's pick", r["current"]),
                                         ("fastest", r["us"] == best)) if on)
        lines.append(f"| {r['kernel']} | {r['block_d']} | {r['rows']} | {r['num_warps']} | "
                     f"{r['grid']} | {r['stages']} | {r['us']} | {r['GBps']} | "
                     f"{r['pct_of_copy']} | {mark} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="BxD shapes (default: %(default)s)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", help="also write every timing to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or fk.triton is None:
        print("tune_feature_kl: needs a CUDA GPU and Triton; nothing to tune here",
              file=sys.stderr)
        return 1
    copy_gbps = gpu_timing.copy_bandwidth_gbps()
    print(f"{torch.cuda.get_device_name()}: device copy {copy_gbps:.0f} GB/s\n")
    records = []
    for shape, dtype in itertools.product(args.shapes, args.dtypes):
        rows = sweep(shape, getattr(torch, dtype), copy_gbps)
        records += rows
        print(f"### {shape} {dtype}\n\n{table(rows)}\n", flush=True)
        if args.json:  # after every shape, so a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(), copy_GBps=copy_gbps,
                               torch=torch.__version__, results=records), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
