"""spirit-gpu: run GPU inference code as a serverless worker.

>>> from spirit_gpu import start, logger
>>> start({"handler": handler})
"""

from spirit_gpu.env import Env
from spirit_gpu.errors import HandlerError
from spirit_gpu.log import logger
from spirit_gpu.start import start

__all__ = ["Env", "HandlerError", "logger", "start"]
__version__ = "0.2.0"
