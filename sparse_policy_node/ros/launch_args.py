"""The bring-up's launch arguments and node plan: pure data, no ``launch`` import.

Both ``launch/policy.launch.py`` (``ros2 launch``, for users with a ROS 2 distribution) and
``sparse-policy launch`` (rclpy-only, for pip-installed ROS 2 wheels) call
:func:`plan_nodes` on the same argument values, so they start the same nodes with the same
parameter files and overrides by construction; ``test/test_ros_launch.py`` checks it.
"""

from dataclasses import dataclass
from dataclasses import field
import os
import sys
from typing import Dict
from typing import List
from typing import Optional
from typing import Tuple

PACKAGE = 'sparse_policy_node'


@dataclass(frozen=True)
class LaunchArg:
    """One ``name:=value`` launch argument."""

    name: str
    default: str
    description: str
    choices: Optional[Tuple[str, ...]] = None


LAUNCH_ARGS = (
    LaunchArg('sim', 'robosuite', 'Simulator bridge started next to the policy node; "none" '
              'serves a real robot (inputs from its drivers).', ('robosuite', 'none')),
    LaunchArg('task', 'lift', 'Task: the simulation task the bridge runs and, for lift and '
              'can, the shipped model and parameter overlay served (can: the state-only '
              'models/can with config/policy_can.yaml and config/sim_bridge_can.yaml).'),
    LaunchArg('model', '', 'Model directory (config.json + model.safetensors [+ pruner]); '
              'empty: model_dir of params_file, or of the task overlay (the shipped '
              'model).'),
    LaunchArg('device', '', 'Torch device: cpu, cuda or cuda:N; empty: params_file value.'),
    LaunchArg('sparsity', '', 'Sparsity dial: "off" (dense), "learned" (pruner gates as '
              'trained) or a target share of reused units in [0, 0.99]; empty: params_file.'),
    LaunchArg('steps', '', 'Denoising steps per chunk; empty: params_file value.'),
    LaunchArg('noise_seed', '', 'Seed of the chunk noise (>= 0: reproducible chunks, see '
              'sparse-policy replay-bag; -1: unseeded); empty: params_file value.'),
    LaunchArg('params_file', '', 'Policy node parameter file; empty: config/policy.yaml of '
              'this package.'),
    LaunchArg('bridge_params_file', '', 'Simulator bridge parameter file; empty: '
              'config/sim_bridge.yaml of this package.'),
    LaunchArg('episodes', '', 'Episodes the bridge runs, then the bring-up ends (0: run until '
              'stopped); empty: bridge_params_file value.'),
    LaunchArg('seed', '', 'Seed of the first episode (episode i uses seed + i); empty: '
              'bridge_params_file value.'),
    LaunchArg('lockstep', '', 'Bridge waits for each chunk before stepping (true: sim time '
              'pauses during inference) or steps on the wall clock at its control rate and '
              'holds still when no chunk covers a step (false); empty: bridge_params_file '
              'value.', ('', 'true', 'false')),
    LaunchArg('action_interface', '', 'What the policy node commands (its output.mode): '
              '"chunk" (robosuite deltas), "pose_target" (PoseStamped targets + gripper for a '
              'Cartesian controller; the bridge then tracks them like one) or '
              '"joint_trajectory" (sim:=none only); empty: params files.',
              ('', 'chunk', 'pose_target', 'joint_trajectory')),
    LaunchArg('use_sim_time', '', 'Run on the /clock of the simulator; empty: true with a '
              'simulator, false without.', ('', 'true', 'false')),
    LaunchArg('namespace', '', 'Namespace of the nodes (e.g. robot1: /robot1/policy_node and '
              'inputs such as /robot1/ee_pose); empty: none.'),
    LaunchArg('remap', '', 'Topic remappings of the policy node for sim:=none, '
              'comma-separated from=to pairs, e.g. "ee_pose=/arm/ee_pose,'
              'agentview/image_raw=/camera/color/image_raw"; empty: none.'),
    LaunchArg('summary_dir', '', 'Directory where each node writes <node>.json, a run '
              'summary, at exit; empty: none.'),
    LaunchArg('log_level', 'info', 'Log level of the nodes.',
              ('debug', 'info', 'warn', 'error')),
)
ARG_NAMES = tuple(a.name for a in LAUNCH_ARGS)


@dataclass(frozen=True)
class TaskPreset:
    """What ``task:=<name>`` serves besides the simulation task.

    Args:
        model_dir: the shipped model (the overlay's ``model_dir``), relative to the package
            share directory; ``model:=`` replaces it.
        policy_overlay: parameter file of ``config/`` layered over ``params_file`` (model,
            inputs); empty: none.
        bridge_overlay: parameter file of ``config/`` layered over ``bridge_params_file``
            (cameras, object state); empty: none.
    """

    model_dir: str
    policy_overlay: str = ''
    bridge_overlay: str = ''


