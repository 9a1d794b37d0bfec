#!/bin/sh
# Benchmark dependencies. Run from the repository root:
#   sh benchmarks/install.sh
# * wrk (load generator) and nginx (reverse-proxy baseline) from apt, when missing;
# * the `bench` extra into the project's venv: runpod-python (peer), rich (tables),
#   matplotlib (benchmarks/plot.py), py-spy (profiles);
# * LiteLLM's proxy (peer) into a venv of its own, benchmarks/.venv-litellm
#   (or $LITELLM_VENV), so its many dependencies never touch the project's.
set -e
PY="${PYTHON:-.venv/bin/python}"
need=""
command -v wrk >/dev/null 2>&1 || need="$need wrk"
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need="$need nginx"
if [ -n "$need" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update && $SUDO apt-get install -y $need
  else
    echo "install$need with your package manager (benchmarks that need them say skipped)" >&2
  fi
fi
"$PY" -m pip install -e ".[bench]"
LITELLM_VENV="${LITELLM_VENV:-benchmarks/.venv-litellm}"
[ -x "$LITELLM_VENV/bin/python" ] || "${LITELLM_PYTHON:-python3}" -m venv "$LITELLM_VENV"
"$LITELLM_VENV/bin/python" -m pip install "litellm[proxy]"
