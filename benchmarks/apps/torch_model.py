"""The GPU benchmark's model: a small MLP in torch, built and called the same way in
the benchmark process and in the handler process.

8 linear layers of 4096 x 4096 (134M parameters, fp32), batch 1024: a few
milliseconds per call on a current data-centre GPU, so the handler path's
fixed cost is what the comparison shows.
"""

from __future__ import annotations

import os
from typing import Any

WIDTH = int(os.environ.get("BENCH_GPU_WIDTH", "4096"))
LAYERS = int(os.environ.get("BENCH_GPU_LAYERS", "8"))
BATCH = int(os.environ.get("BENCH_GPU_BATCH", "1024"))
DEVICE = os.environ.get("BENCH_GPU_DEVICE", "cuda")  # "cpu" only to try the benchmark out


def available() -> str:
    """'' when the model can run here, else why not."""
    try:
        import torch
    except ImportError:
        return "torch not installed (pip install torch on a machine with a CUDA device)"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return ""


def describe() -> str:
    import torch

    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU"
    return f"{name}, torch {torch.__version__}, MLP {LAYERS}×{WIDTH}², batch {BATCH}"


def build() -> Any:
    import torch

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(LAYERS):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.GELU()]
    model = torch.nn.Sequential(*layers).to(DEVICE).eval()
    infer(model, {"seed": 0})  # CUDA context, kernels and allocator warm
    return model


def infer(model: Any, request: dict[str, Any]) -> dict[str, float]:
    """One call: an input batch made on the device from ``seed``, the forward pass, a scalar."""
    import torch

    with torch.inference_mode():
        gen = torch.Generator(device=DEVICE).manual_seed(int(request.get("seed", 0)))
        x = torch.randn(BATCH, WIDTH, device=DEVICE, generator=gen)
        return {"sum": float(model(x).sum().item())}  # .item() waits for the device
