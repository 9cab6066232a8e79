"""Every ROS parameter of the package: declared here and nowhere else.

The policy node's parameters are the :class:`RuntimeConfig` fields under dotted names
(``sparsity.target``, ``sampler.steps``, ...) plus node settings (:class:`NodeSettings`). The
bridge's parameters are :class:`BridgeSettings`. Each table row carries the description and
range that ``ros2 param describe`` shows. Validation reuses the dataclasses' own checks, so a
rejected ``ros2 param set`` returns the same message a bad YAML file produces.
"""

from dataclasses import dataclass
from dataclasses import fields
import re
from typing import Callable
from typing import Dict
from typing import List
from typing import Optional
from typing import Tuple

from rcl_interfaces.msg import FloatingPointRange
from rcl_interfaces.msg import IntegerRange
from rcl_interfaces.msg import ParameterDescriptor
from rcl_interfaces.msg import SetParametersResult
from sparse_policy_node.core.config import BACKENDS
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.config import GATE_SOURCES
from sparse_policy_node.core.config import PRECISIONS
from sparse_policy_node.core.config import REUSE_DIRECTIONS
from sparse_policy_node.core.config import RuntimeConfig
from sparse_policy_node.core.config import SAMPLERS
from sparse_policy_node.ros.conversions import action_limits
from sparse_policy_node.ros.conversions import ConversionError
from sparse_policy_node.ros.conversions import parse_lowdim_map
from sparse_policy_node.ros.execution import check_mode as check_execution_mode
from sparse_policy_node.ros.execution import MODES as EXECUTION_MODES
from sparse_policy_node.ros.gripper import check as check_gripper
from sparse_policy_node.ros.gripper import MAPPINGS as GRIPPER_MAPPINGS
from sparse_policy_node.ros.gripper import MESSAGES as GRIPPER_MESSAGES


OUTPUT_MODES = ('chunk', 'pose_target', 'joint_trajectory')
HOLD_OUTPUTS = ('hold', 'silent')
BRIDGE_ACTION_MODES = ('chunk', 'pose_target')
_DEVICE = re.compile(r'^(cpu|cuda(:\d+)?|mps)$')


