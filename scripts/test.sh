#!/usr/bin/env bash
# Install spirit-gpu with its test dependencies into .venv, lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]' >/dev/null 2>&1 || .venv/bin/pip install -e '.[test]'
.venv/bin/ruff check spirit_gpu tests benchmarks
.venv/bin/mypy spirit_gpu benchmarks
# The original spirit-gpu worker from the registry, in a venv of its own (tests/compat);
# without it those tests skip, unless SPIRIT_REQUIRE_ORIGINAL=1 (CI) makes that an error.
if ! .venv/bin/python -m tests.compat.original_venv; then
  [ "${SPIRIT_REQUIRE_ORIGINAL:-0}" = 1 ] && exit 1
  echo "tests/compat: the original worker's venv could not be made; its tests will skip" >&2
fi
# Most tests wait on processes and sockets, not on the CPU: four at a time finish in
# about 100 s on 2 cores (about 270 s one at a time). `scripts/test.sh -n 0` runs them serially.
.venv/bin/pytest -q -rs -p no:cacheprovider -n 4 "$@"
