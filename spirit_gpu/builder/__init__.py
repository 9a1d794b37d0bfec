"""`spirit-gpu-builder`: scaffold a worker project from a description of the request input."""


def main(argv: list[str] | None = None) -> int:
    """The ``spirit-gpu-builder`` command: says which extra to install when it is missing."""
    from spirit_gpu.extras import require

    require("builder", "spirit-gpu-builder")
    from spirit_gpu.builder.cli import main as run

    return run(argv)