def check_device(device: str) -> None:
    """Reject malformed or unavailable torch devices with a reason."""
    if not _DEVICE.match(device):
        raise ConfigError(f'device must be cpu, cuda, cuda:N or mps, got {device!r}')
    import torch
    if device.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ConfigError(f'device {device!r}: CUDA is not available on this machine')
        index = int(device.partition(':')[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f'device {device!r}: only {torch.cuda.device_count()} CUDA '
                              f'device(s)')
    if device == 'mps' and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' is not available on this machine")


@dataclass(frozen=True)
class Param:
    """One parameter: ROS name, the dataclass field it fills, and how it is described."""

    name: str
    attr: str
    default: object
    description: str
    read_only: bool = False
    min_value: Optional[float] = None
    max_value: Optional[float] = None
    constraints: str = ''

    @property
    def applies(self) -> str:
        """When a change applies: at configure (read-only), live or between chunks."""
        if self.read_only:
            return 'at configure (read-only)'
        if self.name in LIVE_PARAMS:
            return 'live, from the next control tick'
        return 'between chunks'

    def descriptor(self) -> ParameterDescriptor:
        """Return the ROS descriptor: description (with when it applies), range, read-only."""
        d = ParameterDescriptor(description=f'{self.description} Applies {self.applies}.',
                                read_only=self.read_only,
                                additional_constraints=self.constraints)
        if self.min_value is not None and isinstance(self.default, int):
            d.integer_range = [IntegerRange(from_value=int(self.min_value),
                                            to_value=int(self.max_value), step=1)]
        elif self.min_value is not None:
            d.floating_point_range = [FloatingPointRange(from_value=float(self.min_value),
                                                         to_value=float(self.max_value))]
        return d


# Applied by the node's post-set callback, so from the next control tick (ros/intake.py).
LIVE_PARAMS = frozenset((
    'action.lower', 'action.upper', 'safety.max_step_change', 'safety.max_linear_speed',
    'safety.max_angular_speed', 'safety.max_joint_speed', 'safety.workspace_min',
    'safety.workspace_max', 'safety.enable_timeout_s', 'safety.hold_output',
    'safety.watchdog_s', 'safety.resume_dense_after_s'))
REBUILDS = ('engine', 'threads', 'timing', 'safety')


def what_to_rebuild(old: 'NodeSettings', new: 'NodeSettings') -> set:
    """Return what a settings change requires the policy node to rebuild (of REBUILDS).

    ``engine``: load the model (model_dir, device); ``threads``: torch's thread count;
    ``timing``: the observation history's tolerances; ``safety``: the safety layer's limits
    (live parameters). The runtime knobs are set on the engine at every change.
    """
    out = set()
    if (new.model_dir, new.device) != (old.model_dir, old.device):
        out.add('engine')
    if new.num_threads and new.num_threads != old.num_threads:
        out.add('threads')
    timing = ('sync_tolerance_s', 'time_jump_reset_s')
    if any(getattr(new, a) != getattr(old, a) for a in timing):
        out.add('timing')
    attrs = [p.attr for p in NODE_PARAMS if p.name in LIVE_PARAMS]
    if any(getattr(new, a) != getattr(old, a) for a in attrs):
        out.add('safety')
    return out


_RT = RuntimeConfig()
RUNTIME_PARAMS = (
    Param('sparsity.enabled', 'sparsity_enabled', _RT.sparsity_enabled,
          'Sparse inference on/off; false runs every unit at every step (dense).'),
    Param('sparsity.gate_source', 'gate_source', _RT.gate_source,
          'Where the compute/reuse gates come from.', constraints=f'one of {GATE_SOURCES}'),
    Param('sparsity.target', 'target_sparsity', float(_RT.target_sparsity),
          "The sparsity dial: negative uses the pruner's gates as trained; a value in "
          '[0, 0.99] reuses exactly that share of (step, unit) entries.', min_value=-1.0,
          max_value=0.99),
    Param('sparsity.directions', 'directions', list(_RT.directions),
          'Allowed reuse directions.', constraints=f'non-empty subset of {REUSE_DIRECTIONS}'),
    Param('sampler.name', 'sampler', _RT.sampler, 'Denoising sampler.',
          constraints=f'one of {SAMPLERS}'),
    Param('sampler.steps', 'num_inference_steps', _RT.num_inference_steps,
          'Denoising steps per chunk (K).', min_value=1, max_value=1000),
    Param('sparsity.rollout_max_age', 'rollout_max_age', _RT.rollout_max_age,
          'Cache aging: a rollout-cache slot written more than this many chunks ago is '
          'recomputed instead of reused; 0 never expires slots (the paper).',
          min_value=0, max_value=100000),
    Param('inference.precision', 'precision', _RT.precision,
          "dtype of the denoiser's weights and activations (the vision encoder, pruner and "
          'scheduler stay float32); reduced precision was checked offline only, see README.',
          constraints=f'one of {PRECISIONS}'),
    Param('inference.cuda_graphs', 'cuda_graphs', _RT.cuda_graphs,
          'On CUDA: run chunks from captured CUDA graphs (whole dense chunks; sparse steps '
          'per pattern); same values as eager, several times faster; ignored on CPU.'),
    # The node's default is auto, not the library's torch: onnxruntime on the CPU (faster).
    Param('inference.backend', 'backend', 'auto',
          'Who runs the model pieces: torch (eager), onnxruntime (exported graphs, CPU), '
          'tensorrt (engines from the same graphs, CUDA) or auto (onnxruntime on the CPU when '
          'installed, else torch). Graphs are exported into <model_dir>/.backend_cache (or a '
          'temp folder) when the backend is set, beside the running engine (which serves '
          'meanwhile), then swapped in between chunks; a backend that is not '
          'installed is rejected with the reason. Not part of the serving default.',
          constraints=f'one of {BACKENDS}'),
)


@dataclass
class NodeSettings:
    """Policy node settings that are not part of the engine's :class:`RuntimeConfig`."""

    model_dir: str = 'models/lift'
    device: str = 'cpu'
    num_threads: int = 1
    encode_on_arrival: bool = True
    autostart: bool = True
    serving_default: bool = True
    control_rate_hz: float = 20.0
    execution_horizon: int = 0
    replan_lead_steps: int = 0
    sync_tolerance_s: float = 0.025
    max_obs_age_s: float = 1.0
    max_future_stamp_s: float = 0.5
    time_jump_reset_s: float = 0.5
    image_topic_format: str = '{camera}/image_raw'
    lowdim_map: Tuple[str, ...] = (
        'robot0_eef_pos=pose:ee_pose:position',
        'robot0_eef_quat=pose:ee_pose:orientation',
        'robot0_gripper_qpos=joint_state:joint_states:position:'
        'panda_finger_joint1,panda_finger_joint2')
    action_names: Tuple[str, ...] = ('dx', 'dy', 'dz', 'dax', 'day', 'daz', 'gripper')
    action_lower: Tuple[float, ...] = (-1.0,)
    action_upper: Tuple[float, ...] = (1.0,)
    summary_file: str = ''
    diagnostics_period_s: float = 1.0
    pose_frame: str = 'world'
    output_mode: str = 'chunk'
    output_joint_names: Tuple[str, ...] = ('',)
    output_pose_topic: str = 'ee_pose'
    output_joint_state_topic: str = 'joint_states'
    output_gripper_msg: str = 'float64'
    output_gripper_mapping: str = 'none'
    output_gripper_open: float = 0.08
    output_gripper_closed: float = 0.0
    output_gripper_threshold: float = 0.0
    safety_max_step_change: Tuple[float, ...] = (0.0,)
    safety_max_linear_speed: float = 0.0
    safety_max_angular_speed: float = 0.0
    safety_max_joint_speed: float = 0.0
    safety_workspace_min: Tuple[float, ...] = (-1000.0, -1000.0, -1000.0)
    safety_workspace_max: Tuple[float, ...] = (1000.0, 1000.0, 1000.0)
    safety_require_enable: bool = False
    safety_watchdog_s: float = 0.0
    safety_enable_timeout_s: float = 0.0
    safety_hold_output: str = 'hold'
    safety_resume_dense_after_s: float = 0.0
    execution_blend_steps: int = 0
    execution_mode: str = 'replace'
    execution_ensemble_decay: float = 0.01
    execution_delay_percentile: float = 90.0
    execution_delay_floor_steps: int = 1
    execution_delay_cap_steps: int = 0
    execution_exec_latency_s: float = 0.0
    execution_emulated_latency_s: float = 0.0
    noise_seed: int = -1

    def __post_init__(self):
        if isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int) \
                or self.noise_seed < -1:
            raise ConfigError(f'noise_seed must be an int >= 0, or -1 (unseeded), got '
                              f'{self.noise_seed!r}')
        self.output_joint_names = tuple(n for n in self.output_joint_names if n)
        self.safety_max_step_change = tuple(float(v) for v in self.safety_max_step_change)
        self.safety_workspace_min = tuple(float(v) for v in self.safety_workspace_min)
        self.safety_workspace_max = tuple(float(v) for v in self.safety_workspace_max)
        if self.output_mode not in OUTPUT_MODES:
            raise ConfigError(f'output.mode must be one of {OUTPUT_MODES}, '
                              f'got {self.output_mode!r}')
        if len(set(self.output_joint_names)) != len(self.output_joint_names):
            raise ConfigError(f'output.joint_names must be unique, got '
                              f'{list(self.output_joint_names)}')
        if self.output_mode == 'joint_trajectory' and not self.output_joint_names:
            raise ConfigError('output.mode joint_trajectory needs output.joint_names (the '
                              "joint_trajectory_controller's joints)")
        lo, hi = self.safety_workspace_min, self.safety_workspace_max
        if len(lo) != 3 or len(hi) != 3 or not all(a < b for a, b in zip(lo, hi)):
            raise ConfigError(f'safety.workspace_min/max must be [x, y, z] with min < max, '
                              f'got {list(lo)} / {list(hi)}')
        try:
            check_gripper(self.output_gripper_mapping, self.output_gripper_msg,
                          float(self.output_gripper_open), float(self.output_gripper_closed),
                          float(self.output_gripper_threshold))
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if self.safety_hold_output not in HOLD_OUTPUTS:
            raise ConfigError(f'safety.hold_output must be one of {HOLD_OUTPUTS}, got '
                              f'{self.safety_hold_output!r}')
        if any(v < 0 or v != v for v in self.safety_max_step_change) or \
                not self.safety_max_step_change:
            raise ConfigError(f'safety.max_step_change must be >= 0 (0: off), got '
                              f'{list(self.safety_max_step_change)}')
        try:  # the model-dependent part (ensemble needs absolute actions) is the node's
            check_execution_mode(self.execution_mode, None, self.execution_blend_steps,
                                 float(self.execution_ensemble_decay))
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.lowdim_map = tuple(self.lowdim_map)
        self.action_names = tuple(self.action_names)
        self.action_lower = tuple(float(v) for v in self.action_lower)
        self.action_upper = tuple(float(v) for v in self.action_upper)
        check_device(self.device)
        if '{camera}' not in self.image_topic_format:
            raise ConfigError(f'image_topic_format must contain {{camera}}, '
                              f'got {self.image_topic_format!r}')
        try:
            parse_lowdim_map(self.lowdim_map)
        except ConversionError as exc:
            raise ConfigError(str(exc)) from exc
        if not self.action_lower or not self.action_upper:
            raise ConfigError('action.lower and action.upper need at least one value')
        # Checked as a pair after broadcasting a single value, so that lower=[-1] with
        # upper=[1, ..., -2] is caught here; the node repeats the check with the model's A.
        n = max(len(self.action_lower), len(self.action_upper))
        if len(self.action_lower) in (1, n) and len(self.action_upper) in (1, n):
            try:
                action_limits(self.action_lower, self.action_upper, n)
            except ConversionError as exc:
                raise ConfigError(str(exc)) from exc
        if len(set(self.action_names)) != len(self.action_names):
            raise ConfigError(f'action.names must be unique, got {list(self.action_names)}')


