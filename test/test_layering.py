"""The pure-torch core must never import ROS, message packages or the simulator."""

import ast
import os

CORE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    'sparse_policy_node', 'core')
FORBIDDEN_PREFIXES = ('rclpy', 'robosuite', 'mujoco', 'launch', 'launch_ros', 'cv2',
                      'sparse_policy_node.ros', 'sparse_policy_node.sim',
                      'sparse_policy_node.training', 'sparse_policy_node.tools')


def imported_modules(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_core_imports_no_ros_or_simulator():
    offenders = []
    files = [os.path.join(CORE, f) for f in sorted(os.listdir(CORE)) if f.endswith('.py')]
    assert len(files) >= 8
    for path in files:
        for name in imported_modules(path):
            if name.startswith(FORBIDDEN_PREFIXES) or name.endswith('_msgs') \
                    or '_msgs.' in name or name.endswith('_srvs'):
                offenders.append(f'{os.path.basename(path)} imports {name}')
    assert not offenders, offenders


def test_layering_check_detects_a_forbidden_import(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text('import rclpy\nfrom sensor_msgs.msg import Image\n')
    names = list(imported_modules(str(bad)))
    assert names == ['rclpy', 'sensor_msgs.msg']
