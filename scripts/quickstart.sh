#!/usr/bin/env bash
# Install spirit-gpu into .venv, start a local gateway + the example worker,
# send one sync request and show its answer; then keep serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${PORT:-8000}"
[ -x .venv/bin/python ] || python3 -m venv .venv
echo "installing spirit-gpu[gateway] into .venv (the first time takes a minute or so)..."
.venv/bin/pip install -q -e '.[gateway]' >/dev/null 2>&1 || .venv/bin/pip install -e '.[gateway]'
KEY="${SPIRIT_API_KEY:-$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(24))')}"
.venv/bin/spirit-gpu dev examples/hello/main.py --port "$PORT" --api-key "$KEY" &
DEV=$!
# a terminal's Ctrl-C reaches dev itself (same process group): passing it on as well
# would be a second Ctrl-C, which stops running jobs at once instead of draining them
trap 'wait $DEV' INT
trap 'kill -INT $DEV 2>/dev/null; wait $DEV' EXIT TERM
for _ in $(seq 1 600); do
  if answer=$(curl -sf -X POST "http://127.0.0.1:$PORT/v1/local/sync" \
      -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
      -d '{"input": {"x": 21}}' 2>/dev/null); then
    echo "request {\"input\": {\"x\": 21}} answered: $answer"
    echo "serving on http://127.0.0.1:$PORT (API key $KEY); Ctrl-C stops."
    wait $DEV
    exit 0
  fi
  sleep 0.1
done
echo "the worker did not answer within 60 s" >&2
exit 1
