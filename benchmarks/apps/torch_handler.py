"""spirit-gpu handler serving apps/torch_model.py (sync handler, model built once per process)."""

import importlib
import os
from typing import Any

from spirit_gpu import start
from spirit_gpu.env import Env

model_module = importlib.import_module(os.environ.get("BENCH_GPU_MODEL_MODULE", "torch_model"))
MODEL = model_module.build()


def handler(request: dict[str, Any], env: Env) -> Any:
    return model_module.infer(MODEL, request["input"])


start({"handler": handler})