TASK_PRESETS = {
    'lift': TaskPreset('models/lift'),
    'can': TaskPreset('models/can', 'policy_can.yaml', 'sim_bridge_can.yaml'),
}


@dataclass
class NodePlan:
    """One node to start: the same for ``ros2 launch`` and the rclpy bring-up."""

    name: str
    executable: str     # console script (setup.py entry point) used by ros2 launch
    module: str         # python -m module used by the rclpy bring-up
    params_files: List[str]
    overrides: Dict[str, object] = field(default_factory=dict)
    log_level: str = 'info'
    namespace: str = ''              # '' or an absolute namespace ('/robot1')
    remappings: List[Tuple[str, str]] = field(default_factory=list)
    lifecycle: bool = False          # a managed node: launch_ros LifecycleNode


def package_share_dir() -> str:
    """Locate the directory holding ``config/`` and ``models/``.

    Order: the ament index (a sourced colcon install), the install prefix this module lives
    in (``<prefix>/lib/pythonX.Y/site-packages/sparse_policy_node/ros`` ->
    ``<prefix>/share/sparse_policy_node``: a colcon install not sourced, ``pip install
    --prefix``), ``<sys.prefix>/share/sparse_policy_node`` (pip install into a venv), then
    the source tree this module lives in.
    """
    try:
        from ament_index_python.packages import get_package_share_directory
        from ament_index_python.packages import PackageNotFoundError
        try:
            return get_package_share_directory(PACKAGE)
        except (PackageNotFoundError, LookupError, ValueError, OSError):
            pass
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    prefix = os.path.abspath(os.path.join(here, *[os.pardir] * 5))
    for installed in (os.path.join(prefix, 'share', PACKAGE),
                      os.path.join(sys.prefix, 'share', PACKAGE)):
        if os.path.isfile(os.path.join(installed, 'config', 'policy.yaml')):
            return installed
    return os.path.dirname(os.path.dirname(here))


def parse_launch_args(tokens: List[str]) -> Dict[str, str]:
    """Parse ``name:=value`` tokens (as ``ros2 launch`` does) into a complete value dict.

    Raises:
        ValueError: unknown name, malformed token or a value outside the choices.
    """
    values = {a.name: a.default for a in LAUNCH_ARGS}
    for token in tokens:
        name, sep, value = token.partition(':=')
        if not sep or not name:
            raise ValueError(f'launch arguments look like name:=value, got {token!r}')
        if name not in values:
            raise ValueError(f'unknown launch argument {name!r}; valid: {", ".join(ARG_NAMES)}')
        values[name] = value
    return check_values(values)


def check_values(values: Dict[str, str]) -> Dict[str, str]:
    """Check every value against its choices; return ``values``."""
    for arg in LAUNCH_ARGS:
        if arg.choices is not None and values[arg.name] not in arg.choices:
            raise ValueError(f'launch argument {arg.name}:={values[arg.name]!r} is not one of '
                             f'{list(arg.choices)}')
    return values


def show_args() -> str:
    """Render the arguments the way ``ros2 launch --show-args`` does."""
    lines = ["Arguments (pass arguments as '<name>:=<value>'):", '']
    for arg in LAUNCH_ARGS:
        lines.append(f"    '{arg.name}':")
        lines.append(f'        {arg.description}')
        if arg.choices is not None:
            lines.append(f'        Valid choices are: {list(arg.choices)}')
        lines.append(f"        (default: '{arg.default}')")
        lines.append('')
    return '\n'.join(lines)


def sparsity_overrides(value: str) -> Dict[str, object]:
    """Map the ``sparsity`` launch argument to ``sparsity.*`` parameters."""
    if value == '':
        return {}
    if value == 'off':
        return {'sparsity.enabled': False}
    if value == 'learned':
        return {'sparsity.enabled': True, 'sparsity.target': -1.0}
    try:
        target = float(value)
    except ValueError:
        raise ValueError(f'sparsity:={value!r} must be off, learned or a number in [0, 0.99]')
    if not 0.0 <= target <= 0.99:
        raise ValueError(f'sparsity:={value!r} must be in [0, 0.99]')
    return {'sparsity.enabled': True, 'sparsity.target': target}


