#!/usr/bin/env bash
# Runs at image build time (Dockerfile): download model weights into the image.
set -euo pipefail
cd "$(dirname "$0")/.."
python src/build.py
