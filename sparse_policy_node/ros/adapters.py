"""Policy node, output adapters: model card checks, output set-up and chunk planning.

``_plan`` turns a chunk into the output mode's plan (pose targets, joint targets) with the
planning limits; what is then sent goes through ros/outputs.py and the safety layer.
"""

from collections import deque

from geometry_msgs.msg import PoseStamped
import numpy as np
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import JointState
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.model_card import ROTATION_DIMS
from sparse_policy_node.ros import actions as act
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros import execution as ex
from sparse_policy_node.ros import safety as sf
from std_msgs.msg import Bool
from std_msgs.msg import Float64
from std_msgs.msg import Float64MultiArray
from trajectory_msgs.msg import JointTrajectory


class AdaptersMixin:
    """Model card, output set-up and chunk planning of :class:`PolicyNode`."""

    def _check_card(self, card, s) -> list:
        """Check the parameters against the model card; log and return what disagrees.

        A mode the model's actions cannot drive is an error; other disagreements (rate,
        names, frame, camera flip) are logged as warnings and served as configured.
        """
        if card is None:
            if s.output_mode != 'chunk':
                raise ConfigError(f'output.mode {s.output_mode} needs the model card '
                                  f'(model_card.json: action space, scaling, frames); write it '
                                  f'with sparse-policy model-card MODEL --write or by hand')
            self.get_logger().info('the model has no model card: parameters not checked')
            return []
        action = card['action']
        space = action['space']
        need = {'pose_target': ('delta_eef', 'abs_eef_pose'), 'joint_trajectory': ('joint_pos',)}
        if s.output_mode in need and space not in need[s.output_mode]:
            wanted = ' or '.join(need[s.output_mode])
            raise ConfigError(f'output.mode {s.output_mode} needs a {wanted} model; the model '
                              f'card says {space}')
        arm = action['dim'] - (action.get('gripper') is not None)
        if s.output_mode == 'joint_trajectory' and len(s.output_joint_names) != arm:
            raise ConfigError(f'output.joint_names has {len(s.output_joint_names)} joints, the '
                              f'model commands {arm}')
        diffs = []
        if abs(card['control_rate_hz'] - s.control_rate_hz) > 1e-6:
            diffs.append(f'control_rate_hz={s.control_rate_hz} but the model was trained at '
                         f"{card['control_rate_hz']} Hz")
        if list(s.action_names) != list(action['names']):
            diffs.append(f'action.names={list(s.action_names)} but the card names '
                         f"{action['names']}")
        frame = card.get('frames', {}).get('pose_frame')
        if frame and s.pose_frame and frame != s.pose_frame:
            diffs.append(f'pose_frame={s.pose_frame!r} but the model saw poses in {frame!r}')
        names = action.get('joint_names')
        if s.output_mode == 'joint_trajectory' and names and list(names) != list(
                s.output_joint_names):
            diffs.append(f'output.joint_names={list(s.output_joint_names)} but the card names '
                         f'{names}')
        for d in diffs:
            self.get_logger().warning(f'model card disagrees: {d}')
        if not diffs:
            self.get_logger().info(f'model card: {space} actions at {card["control_rate_hz"]} '
                                   f'Hz; parameters agree')
        return diffs

    def _configure_outputs(self, s) -> None:
        """Create the adapter's publishers, the measurement and enable subscriptions."""
        action = (self.card or {}).get('action', {})
        self.space = action.get('space')
        self._delta_reference = action.get('delta_reference', 'integrated')
        # Chunk execution per action kind (ros/execution.py): absolute targets skip what
        # elapsed, deltas run once each in order; integrated deltas are combined as targets.
        kind = ex.action_kind(self.space, self._delta_reference, s.output_mode)
        self._combine_targets = kind == ex.ABSOLUTE and self.space == 'delta_eef'
        try:
            self._exec = ex.ChunkExecutor(
                kind, self.dt_ns, s.execution_mode, s.execution_blend_steps,
                s.execution_ensemble_decay,
                quat_at=self.action_dim + 3 if self._combine_targets else None)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self._planned = None
        if s.execution_mode == 'ensemble' and s.replan_lead_steps == 0:
            self.get_logger().warning('execution.mode ensemble with replan_lead_steps 0: '
                                      'chunks do not overlap, nothing to average')
        gripper = action.get('gripper')
        self.gripper_index = None if gripper is None else int(gripper['index'])
        self.kind = kind
        config = self._safety_config(s)
        self.safety = sf.SafetyLayer(config, s.safety_require_enable)
        self._eef_limited = self._eef_limits_set(s)
        log = self.get_logger().warning if np.isinf(config.lower).all() else \
            self.get_logger().info   # an absolute model whose card has no action.range
        log(f'action bounds from {config.bounds_source}: {config.lower.tolist()} .. '
            f'{config.upper.tolist()}')
        self._poses = deque(maxlen=256)      # measured (stamp_ns, position, quaternion)
        self._joints = None                  # measured joint positions (output order)
        self._joints_ns = None               # when they arrived (node clock)
        self._paused = False                 # held or inputs gapped since the last chunk
        self._blocking_holds = 0             # holds begun that no chunk ends (see _hold)
        self._blocking = False               # the current hold is one of them
        self._commanded = False              # an action went out since activation
        self._last_target = None             # (position, quaternion) last sent
        self._last_gripper = None
        self._holding = None                 # hold reason while holding
        self._covered_ns = None              # last tick an action covered
        self._activated_ns = None
        self.target_pub = self.gripper_pub = self.joint_traj_pub = None
        if s.output_mode in ('pose_target', 'chunk'):
            self._own(self.destroy_subscription, self.create_subscription(
                PoseStamped, s.output_pose_topic, self._on_measured_pose,
                qos_profile_sensor_data))
        if s.output_mode == 'pose_target':
            self.target_pub = self._own(self.destroy_lifecycle_publisher,
                                        self.create_lifecycle_publisher(
                                            PoseStamped, '~/target_pose', 10))
        if s.output_mode == 'joint_trajectory':
            self._own(self.destroy_subscription, self.create_subscription(
                JointState, s.output_joint_state_topic, self._on_measured_joints,
                qos_profile_sensor_data))
            self.joint_traj_pub = self._own(self.destroy_lifecycle_publisher,
                                            self.create_lifecycle_publisher(
                                                JointTrajectory, '~/joint_trajectory', 10))
        if s.output_mode != 'chunk' and self.gripper_index is not None:
            msg_type = Float64MultiArray if s.output_gripper_msg == 'multi_array' else Float64
            self.gripper_pub = self._own(self.destroy_lifecycle_publisher,
                                         self.create_lifecycle_publisher(
                                             msg_type, '~/gripper_command', 10))
        if s.safety_require_enable:
            self._own(self.destroy_subscription, self.create_subscription(
                Bool, '~/enable', self._on_enable, 10))

    def _eef_limits_set(self, s) -> bool:
        return bool(s.safety_max_linear_speed or s.safety_max_angular_speed or
                    min(s.safety_workspace_min) > -1000.0 or
                    max(s.safety_workspace_max) < 1000.0)

    def _safety_config(self, s) -> sf.SafetyConfig:
        """Build the safety layer's limits from settings ``s``; ConfigError if they do not fit.

        Absolute action spaces take their bounds from the model card, never from the +-1
        default of action.lower/upper (applied only when set to other values, inside the
        card's range).
        """
        if s.output_mode == 'chunk' and self._eef_limits_set(s) and self.space != 'delta_eef':
            raise ConfigError('end-effector speed and workspace limits on chunk output need a '
                              'delta_eef model card')
        try:
            bounds = sf.model_bounds(self.card, s.action_lower, s.action_upper, self.action_dim)
            return sf.config_from_settings(s, self.dt_ns, self.action_dim, bounds)
        except sf.SafetyConfigError as exc:
            raise ConfigError(str(exc)) from exc

    def _measured_pose_at(self, stamp_ns: int):
        """Return the measured pose nearest the chunk stamp (within a control period)."""
        with self._lock:
            poses = list(self._poses)
        if not poses:
            raise conv.ConversionError(f'no measured pose on {self.settings.output_pose_topic} '
                                       f'to integrate the chunk from')
        ns, p, q = min(poses, key=lambda e: abs(e[0] - stamp_ns))
        if abs(ns - stamp_ns) > max(self.dt_ns, int(self.settings.sync_tolerance_s * 1e9)):
            raise conv.ConversionError(f'no measured pose within a control period of the '
                                       f'chunk stamp (nearest {(ns - stamp_ns) / 1e9:+.3f} s)')
        return p, q

    def _plan(self, stamp_ns: int, actions: np.ndarray):
        """Apply the safety limits (ros/safety.py) and build the adapter's plan for a chunk.

        The chunk is combined with the executing ones first, then bounded and limited along
        its steps by the safety layer; each tick limits again, last, from what was sent.

        Returns:
            the limited actions (n, A) and the plan: None (chunk output), (positions,
            quaternions) of the pose targets, or the joint targets (n, J).
        """
        s = self.settings
        prev = None
        with self._lock:
            current = self._current
            if current is None:
                self._exec.drop()  # held, disabled or reset: nothing to combine with
        if current is not None:  # the action in force at the chunk's first step
            k = round((stamp_ns - current[0]) / self.dt_ns)
            prev = current[1][min(max(k, 0), len(current[1]) - 1)]
        if not self._combine_targets:
            actions = self._combine(stamp_ns, actions)
        with self._lock:
            before = self.safety.limited
            actions = self.safety.chunk(actions, prev)  # bounds and step changes
            n_limited = self.safety.limited - before
            if not self._combine_targets:  # the ticks (and rtc's next prefix) read these
                self._planned.values = actions
        plan = None
        if s.output_mode == 'pose_target' or (s.output_mode == 'chunk' and self._eef_limited):
            if self.space == 'delta_eef':
                p0, q0 = self._measured_pose_at(stamp_ns)
                sc = self.card['action']['scaling']
                with self._lock:
                    pos, quat, actions, n = self.safety.plan_deltas(
                        actions, p0, q0, sc['position_m_per_unit'], sc['rotation_rad_per_unit'])
            else:
                fmt = self.card['action']['rotation_format']
                end = 3 + ROTATION_DIMS[fmt]
                try:
                    quats = np.stack([act.quat_from_rotation(a[3:end], fmt) for a in actions])
                except (ValueError, FloatingPointError) as exc:
                    raise conv.ConversionError(f'bad rotation in the chunk: {exc}') from exc
                with self._lock:
                    start = self._last_target
                if start is None:
                    start = self._measured_pose_at(stamp_ns)
                with self._lock:
                    pos, quat, n = self.safety.plan_pose_targets(actions[:, :3], quats,
                                                                 start)
            n_limited += n
            plan = (pos, quat) if s.output_mode == 'pose_target' else None
            if self._combine_targets:  # integrated deltas: combine the absolute targets
                a = self.action_dim
                out = self._combine(stamp_ns, np.hstack([actions, pos, quat]))
                actions, plan = out[:, :a], (out[:, a:a + 3], out[:, a + 3:a + 7])
        elif s.output_mode == 'joint_trajectory':
            nj = len(s.output_joint_names)
            with self._lock:
                j0 = self._joints if prev is None else prev[:nj]
                joints, n = self.safety.plan_joints(actions[:, :nj], j0)
            actions = actions.copy()
            actions[:, :nj] = joints
            n_limited += n
            plan = joints
        if n_limited:
            self.stats.count('safety_limited_steps', n_limited)
        return actions, plan

    def _combine(self, stamp_ns: int, values: np.ndarray) -> np.ndarray:
        """Combine a chunk with the executing ones (execution.mode); committed on publish."""
        s = self.settings
        with self._lock:  # run-time changes of the blend and ensemble knobs apply here
            self._exec.blend_steps = s.execution_blend_steps
            self._exec.decay = s.execution_ensemble_decay
            self._planned = self._exec.plan(stamp_ns, values,
                                            self.get_clock().now().nanoseconds)
        if self._exec.kind == ex.DELTA and self._planned.first_pending:
            # Steps that ran from the previous chunk after this one's observation.
            self.stats.count('superseded_deltas', self._planned.first_pending)
        return self._planned.values
