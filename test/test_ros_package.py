"""package.xml declares every run dependency of the node, and only those."""

import ast
import glob
import os
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Python modules whose rosdep key differs from the module name.
ROSDEP = {'cv2': 'python3-opencv', 'numpy': 'python3-numpy', 'yaml': 'python3-yaml',
          'torch': 'python3-torch'}
PIP_ONLY = {'safetensors'}      # no rosdep key on every distro: pip (README)
# Optional inference backends, imported only when selected (a ConfigError names them else).
OPTIONAL = {'onnxruntime', 'tensorrt'}
EXTRAS = {'python3-h5py', 'python3-matplotlib', 'python3-tqdm'}  # training and plotting


def runtime_imports():
    """Top-level third-party modules imported by the nodes, the engine and the launch file."""
    files = [f for pattern in ('sparse_policy_node/ros/*.py', 'sparse_policy_node/core/*.py',
                               'launch/*.py') for f in glob.glob(os.path.join(ROOT, pattern))]
    modules = set()
    for path in files:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split('.')[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split('.')[0])
    return {m for m in modules if m not in sys.stdlib_module_names} - {'sparse_policy_node'}


def test_package_xml_lists_every_runtime_import_and_no_training_extras():
    tree = ET.parse(os.path.join(ROOT, 'package.xml'))
    exec_depends = {e.text for e in tree.getroot().iter('exec_depend')}
    needed = {ROSDEP.get(m, m) for m in runtime_imports() - PIP_ONLY - OPTIONAL}
    assert {'rclpy', 'cv2', 'rcl_interfaces', 'ament_index_python'} <= runtime_imports()
    assert needed <= exec_depends, sorted(needed - exec_depends)
    assert 'lifecycle_msgs' in exec_depends                    # rclpy.lifecycle needs it
    assert not exec_depends & EXTRAS, sorted(exec_depends & EXTRAS)
