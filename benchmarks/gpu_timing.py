"""GPU timing helpers shared by the benchmarks and the tuning sweep (CUDA only)."""

import torch


def copy_bandwidth_gbps(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy of ``nbytes``: bytes read + written per second (CUDA events),
    the ceiling that bandwidth figures are compared with."""
    src = torch.empty(nbytes // 4, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    return 2 * src.nbytes / seconds / 1e9


def capture(run) -> torch.cuda.CUDAGraph:
    """``run()`` captured once as a CUDA graph, after three warm-up calls on a side stream
    (JIT compilation and allocations happen outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph


def replay_seconds(graph: torch.cuda.CUDAGraph, reps: int = 10) -> list[float]:
    """GPU seconds of each of ``reps`` replays of ``graph`` (CUDA events)."""
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times
