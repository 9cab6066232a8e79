#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install pinned dependencies.
#
# Idempotent: the install runs again only when a requirements file changed.
# Usage: scripts/setup_env.sh [--test]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
want_test=0
[ "${1:-}" = '--test' ] && want_test=1

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi

stamp_src="$root/requirements/runtime.txt"
[ "$want_test" = 1 ] && stamp_src="$stamp_src $root/requirements/test.txt"
stamp_hash=$(cat $stamp_src "$root/setup.py" | sha256sum | cut -c1-16)
stamp="$venv/.installed-$stamp_hash"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing pinned dependencies (first run takes about a minute)"
  "$venv/bin/pip" install --quiet -r "$root/requirements/runtime.txt"
  # robosuite without its GUI extras (opencv-python would clash with the headless build).
  "$venv/bin/pip" install --quiet --no-deps robosuite==1.5.2
  if [ "$want_test" = 1 ]; then
    "$venv/bin/pip" install --quiet -r "$root/requirements/test.txt"
  fi
  "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$root"
  touch "$stamp"
fi
