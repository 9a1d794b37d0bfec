"""`python -m spirit_gpu.builder`, the same as the `spirit-gpu-builder` command."""

import sys

from spirit_gpu.builder.cli import main

sys.exit(main())