def parse_namespace(value: str) -> str:
    """Return ``''`` or the absolute namespace of the ``namespace`` launch argument."""
    name = value.strip().strip('/')
    if not name:
        return ''
    if not all(part and (part[0].isalpha() or part[0] == '_')
               and part.replace('_', 'a').isalnum() for part in name.split('/')):
        raise ValueError(f'namespace:={value!r} is not a valid ROS namespace')
    return '/' + name


def parse_remappings(value: str) -> List[Tuple[str, str]]:
    """Parse the ``remap`` launch argument: comma-separated ``from=to`` topic pairs."""
    pairs = []
    for item in filter(None, (v.strip() for v in value.split(','))):
        src, sep, dst = item.partition('=')
        if not sep or not src.strip() or not dst.strip() or ' ' in item:
            raise ValueError(f'remap entry {item!r} must look like from=to, e.g. '
                             f'ee_pose=/arm/ee_pose')
        pairs.append((src.strip(), dst.strip()))
    return pairs


def _int(values, name):
    try:
        return int(values[name])
    except ValueError:
        raise ValueError(f'{name}:={values[name]!r} must be an integer')


def check_preset_model(task: str, preset: TaskPreset, share: str) -> None:
    """Raise ValueError when the task's shipped model is in neither the cwd nor ``share``.

    The node resolves a relative model path the same way (working directory, then share).
    """
    if os.path.isdir(preset.model_dir) or os.path.isdir(os.path.join(share, preset.model_dir)):
        return
    raise ValueError(f'task:={task} serves {preset.model_dir}, which is not installed (not in '
                     f'{os.path.join(share, preset.model_dir)} nor the working directory): '
                     f'it is not shipped yet; pass model:=<model directory> (the rest of '
                     f'the {task} parameters still come from config/{preset.policy_overlay})')


def plan_nodes(values: Dict[str, str], share_dir: Optional[str] = None) -> List[NodePlan]:
    """Return the nodes to start for complete, checked launch argument values."""
    share = share_dir or package_share_dir()
    config = os.path.join(share, 'config')
    sim = values['sim'] != 'none'
    use_sim_time = sim if values['use_sim_time'] == '' else values['use_sim_time'] == 'true'
    namespace = parse_namespace(values['namespace'])
    remappings = parse_remappings(values['remap'])
    if remappings and sim:
        raise ValueError('remap:= is for sim:=none (a real robot); the simulator bridge and '
                         'the policy node already agree on their topics')

    policy = {'use_sim_time': use_sim_time}
    if values['model']:
        policy['model_dir'] = os.path.abspath(values['model'])
    if values['device']:
        policy['device'] = values['device']
    if values['steps']:
        policy['sampler.steps'] = _int(values, 'steps')
    if values['noise_seed']:
        policy['noise_seed'] = _int(values, 'noise_seed')
    policy.update(sparsity_overrides(values['sparsity']))
    interface = values['action_interface']
    if interface:
        policy['output.mode'] = interface
    if interface == 'joint_trajectory' and sim:
        raise ValueError('action_interface:=joint_trajectory needs a joint-position model and '
                         'a joint_trajectory_controller (sim:=none); the robosuite bridge '
                         'executes chunk or pose_target commands')
    if values['summary_dir']:
        policy['summary_file'] = os.path.join(values['summary_dir'], 'policy_node.json')
    preset = TASK_PRESETS.get(values['task'])
    policy_files = [values['params_file'] or os.path.join(config, 'policy.yaml')]
    if preset is not None and preset.policy_overlay:
        policy_files.append(os.path.join(config, preset.policy_overlay))
        if not values['model']:
            check_preset_model(values['task'], preset, share)
    nodes = [NodePlan('policy_node', 'policy_node', f'{PACKAGE}.ros.policy_node',
                      policy_files, policy, values['log_level'], namespace, remappings,
                      lifecycle=True)]
    if sim:
        # The bridge is the clock source: it publishes /clock instead of listening to it.
        bridge = {'task': values['task'], 'publish_clock': use_sim_time}
        for name in ('episodes', 'seed'):
            if values[name]:
                bridge[name] = _int(values, name)
        if values['lockstep']:
            bridge['lockstep'] = values['lockstep'] == 'true'
        if interface:
            bridge['action_mode'] = interface
        if values['summary_dir']:
            bridge['summary_file'] = os.path.join(values['summary_dir'], 'sim_bridge.json')
        bridge_files = [values['bridge_params_file'] or os.path.join(config, 'sim_bridge.yaml')]
        if preset is not None and preset.bridge_overlay:
            bridge_files.append(os.path.join(config, preset.bridge_overlay))
        nodes.append(NodePlan('sim_bridge', 'sim_bridge', f'{PACKAGE}.ros.sim_bridge_node',
                              bridge_files, bridge, values['log_level'], namespace))
    return nodes