_NS = NodeSettings()
NODE_PARAMS = (
    Param('model_dir', 'model_dir', _NS.model_dir,
          'Model directory (config.json + model.safetensors [+ pruner.json]); relative paths '
          'resolve against the working directory, then the package share directory. A change '
          'loads the new model beside the running one (which serves meanwhile) and swaps it in '
          'between chunks; its card must keep the action space, range and cameras.'),
    Param('device', 'device', _NS.device, 'Torch device; a change loads the model there '
          'beside the running one and swaps it in between chunks.',
          constraints='cpu, cuda, cuda:N or mps (must be available)'),
    Param('num_threads', 'num_threads', _NS.num_threads,
          'Torch intra-op threads for inference (0: torch default).', min_value=0,
          max_value=256),
    Param('encode_on_arrival', 'encode_on_arrival', _NS.encode_on_arrival,
          'Encode camera frames in a separate thread as they arrive, newest first and only '
          'those a future observation window can pick, so that a chunk starts from cached '
          'image features (off: a chunk encodes the frames it does not have yet).'),
    Param('serving_default', 'serving_default', _NS.serving_default,
          'At configure, runtime parameters not given explicitly (parameter file or command '
          "line) take the model's serving default (serving.json, written by sparse-policy "
          "frontier --install), else the model's own schedule (learned gates when a pruner "
          'was trained for it, dense otherwise).', read_only=True),
    Param('autostart', 'autostart', _NS.autostart,
          'Configure and activate at start-up; false: wait for lifecycle transitions '
          '(ros2 lifecycle set /policy_node configure, then activate).', read_only=True),
    Param('control_rate_hz', 'control_rate_hz', _NS.control_rate_hz,
          'Rate of the observation steps and of the actions in a chunk (the training '
          "data's control rate).", read_only=True, min_value=0.1, max_value=1000.0),
    Param('execution_horizon', 'execution_horizon', _NS.execution_horizon,
          'Actions published per chunk, executed before the next chunk is computed '
          "(0: the model's n_action_steps).", min_value=0, max_value=1000),
    Param('replan_lead_steps', 'replan_lead_steps', _NS.replan_lead_steps,
          'Compute the next chunk this many steps before the current one runs out, to hide '
          'inference latency on a robot that does not wait (the new chunk replaces the last '
          'actions of the old one). 0: replan when the chunk has been executed.',
          min_value=0, max_value=1000),
    Param('sync_tolerance_s', 'sync_tolerance_s', _NS.sync_tolerance_s,
          'Largest stamp difference between an input and an observation step.',
          min_value=0.0, max_value=1.0),
    Param('max_obs_age_s', 'max_obs_age_s', _NS.max_obs_age_s,
          'Inputs older than this (stamp, or arrival on the wall clock) are stale: no chunks.',
          min_value=0.01, max_value=60.0),
    Param('max_future_stamp_s', 'max_future_stamp_s', _NS.max_future_stamp_s,
          'Inputs stamped more than this ahead of the node clock (clock skew, wrong time '
          'source) are rejected, logged and counted.', min_value=0.0, max_value=60.0),
    Param('time_jump_reset_s', 'time_jump_reset_s', _NS.time_jump_reset_s,
          "A stamp this far behind its stream's newest is a time jump (sim reset, bag "
          'loop) and starts a new episode; smaller steps back are dropped as out of order.',
          min_value=0.0, max_value=3600.0),
    Param('image_topic_format', 'image_topic_format', _NS.image_topic_format,
          'Image topic of each camera the model needs.', read_only=True,
          constraints='contains {camera}'),
    Param('lowdim_map', 'lowdim_map', list(_NS.lowdim_map),
          'Where each low-dim observation key comes from.', read_only=True,
          constraints='key=pose:<topic>:<position|orientation|pose> or '
                      'key=joint_state:<topic>:<position|velocity|effort>:<joint>[,<joint>]'),
    Param('action.names', 'action_names', list(_NS.action_names),
          'Names of the action dimensions in the published trajectory (a0.. if the count '
          'does not match the model).', read_only=True),
    Param('action.lower', 'action_lower', list(_NS.action_lower),
          'Lower action limits (one value for all dimensions, or one per dimension).'),
    Param('action.upper', 'action_upper', list(_NS.action_upper),
          'Upper action limits (one value for all dimensions, or one per dimension).'),
    Param('summary_file', 'summary_file', _NS.summary_file,
          'Write a JSON run summary here at exit (empty: none).', read_only=True),
    Param('diagnostics_period_s', 'diagnostics_period_s', _NS.diagnostics_period_s,
          'Period of /diagnostics (wall clock).', read_only=True, min_value=0.05,
          max_value=60.0),
    Param('pose_frame', 'pose_frame', _NS.pose_frame,
          'Frame of the pose inputs (their header.frame_id must match, else they are '
          'rejected) and of the pose targets; empty: not checked.', read_only=True),
    Param('output.mode', 'output_mode', _NS.output_mode,
          "What the node commands: 'chunk' (the model's actions as ~/action_chunk and "
          "~/next_action, today's robosuite delta interface), 'pose_target' (geometry_msgs/"
          'PoseStamped ~/target_pose + std_msgs/Float64 ~/gripper_command at the control '
          "rate, deltas integrated from the measured pose) or 'joint_trajectory' "
          '(~/joint_trajectory for a joint_trajectory_controller).', read_only=True,
          constraints=f'one of {OUTPUT_MODES}'),
    Param('output.joint_names', 'output_joint_names', [''],
          "joint_trajectory mode: the controller's joints, in the model's joint order.",
          read_only=True),
    Param('output.pose_topic', 'output_pose_topic', _NS.output_pose_topic,
          'Measured end-effector pose (geometry_msgs/PoseStamped) that deltas are integrated '
          'from and that workspace limits and holds use.', read_only=True),
    Param('output.joint_state_topic', 'output_joint_state_topic',
          _NS.output_joint_state_topic,
          'Measured joint states (joint_trajectory mode: the hold position and the start of '
          'the joint speed cap).', read_only=True),
    Param('output.gripper_msg', 'output_gripper_msg', _NS.output_gripper_msg,
          "~/gripper_command type: 'float64' (std_msgs/Float64) or 'multi_array' "
          "(std_msgs/Float64MultiArray, one value: ros2_control's forward command and "
          'position controllers).', read_only=True, constraints=f'one of {GRIPPER_MESSAGES}'),
    Param('output.gripper_mapping', 'output_gripper_mapping', _NS.output_gripper_mapping,
          "From the model's gripper value (-1 open, +1 closed) to the command: 'none' (as "
          "is), 'threshold' (output.gripper_closed above output.gripper_threshold, else "
          "output.gripper_open) or 'linear' (-1 -> open, +1 -> closed).", read_only=True,
          constraints=f'one of {GRIPPER_MAPPINGS}'),
    Param('output.gripper_open', 'output_gripper_open', _NS.output_gripper_open,
          'Gripper command for open (e.g. a finger width in m).', read_only=True),
    Param('output.gripper_closed', 'output_gripper_closed', _NS.output_gripper_closed,
          'Gripper command for closed.', read_only=True),
    Param('output.gripper_threshold', 'output_gripper_threshold',
          _NS.output_gripper_threshold,
          'threshold mapping: model values above this close the gripper.', read_only=True,
          min_value=-1.0, max_value=1.0),
    Param('safety.max_step_change', 'safety_max_step_change',
          list(_NS.safety_max_step_change),
          'Largest change between consecutive actions, per action dimension (one value for '
          'all, 0: off).'),
    Param('safety.max_linear_speed', 'safety_max_linear_speed', _NS.safety_max_linear_speed,
          'End-effector target speed cap in m/s (delta and pose_target output; 0: off).',
          min_value=0.0, max_value=100.0),
    Param('safety.max_angular_speed', 'safety_max_angular_speed',
          _NS.safety_max_angular_speed,
          'End-effector target rotation speed cap in rad/s (0: off).', min_value=0.0,
          max_value=100.0),
    Param('safety.max_joint_speed', 'safety_max_joint_speed', _NS.safety_max_joint_speed,
          'Joint target speed cap in rad/s (joint_trajectory output; 0: off).',
          min_value=0.0, max_value=100.0),
    Param('safety.workspace_min', 'safety_workspace_min', list(_NS.safety_workspace_min),
          'Lower corner [x, y, z] (m, pose_frame) of the box end-effector targets stay in.'),
    Param('safety.workspace_max', 'safety_workspace_max', list(_NS.safety_workspace_max),
          'Upper corner [x, y, z] (m, pose_frame) of the box end-effector targets stay in.'),
    Param('safety.require_enable', 'safety_require_enable', _NS.safety_require_enable,
          'Command the robot only while the last std_msgs/Bool on ~/enable was true (and, '
          'with safety.enable_timeout_s, recent); otherwise hold (docs/safety.md). Cleared '
          'on deactivate and reset: a new true is needed.', read_only=True),
    Param('safety.enable_timeout_s', 'safety_enable_timeout_s', _NS.safety_enable_timeout_s,
          'Deadman: with safety.require_enable, an enabling true expires after this long '
          'unless refreshed (0: the last Bool is latched).', min_value=0.0, max_value=60.0),
    Param('safety.hold_output', 'safety_hold_output', _NS.safety_hold_output,
          "What a hold sends: 'hold' (repeat the last commanded target, zero motion for "
          "deltas, a stop point for joints) or 'silent' (nothing, so that another command "
          'source can drive).', constraints=f'one of {HOLD_OUTPUTS}'),
    Param('safety.resume_dense_after_s', 'safety_resume_dense_after_s',
          _NS.safety_resume_dense_after_s,
          'After a hold, or an input gap longer than this, the rollout cache and the pending '
          'chunk are dropped: the first chunk after the pause is dense (0: two chunk '
          'periods).', min_value=0.0, max_value=3600.0),
    Param('execution.mode', 'execution_mode', _NS.execution_mode,
          "How a new chunk combines with the ones still executing: 'replace' (the new "
          "chunk replaces the old tail), 'blend' (real-time-chunking style: steps that ran "
          'or elapsed keep the old values, the next execution.blend_steps pending steps go '
          "linearly from old to new), 'ensemble' (ACT temporal ensembling of every chunk "
          'predicting a step, weights exp(-execution.ensemble_decay * age in steps); '
          'absolute actions only: refused for deltas that are not integrated into pose '
          "targets) or 'rtc' (real-time chunking: the new chunk is sampled with the "
          "executing chunk's overlap inpainted, its first d steps pinned, d from the "
          'measured latency, execution.delay_*). Applied at configure.', read_only=True,
          constraints=f'one of {EXECUTION_MODES}'),
    Param('execution.blend_steps', 'execution_blend_steps', _NS.execution_blend_steps,
          'execution.mode blend: pending steps of a new chunk blended from the previous '
          'chunk to the new one (old weights N/(N+1) .. 1/(N+1)), so the command does not '
          'jump at chunk boundaries. Must be >= 1 in blend mode and 0 in the others.',
          min_value=0, max_value=1000),
    Param('execution.ensemble_decay', 'execution_ensemble_decay',
          _NS.execution_ensemble_decay,
          'execution.mode ensemble: a chunk stamped k steps after the oldest one predicting '
          "a step weighs exp(-decay * k) (ACT's m; larger: older predictions dominate, "
          'smoother and slower to react).', min_value=0.0, max_value=10.0),
    Param('execution.delay_percentile', 'execution_delay_percentile',
          _NS.execution_delay_percentile,
          "execution.mode rtc: the delay d (a chunk's first d steps are pinned to what the "
          'executing chunk runs meanwhile) comes from this percentile of the last 100 '
          'measured observation-to-chunk latencies, plus execution.exec_latency_s, in '
          'control steps (rounded up).', min_value=0.0, max_value=100.0),
    Param('execution.delay_floor_steps', 'execution_delay_floor_steps',
          _NS.execution_delay_floor_steps,
          'execution.mode rtc: the smallest d (also d before the first measurement).',
          min_value=0, max_value=1000),
    Param('execution.delay_cap_steps', 'execution_delay_cap_steps',
          _NS.execution_delay_cap_steps,
          'execution.mode rtc: the largest d (0: the executed horizon - 1). In rtc mode the '
          'next chunk starts at least d steps before the current one ends '
          '(max(replan_lead_steps, d)).', min_value=0, max_value=1000),
    Param('execution.exec_latency_s', 'execution_exec_latency_s',
          _NS.execution_exec_latency_s,
          'execution.mode rtc: actuation margin added to the measured latency (s): the time '
          'from publishing an action to the arm acting on it (driver, controller).',
          min_value=0.0, max_value=10.0),
    Param('execution.emulated_latency_s', 'execution_emulated_latency_s',
          _NS.execution_emulated_latency_s,
          'Testing: publish each chunk no earlier than this long after its observation stamp '
          "(on the node's clock; sim time under use_sim_time), to measure execution under a "
          'known latency with the node in the loop (sparse-policy bench-node '
          '--emulated-latency-ms). The safety checks still run at publication. Not with a '
          'lockstep bridge: its clock waits for the chunk (the wait gives up after '
          '1 s + 20x this value of wall time). 0: off.', min_value=0.0, max_value=10.0),
    Param('safety.watchdog_s', 'safety_watchdog_s', _NS.safety_watchdog_s,
          'Hold when no action covers the current control tick for this long, or when the '
          'newest input is this old (0: off).', min_value=0.0, max_value=60.0),
    Param('noise_seed', 'noise_seed', _NS.noise_seed,
          "-1: each chunk's initial (and DDPM variance) noise comes from torch's global "
          'generator. >= 0: it is drawn from a generator seeded with a hash of (noise_seed, '
          "the chunk's observation stamp) (core/seeded_noise.py), so an offline engine run on "
          'the same observation windows reproduces every chunk (sparse-policy replay-bag).',
          min_value=-1, max_value=2 ** 31 - 1),
)


