#!/usr/bin/env bash
# The NATS failure and cluster tests with ten times the load (minutes, not CI):
# prints each test's counts (sent, accepted, terminal, lost, duplicated).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SPIRIT_NATS_SCALE=${SPIRIT_NATS_SCALE:-10} "$PY" -m pytest -q -s -p no:cacheprovider \
  tests/nats/test_failures.py tests/nats/test_cluster.py "$@"
