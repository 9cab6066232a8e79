#!/usr/bin/env bash
# Prepare gpu_carry/ for the GPU machine's closed-loop check (issue 24): the GPU machine reaches
# no package registry, and robosuite's wheel (157 MB) does not fit a device run's 64 MiB carry.
# Run on a development machine (PyPI reachable, robosuite installed, see scripts/setup_env.sh):
#
#     PYVER=3.12 bash scripts/gpu_carry.sh      # the GPU machine's Python (gpu_check.log says)
#
# It writes (git ignores gpu_carry/):
#   gpu_carry/wheels/      mujoco 3.3.7 and its dependencies, termcolor, for that Python
#   gpu_carry/robosuite.tgz  the installed robosuite 1.5.2, trimmed to what a Lift episode with
#                          the Panda opens (Python files, XML, the meshes and textures it
#                          loads; measured with strace here), about 11 MB
#   gpu_carry/stub/numba/  a no-op numba (robosuite imports numba only for an optional jit),
#                          put on the path there only when numba is missing
# Then carry gpu_carry in the device run: scripts/gpu_check.sh installs from it.
set -euo pipefail
PYVER="${PYVER:-3.12}"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT=gpu_carry
rm -rf "$OUT"
mkdir -p "$OUT/wheels" "$OUT/stub/numba"
$PY -m pip download -q --only-binary=:all: --python-version "$PYVER" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$OUT/wheels" mujoco==3.3.7 termcolor
# numpy is on the GPU machine already (the earlier GPU runs used it); its wheel would take a
# quarter of the carry
rm -f "$OUT"/wheels/numpy-*.whl
# Which robosuite files a Lift episode opens: run one under strace.
TRACE=$(mktemp)
MUJOCO_GL=egl strace -f -qq -e trace=openat -o "$TRACE" "$PY" -c '
import numpy as np
from sparse_policy_node.core.checkpoint import load_policy
from sparse_policy_node.sim.robosuite_env import make_env
v = load_policy("models/lift").config.obs.vision
env = make_env("lift", v.cameras, v.image_size, include_object=False, max_steps=5)
env.reset(0)
env.step(np.zeros(7))
env.close()'
SITE=$($PY -c 'import os, robosuite; print(os.path.dirname(os.path.dirname(robosuite.__file__)))')
$PY - "$TRACE" "$SITE" "$OUT" <<'PYEOF'
import os
import shutil
import sys
import tarfile

trace, site, out = sys.argv[1:]
opened = set()
for line in open(trace):
    if '"' in line:
        path = line.split('"')[1]
        if path.startswith(site + '/robosuite/'):
            opened.add(os.path.relpath(path, site))
stage = os.path.join(out, 'stage')
for root, _, files in os.walk(os.path.join(site, 'robosuite')):
    for name in files:
        rel = os.path.relpath(os.path.join(root, name), site)
        asset = '/models/assets/' in rel
        small_xml = name.endswith('.xml') and os.path.getsize(os.path.join(site, rel)) < 200000
        if '__pycache__' in rel or rel.startswith(('robosuite/demos', 'robosuite/scripts')):
            continue
        if asset and not small_xml and rel not in opened:
            continue
        os.makedirs(os.path.dirname(os.path.join(stage, rel)), exist_ok=True)
        shutil.copy2(os.path.join(site, rel), os.path.join(stage, rel))
with tarfile.open(os.path.join(out, 'robosuite.tgz'), 'w:gz') as tar:
    tar.add(os.path.join(stage, 'robosuite'), arcname='robosuite')
shutil.rmtree(stage)
PYEOF
rm -f "$TRACE"
cat >"$OUT/stub/numba/__init__.py" <<'PYEOF'
"""No-op numba for robosuite on a machine without it: jit returns the function unchanged."""


def jit(*args, **kwargs):
    """Return the function itself (no compilation)."""
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda func: func
PYEOF
du -sh "$OUT"/*