@dataclass
class BridgeSettings:
    """Settings of the robosuite bridge node."""

    task: str = 'lift'
    cameras: Tuple[str, ...] = ('agentview',)
    image_size: Tuple[int, ...] = (84, 84)
    control_rate_hz: float = 20.0
    episodes: int = 10
    max_episode_steps: int = 400
    terminate_on_success: bool = True
    seed: int = 0
    lockstep: bool = True
    publish_clock: bool = True
    real_time_factor: float = 1.0
    chunk_timeout_s: float = 30.0
    image_topic_format: str = '{camera}/image_raw'
    joint_states_topic: str = 'joint_states'
    pose_topic: str = 'ee_pose'
    gripper_joint_names: Tuple[str, ...] = ('panda_finger_joint1', 'panda_finger_joint2')
    action_topic: str = 'policy_node/action_chunk'
    reset_service: str = 'policy_node/reset'
    frame_id: str = 'world'
    summary_file: str = ''
    action_mode: str = 'chunk'
    target_topic: str = 'policy_node/target_pose'
    gripper_topic: str = 'policy_node/gripper_command'
    publish_object_state: bool = False
    object_state_topic: str = 'object_state'

    def __post_init__(self):
        if self.action_mode not in BRIDGE_ACTION_MODES:
            raise ConfigError(f'action_mode must be one of {BRIDGE_ACTION_MODES}, '
                              f'got {self.action_mode!r}')
        # [''] means no camera: a ROS parameter list cannot be empty in YAML or overrides.
        self.cameras = tuple(c for c in self.cameras if c)
        if len(set(self.cameras)) != len(self.cameras):
            raise ConfigError(f'cameras must be unique, got {list(self.cameras)}')
        if not self.object_state_topic:
            raise ConfigError('object_state_topic must not be empty')
        if self.real_time_factor != 1.0 and not self.publish_clock:
            raise ConfigError(f'real_time_factor {self.real_time_factor} needs publish_clock: '
                              f'a slowed world only keeps its time on /clock (sim time); set '
                              f'publish_clock true or real_time_factor 1.0')
        self.image_size = tuple(int(v) for v in self.image_size)
        self.gripper_joint_names = tuple(self.gripper_joint_names)
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            raise ConfigError(f'image_size must be [height, width] >= 8, '
                              f'got {list(self.image_size)}')
        if '{camera}' not in self.image_topic_format:
            raise ConfigError(f'image_topic_format must contain {{camera}}, '
                              f'got {self.image_topic_format!r}')


