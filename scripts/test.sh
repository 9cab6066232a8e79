#!/usr/bin/env bash
# Set up the environment (first run) and run the whole test suite, linters included.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup_env.sh" --test
cd "$root"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_LOG_DIR="${ROS_LOG_DIR:-$root/.venv/ros_log}"
exec "$root/.venv/bin/python" -m pytest -q "$@"
