"""Bring up the policy node (and the robosuite bridge with sim:=robosuite).

    ros2 launch sparse_policy_node policy.launch.py --show-args
    ros2 launch sparse_policy_node policy.launch.py sim:=robosuite episodes:=10 sparsity:=0.93

The argument table and the node plan live in ``sparse_policy_node.ros.launch_args``, shared
with the rclpy-only bring-up (``sparse-policy launch``), so both start the same nodes with the
same parameter files and overrides.
"""

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.actions import OpaqueFunction
from launch.actions import Shutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.actions import Node
from sparse_policy_node.ros.launch_args import check_values
from sparse_policy_node.ros.launch_args import LAUNCH_ARGS
from sparse_policy_node.ros.launch_args import PACKAGE
from sparse_policy_node.ros.launch_args import plan_nodes


def launch_setup(context):
    """Resolve the arguments and return one Node action per planned node."""
    values = check_values({a.name: LaunchConfiguration(a.name).perform(context)
                           for a in LAUNCH_ARGS})
    plan = plan_nodes(values, get_package_share_directory(PACKAGE))
    # The policy node is a managed node (it configures and activates itself unless
    # autostart is false); when one node ends (episodes done, model missing), the whole
    # bring-up ends with it.
    return [(LifecycleNode if n.lifecycle else Node)(
        package=PACKAGE, executable=n.executable, name=n.name, namespace=n.namespace,
        remappings=n.remappings, output='screen', parameters=n.params_files + [n.overrides],
        ros_arguments=['--log-level', n.log_level], on_exit=Shutdown(reason=f'{n.name} exited'))
        for n in plan]


def generate_launch_description():
    """Declare every launch argument of the shared table, then plan the nodes."""
    args = [DeclareLaunchArgument(a.name, default_value=a.default, description=a.description,
                                  **({'choices': list(a.choices)} if a.choices else {}))
            for a in LAUNCH_ARGS]
    return LaunchDescription(args + [OpaqueFunction(function=launch_setup)])