_BS = BridgeSettings()
BRIDGE_PARAMS = (
    Param('task', 'task', _BS.task, 'Simulation task.', read_only=True),
    Param('cameras', 'cameras', list(_BS.cameras), "Cameras to render and publish; [''] for "
          'none (state-only models: nothing is rendered).', read_only=True),
    Param('image_size', 'image_size', list(_BS.image_size),
          'Rendered [height, width] (the policy node resizes to its model).', read_only=True),
    Param('control_rate_hz', 'control_rate_hz', _BS.control_rate_hz,
          'Simulator control rate.', read_only=True, min_value=1.0, max_value=500.0),
    Param('episodes', 'episodes', _BS.episodes, 'Episodes to run, then exit (0: forever).',
          read_only=True, min_value=0, max_value=1000000),
    Param('max_episode_steps', 'max_episode_steps', _BS.max_episode_steps,
          'Control steps before an episode counts as failed.', read_only=True, min_value=1,
          max_value=100000),
    Param('terminate_on_success', 'terminate_on_success', _BS.terminate_on_success,
          'End an episode as soon as the task succeeds.', read_only=True),
    Param('seed', 'seed', _BS.seed, 'Seed of the first episode (episode i: seed + i).',
          read_only=True, min_value=0, max_value=2 ** 31 - 1),
    Param('lockstep', 'lockstep', _BS.lockstep,
          'true: wait for the chunk of each observation before stepping (sim time pauses '
          'during inference; deterministic). false: step on the wall clock and execute the '
          "newest chunk's actions each once, in order (a late chunk starts at its first "
          'action no executed one covered), holding still when none is left.',
          read_only=True),
    Param('publish_clock', 'publish_clock', _BS.publish_clock,
          'Publish /clock and stamp with sim time (for use_sim_time nodes); false: wall '
          'time.', read_only=True),
    Param('real_time_factor', 'real_time_factor', _BS.real_time_factor,
          'Real time mode: the pace of the world against the wall clock. 1: one control step '
          'per control period; 0.25: four times slower (sim time, /clock and every stamp '
          'still advance one control period per step, so a node on use_sim_time sees its own '
          'latency multiplied by this factor). A slow or shared CPU then keeps the pace. '
          'Needs publish_clock.', read_only=True, min_value=0.01, max_value=1.0),
    Param('chunk_timeout_s', 'chunk_timeout_s', _BS.chunk_timeout_s,
          'Lockstep: wall seconds to wait for a chunk before re-sending the observation.',
          read_only=True, min_value=0.1, max_value=3600.0),
    Param('image_topic_format', 'image_topic_format', _BS.image_topic_format,
          'Image topic of each camera.', read_only=True),
    Param('joint_states_topic', 'joint_states_topic', _BS.joint_states_topic,
          'sensor_msgs/JointState topic (gripper fingers, and arm joints when known).',
          read_only=True),
    Param('pose_topic', 'pose_topic', _BS.pose_topic,
          'geometry_msgs/PoseStamped end-effector pose topic.', read_only=True),
    Param('gripper_joint_names', 'gripper_joint_names', list(_BS.gripper_joint_names),
          'Joint names of the two gripper fingers.', read_only=True),
    Param('action_topic', 'action_topic', _BS.action_topic,
          'trajectory_msgs/JointTrajectory chunks to execute.', read_only=True),
    Param('reset_service', 'reset_service', _BS.reset_service,
          'std_srvs/Trigger called before each episode (starts a new policy episode).',
          read_only=True),
    Param('frame_id', 'frame_id', _BS.frame_id, "Frame of the published pose (robosuite's "
          'site poses are in the world frame).', read_only=True),
    Param('summary_file', 'summary_file', _BS.summary_file,
          'Write a JSON run summary here at exit (empty: none).', read_only=True),
    Param('action_mode', 'action_mode', _BS.action_mode,
          "'chunk': execute the delta chunks of action_topic; 'pose_target': track the "
          'PoseStamped targets of target_topic and the gripper commands of gripper_topic, as '
          'a Cartesian controller would.', read_only=True,
          constraints=f'one of {BRIDGE_ACTION_MODES}'),
    Param('target_topic', 'target_topic', _BS.target_topic,
          'pose_target mode: geometry_msgs/PoseStamped targets, one per control step.',
          read_only=True),
    Param('gripper_topic', 'gripper_topic', _BS.gripper_topic,
          'pose_target mode: std_msgs/Float64 gripper commands (-1 open, +1 closed).',
          read_only=True),
    Param('publish_object_state', 'publish_object_state', _BS.publish_object_state,
          "Publish robosuite's object-state vector (e.g. 14 values on can: the can's position, "
          'quaternion and offset to the gripper) as sensor_msgs/JointState on '
          'object_state_topic, named object_0..object_{D-1}: a stand-in for a real object '
          'tracker, for state-only models.', read_only=True),
    Param('object_state_topic', 'object_state_topic', _BS.object_state_topic,
          'Topic of the object state (publish_object_state).', read_only=True),
)


