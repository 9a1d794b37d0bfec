"""Fails at import: `spirit-gpu dev` must stop with the worker's exit code."""

raise ImportError("this worker script is broken on purpose")
