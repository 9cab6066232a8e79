#!/usr/bin/env bash
# The main job: set up the environment (first run) and run the simulation demo end to end on
# the shipped model: a robosuite bridge node executes the policy node's action chunks for a few
# Lift episodes, then the bring-up stops by itself and prints a summary.
#
# Extra arguments are launch arguments, e.g.:  scripts/demo.sh episodes:=10 sparsity:=0.9
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup_env.sh"
cd "$root"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
export ROS_LOG_DIR="${ROS_LOG_DIR:-$root/.venv/ros_log}"
exec "$root/.venv/bin/sparse-policy" launch sim:=robosuite task:=lift episodes:=3 "$@"
