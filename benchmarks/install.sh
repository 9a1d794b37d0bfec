#!/bin/sh
# Benchmark dependencies: wrk (load generator), nginx (reverse-proxy baseline),
# runpod-python (peer baseline), py-spy (profiles). Run from the repository root:
#   sh benchmarks/install.sh
set -e
PY="${PYTHON:-.venv/bin/python}"
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update && $SUDO apt-get install -y wrk nginx
fi
"$PY" -m pip install runpod py-spy
