#!/usr/bin/env bash
# Run the project's checks and test suite (the README's test command) in setup.sh's .venv.
# Lint and types first (fast), then pytest; "no tests collected" is a failure.
# PYTHON=/path/to/python runs them with another interpreter that has the package installed.
set -uo pipefail
cd "$(dirname "$0")"
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
  export VIRTUAL_ENV="$PWD/.venv"
  export PATH="$PWD/.venv/bin:$PATH"  # console scripts (microvm) and tools from the venv
else
  echo "run-tests.sh: no .venv in $PWD: run ./setup.sh first" >&2
  exit 1
fi
"$PY" -m ruff check . || exit 1
"$PY" -m mypy rootfs netstack tls_proxy microvm || exit 1
"$PY" -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run-tests.sh: no tests were collected" >&2
  exit 1
fi
exit "$rc"
