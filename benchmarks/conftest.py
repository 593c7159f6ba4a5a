"""Shared benchmark settings: every result records the device it ran on."""

import os
import platform

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["rcfd_device"] = device_name()
    machine_info["torch"] = torch.__version__
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except Exception:
        machine_info["triton"] = None


@pytest.fixture
def cuda_sync():
    """A callable that waits for the GPU (a no-op on the CPU), for timing inside a call."""
    if torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None
