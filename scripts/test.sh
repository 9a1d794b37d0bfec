#!/usr/bin/env bash
# Install spirit-gpu with its test dependencies into .venv, lint, type-check, test.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e '.[test]' >/dev/null 2>&1 || .venv/bin/pip install -e '.[test]'
.venv/bin/ruff check spirit_gpu tests benchmarks
.venv/bin/mypy spirit_gpu
.venv/bin/pytest -q -p no:cacheprovider "$@"
