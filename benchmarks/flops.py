"""FLOPs of a training step and model FLOP utilisation (MFU) for the benchmarks.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``: the matrix products,
convolutions and attention of everything the counted call runs, forward and backward (the
elementwise work is not counted, as usual for MFU). MFU is those FLOPs per second over the
card's dense bf16 peak, from a small table of data-sheet figures keyed by
``torch.cuda.get_device_name``; other cards report "peak unknown".

    python benchmarks/flops.py   # the U-Net and classifiers' FLOPs per image, on the CPU
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core peak in FLOP/s, from NVIDIA's data sheets. The most
# specific name comes first: "H100" alone is the SXM card ("NVIDIA H100 80GB HBM3").
PEAK_BF16_DENSE: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_flops(device_name: str | None = None) -> float | None:
    """The dense bf16 peak of the card named ``device_name`` (default: the current CUDA
    device), or ``None`` when the table does not know it (or there is no GPU)."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_DENSE:
        if key in device_name:
            return peak
    return None


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward and any backward it runs)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """``flops / seconds / peak``, or ``None`` when the peak is unknown."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / peak


def describe_mfu(value: float | None) -> str:
    return "peak unknown" if value is None else f"{100 * value:.1f}%"


def _per_image() -> None:
    """Forward FLOPs per image of the networks of the training steps (CPU, batch 2)."""
    from rcfd.core.classifiers import ClassifierConfig, build  # the script's own imports
    from rcfd.core.unet import UNet, UNetConfig

    x = torch.randn(2, 3, 32, 32)
    t = torch.full((2,), 512, dtype=torch.int64)
    unet = UNet(UNetConfig.cifar10(dropout=0.0)).eval()
    with torch.no_grad():
        print(f"U-Net (CIFAR-10): {count_flops(lambda: unet(x, t)) / 2 / 1e9:.2f} GFLOP/image")
        for arch in ("resnet18", "densenet201"):
            net = build(ClassifierConfig(name=arch)).eval()
            print(f"{arch}: {count_flops(lambda: net(x)) / 2 / 1e9:.2f} GFLOP/image")


if __name__ == "__main__":
    _per_image()
