"""Install script of the sparse_policy_node ament_python package."""

from glob import glob
import os

from setuptools import find_packages
from setuptools import setup

package_name = 'sparse_policy_node'


def model_files(root='models'):
    """List (install_dir, [files]) pairs for every file under ``models/``, at any depth.

    A model directory holds sub-folders (``pruners/ddim-5/``) that its serving default needs.
    Hidden entries (``.backend_cache/``, exported graphs of a local run) are not installed.
    """
    entries = []
    for directory, subdirs, names in sorted(os.walk(root)):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
        files = sorted(os.path.join(directory, n) for n in names if not n.startswith('.'))
        if files:
            entries.append((os.path.join('share', package_name, directory), files))
    return entries


setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(exclude=['test']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        (os.path.join('share', package_name, 'launch'), glob('launch/*.launch.py')),
        (os.path.join('share', package_name, 'config'), glob('config/*.yaml')),
        (os.path.join('share', package_name, 'config', 'train'), glob('config/train/*.yaml')),
    ] + model_files(),
    install_requires=['setuptools'],
    zip_safe=True,
    maintainer='sparse_policy_node maintainers',
    maintainer_email='maintainers@sparse-policy-node.invalid',
    description='Diffusion policy server with test-time sparsity for ROS 2.',
    license='Apache-2.0',
    tests_require=['pytest'],
    entry_points={
        'console_scripts': [
            'sparse-policy = sparse_policy_node.cli:main',
            'policy_node = sparse_policy_node.ros.policy_node:main',
            'sim_bridge = sparse_policy_node.ros.sim_bridge_node:main',
        ],
    },
)