# ==== declare / read ====

def declare(node, table) -> None:
    """Declare every parameter of ``table`` on ``node`` with its descriptor."""
    for p in table:
        node.declare_parameter(p.name, p.default, p.descriptor())


def declare_policy_parameters(node) -> None:
    """Declare the policy node's runtime and node parameters."""
    declare(node, RUNTIME_PARAMS + NODE_PARAMS)


def declare_bridge_parameters(node) -> None:
    """Declare the bridge node's parameters."""
    declare(node, BRIDGE_PARAMS)


def _kwargs(table, values: Dict[str, object]) -> dict:
    out = {}
    for p in table:
        value = values[p.name]
        out[p.attr] = tuple(value) if isinstance(value, (list, tuple)) else value
    return out


def current_values(node, table) -> Dict[str, object]:
    """Read ``table``'s parameters from ``node`` as plain python values."""
    return {p.name: node.get_parameter(p.name).value for p in table}


def config_from_values(values: Dict[str, object]) -> RuntimeConfig:
    """Build (and validate) a RuntimeConfig from parameter values."""
    return RuntimeConfig(**_kwargs(RUNTIME_PARAMS, values))


def config_from_params(node) -> RuntimeConfig:
    """Read the node's runtime parameters into a validated :class:`RuntimeConfig`."""
    return config_from_values(current_values(node, RUNTIME_PARAMS))


