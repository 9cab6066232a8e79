#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install pinned dependencies.
#
# Idempotent: the install runs again only when a requirements file or setup.py changed.
# Usage: scripts/setup_env.sh [--test]     (--test adds the test and lint dependencies)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/.venv"
want_test=0
[ "${1:-}" = '--test' ] && want_test=1

if ! command -v python3 >/dev/null; then
  echo '[setup] python3 (3.11) is required' >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment in $venv"
  python3 -m venv "$venv"
fi

files="$root/requirements/runtime.txt $root/setup.py"
[ "$want_test" = 1 ] && files="$files $root/requirements/test.txt"
stamp="$venv/.installed-$(cat $files | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  log="$venv/pip-install.log"
  echo "[setup] installing pinned dependencies (about a minute; log: $log)"
  {
    "$venv/bin/python" -m pip install --upgrade pip
    "$venv/bin/pip" install -r "$root/requirements/runtime.txt"
    # robosuite without its GUI dependencies (opencv-python would clash with the headless
    # build, pynput needs a display); its real dependencies are in runtime.txt.
    "$venv/bin/pip" install --no-deps robosuite==1.5.2
    if [ "$want_test" = 1 ]; then
      "$venv/bin/pip" install -r "$root/requirements/test.txt"
    fi
    # compat mode: a plain .pth path entry, robust for console scripts and subprocesses.
    "$venv/bin/pip" install --no-deps --no-build-isolation -e "$root" \
      --config-settings editable_mode=compat
  } >"$log" 2>&1 || { tail -n 40 "$log" >&2; echo '[setup] install failed' >&2; exit 1; }
  touch "$stamp"
fi
