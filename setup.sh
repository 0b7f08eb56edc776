#!/usr/bin/env bash
# Install everything this project needs on a fresh Debian/Ubuntu machine (run as root):
# the Debian packages in deps/apt.txt, a virtual environment in .venv/ (in this checkout)
# holding the Python package installed editable (compiling the cffi extensions and the
# static guest agent) with its extras: test (pytest and the reference libraries), dev
# (ruff, mypy and type stubs, which ./run-tests.sh runs) and ray, and the guest kernel
# into vendor/.
# The system Python is left alone. Afterwards: `. .venv/bin/activate` (or run
# .venv/bin/microvm / .venv/bin/python directly); ./run-tests.sh uses .venv by itself.
# PYTHON=/path/to/python3.11+ picks the interpreter the venv is made from.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages)" >&2
  exit 1
fi

mapfile -t APT_PACKAGES < <(grep -vE '^\s*(#|$)' deps/apt.txt | sed 's/#.*//; s/[[:space:]]//g')
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# One virtual environment per checkout: two checkouts never re-point each other's
# editable install, and the system interpreter is not touched.
PYTHON=${PYTHON:-python3}
VENV=.venv
if ! "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  "$PYTHON" -m venv --clear "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# setuptools >= 77 reads the SPDX `license = "..."` string without deprecation warnings.
"$VPY" -m pip install -q --upgrade pip 'setuptools>=77' wheel 'cffi>=1.16'
# -qq: errors only (setuptools' informational "Editable installation" note is not one)
"$VPY" -m pip install -qq --no-build-isolation -e '.[test,dev,ray]'

# Guest kernel (libkrunfw) into vendor/, verified against pinned sha256s.
"$VPY" -m microvm kernel fetch --dest vendor
echo "setup.sh: done; use it with: . $VENV/bin/activate   (or $VENV/bin/microvm, $VENV/bin/python)"