def settings_from_params(node) -> NodeSettings:
    """Read the node's own settings into a validated :class:`NodeSettings`."""
    return NodeSettings(**_kwargs(NODE_PARAMS, current_values(node, NODE_PARAMS)))


def settings_from_values(values: Dict[str, object]) -> NodeSettings:
    """Build (and validate) NodeSettings from parameter values (e.g. another node's)."""
    return NodeSettings(**_kwargs(NODE_PARAMS, values))


def bridge_settings_from_params(node) -> BridgeSettings:
    """Read the bridge's parameters into a validated :class:`BridgeSettings`."""
    return BridgeSettings(**_kwargs(BRIDGE_PARAMS, current_values(node, BRIDGE_PARAMS)))


def runtime_to_params(config: RuntimeConfig) -> Dict[str, object]:
    """Map a RuntimeConfig to ``{parameter name: value}`` (YAML / overrides form)."""
    return {p.name: (list(getattr(config, p.attr)) if p.attr == 'directions'
                     else getattr(config, p.attr)) for p in RUNTIME_PARAMS}


# ==== validation ====

def make_validator(node, check: Optional[Callable[[RuntimeConfig, NodeSettings], None]] = None):
    """Return an ``on_set_parameters`` callback that validates without side effects.

    The proposed values are merged with the current ones and rebuilt into RuntimeConfig and
    NodeSettings, so a rejection carries the dataclass's own message; ``check`` adds
    model-dependent checks (e.g. the execution horizon against the model's chunk length).
    """
    table = RUNTIME_PARAMS + NODE_PARAMS

    def on_set_parameters(params: List) -> SetParametersResult:
        values = current_values(node, table)
        values.update({p.name: p.value for p in params if p.name in values})
        try:
            runtime = config_from_values(values)
            settings = NodeSettings(**_kwargs(NODE_PARAMS, values))
            if check is not None:
                check(runtime, settings)
        except (ConfigError, ValueError, TypeError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    return on_set_parameters


def runtime_fields_covered() -> bool:
    """Return True when every RuntimeConfig field has exactly one parameter."""
    return sorted(p.attr for p in RUNTIME_PARAMS) == sorted(f.name
                                                            for f in fields(RuntimeConfig))


def serving_default_values(node, model_dir: str) -> Dict[str, object]:
    """Return the runtime parameters to take from the model's default, by parameter name.

    With a ``serving.json`` every runtime knob comes from it. Without one, only the schedule
    does (:func:`core.engine.default_runtime`: the config's, or its pruner's) with the
    pruner's trained cache max age, and sparsity is switched off when the model has no pruner
    and no other gate source was given. Only parameters the user did not give explicitly are
    returned: those absent from the node's parameter overrides (parameter files and
    ``--ros-args -p``).

    Raises:
        ConfigError: the serving default is unreadable or invalid.
    """
    from sparse_policy_node.core.checkpoint import CheckpointError
    from sparse_policy_node.core.engine import default_runtime
    from sparse_policy_node.core.engine import serving_runtime
    try:
        served = serving_runtime(model_dir)
        runtime = served or default_runtime(model_dir)
    except CheckpointError as exc:
        raise ConfigError(f'serving default: {exc}') from exc
    explicit = set(getattr(node, '_parameter_overrides', {}) or {})
    values = runtime_to_params(runtime)
    values.pop('inference.backend')  # the deployment's choice, not the model's
    if served is None:
        keep = {'sampler.name', 'sampler.steps', 'sparsity.rollout_max_age'}
        if not runtime.sparsity_enabled and 'sparsity.gate_source' not in explicit:
            keep.add('sparsity.enabled')
        values = {k: v for k, v in values.items() if k in keep}
    return {name: value for name, value in values.items() if name not in explicit}
