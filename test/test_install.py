"""An install as colcon's ament_python build makes it serves the shipped model.

The package is built and installed from a copy of the source tree with the setup.py
commands colcon runs (``egg_info``, ``build``, ``install --prefix ...
--single-version-externally-managed``). From a directory outside both trees, with
``AMENT_PREFIX_PATH`` set as a sourced workspace sets it, the installed policy node is
configured on ``share/sparse_policy_node/models/lift`` at its serving default (learned gates
on DDIM-5, which needs ``models/lift/pruners/ddim-5``) and publishes a chunk.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'sparse_policy_node'
NOT_SOURCES = shutil.ignore_patterns('.venv', '.git', '__pycache__', '*.egg-info', 'build',
                                     'install', 'log', '.pytest_cache', '.backend_cache',
                                     'runs', 'data', 'out')

# Runs in the child process: the installed node and fake robot, nothing from the source tree.
SERVE_ONE_CHUNK = """
import sys
import time
import rclpy
from rclpy.parameter import Parameter
import sparse_policy_node
from sparse_policy_node.ros.policy_node import PolicyNode
from sparse_policy_node.ros.testing import FakeRobot
from sparse_policy_node.ros.testing import Spinner
import yaml

prefix = sys.argv[1]
assert sparse_policy_node.__file__.startswith(prefix), sparse_policy_node.__file__
with open(f'{prefix}/share/sparse_policy_node/config/policy.yaml') as f:
    values = yaml.safe_load(f)['/**']['ros__parameters']
values['max_future_stamp_s'] = 2.0
context = rclpy.Context()
rclpy.init(context=context)
node = PolicyNode(context=context, parameter_overrides=[
    Parameter(k, value=v) for k, v in values.items()])
robot = FakeRobot(context=context, image_size=(84, 84))
with Spinner(context, node, robot):
    deadline = time.monotonic() + 120.0
    chunk = None
    while chunk is None and time.monotonic() < deadline:
        chunk = robot.drive(time.time_ns() // 50_000_000 * 50_000_000, timeout=2.0)
    assert chunk is not None, 'no chunk within 120 s'
    print('CHUNK', len(chunk.points), list(chunk.joint_names), flush=True)
node.close()
node.destroy_node()
robot.destroy_node()
context.try_shutdown()
"""


def colcon_like_install(source: str, build: str, prefix: str) -> None:
    """Build and install ``source`` into ``prefix`` the way colcon's ament_python task does."""
    os.makedirs(build)
    subprocess.run([sys.executable, 'setup.py', 'egg_info', '--egg-base', build,
                    'build', '--build-base', os.path.join(build, 'build'),
                    'install', '--prefix', prefix, '--record', os.path.join(build, 'log'),
                    '--single-version-externally-managed'],
                   cwd=source, check=True, capture_output=True, text=True)


def installed_site_packages(prefix: str) -> str:
    return sysconfig.get_path('purelib', vars={'base': prefix, 'platbase': prefix})


@pytest.fixture(scope='module')
def install(tmp_path_factory):
    """Install a copy of this source tree into a fresh prefix; return the prefix."""
    work = tmp_path_factory.mktemp('install')
    source, prefix = str(work / 'src'), str(work / 'install')
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    colcon_like_install(source, str(work / 'build'), prefix)
    return prefix


def test_every_file_under_models_is_installed(install):
    share = os.path.join(install, 'share', PACKAGE)
    shipped = set()
    for directory, subdirs, names in os.walk(os.path.join(ROOT, 'models')):
        subdirs[:] = [d for d in subdirs if not d.startswith('.')]
        shipped |= {os.path.relpath(os.path.join(directory, n), ROOT)
                    for n in names if not n.startswith('.')}
    assert 'models/lift/pruners/ddim-5/pruner.safetensors' in shipped
    missing = sorted(f for f in shipped if not os.path.isfile(os.path.join(share, f)))
    assert not missing, missing


def test_entry_points_run_the_python_on_path(install):
    for name in ('policy_node', 'sim_bridge', 'sparse-policy'):
        with open(os.path.join(install, 'lib', PACKAGE, name)) as f:
            assert f.readline().strip() == '#!/usr/bin/env python3', name


def test_share_dir_found_without_a_sourced_workspace(install, tmp_path):
    env = dict(os.environ, PYTHONPATH=installed_site_packages(install))
    env.pop('AMENT_PREFIX_PATH', None)
    done = subprocess.run(
        [sys.executable, '-c', 'from sparse_policy_node.ros.launch_args import '
         'package_share_dir; print(package_share_dir())'],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == os.path.join(install, 'share', PACKAGE)


@pytest.mark.ros
def test_installed_node_serves_the_shipped_model_from_share(install, tmp_path):
    """Configure on share/.../models/lift (serving default) from outside the source tree."""
    outside = tmp_path / 'elsewhere'
    outside.mkdir()
    env = dict(os.environ, PYTHONPATH=installed_site_packages(install),
               AMENT_PREFIX_PATH=install, ROS_LOG_DIR=str(tmp_path / 'log'),
               ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST',
               ROS_DOMAIN_ID=str(1 + os.getpid() % 200))
    done = subprocess.run([sys.executable, '-c', SERVE_ONE_CHUNK, install], cwd=str(outside),
                          env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    names = ['dx', 'dy', 'dz', 'dax', 'day', 'daz', 'gripper']
    assert f'CHUNK 8 {names}' in out, out[-3000:]   # 8 steps of the Lift model's chunk
    import torch
    share_lift = os.path.join(install, 'share', PACKAGE, 'models', 'lift')
    assert f'serving {share_lift} on cpu' in out, out[-3000:]
    assert f'torch {torch.__version__} from {os.path.dirname(torch.__file__)}' in out
    assert '(backend onnxruntime)' in out, out[-3000:]     # runtime deps: onnx + onnxruntime
    assert 'sparsity.gate_source=pruner' in out and 'sampler.steps=5' in out, out[-3000:]
