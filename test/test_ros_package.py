"""package.xml declares every run dependency of the node, and only those."""

import ast
import glob
import os
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Python modules whose rosdep key differs from the module name.
ROSDEP = {'cv2': 'python3-opencv', 'numpy': 'python3-numpy', 'yaml': 'python3-yaml'}
# From pip into the venv (requirements/distro.txt), never from rosdep: apt's python3-torch is
# older than the torch the model was built for.
PIP_ONLY = {'safetensors', 'torch'}
# Optional inference backends, imported only when selected or available (torch else).
OPTIONAL = {'onnxruntime', 'onnx', 'tensorrt'}
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


def test_torch_comes_from_the_venv_not_from_rosdep():
    tree = ET.parse(os.path.join(ROOT, 'package.xml'))
    depends = {e.text for e in tree.getroot().iter() if e.tag.endswith('depend')}
    assert not {'python3-torch', 'python3-safetensors'} & depends
    with open(os.path.join(ROOT, 'requirements', 'distro.txt')) as f:
        pins = {line.split('==')[0] for line in f if '==' in line}
    assert {'torch', 'safetensors'} <= pins


def test_installed_entry_points_run_the_python_on_path():
    """Colcon (ament_python) takes the script header from build_scripts: the venv's python."""
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, 'setup.cfg'))
    assert cfg.get('build_scripts', 'executable') == '/usr/bin/env python3'
