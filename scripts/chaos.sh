#!/usr/bin/env bash
# The chaos suite (tests/chaos) for as long as you like; CI runs it for 25 s.
#
#   scripts/chaos.sh [--minutes N] [--seed S] [--logs DIR] [extra pytest arguments]
#
# Sync, async and streaming traffic while handler processes, supervisors and the
# gateway are SIGKILLed and webhooks fail; then every accepted request must have
# exactly one terminal status, no webhook may arrive twice, and no process may be
# left. The run's counts are printed; the processes' logs stay in DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }
minutes=5 seed="" logs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --logs) logs=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) break ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
seconds=$("$py" -c "import sys; print(round(float(sys.argv[1]) * 60))" "$minutes")
logs=${logs:-$(mktemp -d "${TMPDIR:-/tmp}/spirit-chaos.XXXXXX")}
export CHAOS_SECONDS=$seconds CHAOS_SEED=$seed CHAOS_LOGS=$logs
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "chaos: ${seconds} s of traffic, logs in $logs" >&2
# the run itself is the first test's set-up: give it its length plus time to settle
exec "$py" -m pytest -p no:cacheprovider -q -rfEX --timeout $((seconds + 600)) \
  tests/chaos/test_chaos.py "$@"
