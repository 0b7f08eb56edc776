#!/usr/bin/env bash
# Install everything this project needs on a fresh Debian/Ubuntu machine (run as root):
# the Debian packages in deps/apt.txt, the Python package with its test extras
# (compiling the cffi extensions and the static guest agent), and the guest kernel into vendor/.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages)" >&2
  exit 1
fi

mapfile -t APT_PACKAGES < <(grep -vE '^\s*(#|$)' deps/apt.txt)
export DEBIAN_FRONTEND=noninteractive
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q --upgrade pip setuptools wheel cffi
python3 -m pip install -q -e '.[test]'

# Guest kernel (libkrunfw) into vendor/, verified against pinned sha256s.
if python3 -c 'import microvm.kernel' 2>/dev/null; then
  python3 -m microvm kernel fetch --dest vendor
fi
echo "setup.sh: done"
