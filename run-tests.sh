#!/usr/bin/env bash
# Run the project's checks and test suite (the README's test command).
# Lint and types first (fast), then pytest; "no tests collected" is a failure.
set -uo pipefail
cd "$(dirname "$0")"
python3 -m ruff check . || exit 1
python3 -m mypy rootfs netstack tls_proxy microvm || exit 1
python3 -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run-tests.sh: no tests were collected" >&2
  exit 1
fi
exit "$rc"
