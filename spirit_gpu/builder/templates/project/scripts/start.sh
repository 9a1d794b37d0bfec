#!/usr/bin/env bash
# Container entry point: the supervisor runs src/main.py in handler processes.
# exec, so that signals (docker stop) reach the supervisor itself.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m spirit_gpu.supervisor src/main.py
