"""What the hardware can do: datasheet peak FLOP/s per accelerator, device names, peak memory.

MFU = model FLOPs/s / datasheet dense peak (``performance.md`` §1): model FLOPs are 3 x the analytic forward
FLOPs of the trained network (``nanogen model-info``), never the 2:4-sparse peak. A CPU has no honest
datasheet peak, so on CPU the trainer reports achieved GFLOP/s instead (and ``nanogen benchmark`` measures a
matmul ceiling to compare against).
"""

from __future__ import annotations

import contextlib
import platform
import resource
import sys

import torch

# Dense tensor-core peaks in TFLOP/s: (bf16 with fp32 accumulate, tf32). Datasheet numbers; the first match of
# the name (lower case, in this order) wins, so the more specific names come first.
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("h100 nvl", 835.0, 417.5),
    ("h100 pcie", 756.0, 378.0),
    ("h100", 989.4, 494.7),  # SXM
    ("h200", 989.4, 494.7),  # same compute as H100 SXM, more and faster memory
    ("gh200", 989.4, 494.7),
    ("b200", 2250.0, 1125.0),
    ("a100", 312.0, 156.0),
    ("l40s", 362.1, 183.2),
    ("a10g", 70.0, 35.0),
    ("a10", 125.0, 62.5),
    ("l4", 121.0, 60.0),
    ("rtx 4090", 165.2, 82.6),
    ("rtx 3090", 71.0, 35.6),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()})"


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    """Datasheet dense peak FLOP/s of ``device`` for the training precision, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, bf16_tflops, tf32_tflops in PEAK_TFLOPS:
        if key in name:
            return (bf16_tflops if bf16 else tf32_tflops) * 1e12
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated CUDA memory on a GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9
