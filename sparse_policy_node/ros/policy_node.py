"""Policy node: a thin ROS 2 adapter around the sparse inference engine.

Inputs (sensor-data QoS): ``<camera>/image_raw`` (sensor_msgs/Image) per model camera and the
low-dim topics of ``lowdim_map`` (sensor_msgs/JointState, geometry_msgs/PoseStamped).
Outputs: ``~/action_chunk`` (trajectory_msgs/JointTrajectory stamped with the observation
time, point k at k * dt), ``~/next_action`` (sensor_msgs/JointState at the control rate,
stamped with the time the action is for and named like the chunk, for simple consumers) and
``/diagnostics``. Service: ``~/reset`` (std_srvs/Trigger). Chunks and next actions go out on
lifecycle publishers, and only while the node is active.

Intake callbacks only convert and store; a worker thread runs one chunk at a time, so
inference never blocks observation intake. A frame-encoder thread encodes accepted camera
frames as they arrive (``encode_on_arrival``), newest first and only those a future window can
pick (frames between chunks never land on the control grid), so a chunk starts from cached
image features and the vision encoder runs on the other core. Heavy parameter changes
(model, device) and resets are applied by the worker between chunks.

The node is split by what each part does: this file holds the lifecycle and the wiring;
ros/intake.py the observation callbacks, resets and live parameters; ros/worker.py the
inference and frame-encoder threads; ros/adapters.py the model card checks and chunk
planning; ros/outputs.py every publish of an action (steps, holds, the stop at deactivation),
each through the safety layer of ros/safety.py (docs/safety.md).
"""

from collections import deque
import json
import socket
import sys
import threading

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from rclpy.clock import Clock
from rclpy.clock import ClockType
from rclpy.executors import ExternalShutdownException
from rclpy.executors import SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import Image
from sensor_msgs.msg import JointState
from sparse_policy_node.core import keys
from sparse_policy_node.core.backends import missing_onnx_modules
from sparse_policy_node.core.checkpoint import CheckpointError
from sparse_policy_node.core.checkpoint import load_policy_config
from sparse_policy_node.core.config import ConfigError
from sparse_policy_node.core.engine import load_engine
from sparse_policy_node.core.model_card import ModelCardError
from sparse_policy_node.core.model_card import read_card
from sparse_policy_node.ros import compat
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros import params
from sparse_policy_node.ros.adapters import AdaptersMixin
from sparse_policy_node.ros.diagnostics import Diagnostics
from sparse_policy_node.ros.execution import DelayEstimator
from sparse_policy_node.ros.intake import IntakeMixin
from sparse_policy_node.ros.node_common import card_contract
from sparse_policy_node.ros.node_common import describe
from sparse_policy_node.ros.node_common import model_signature
from sparse_policy_node.ros.node_common import resolve_model_dir
from sparse_policy_node.ros.node_common import torch_origin
from sparse_policy_node.ros.obs_history import ObservationHistory
from sparse_policy_node.ros.outputs import OutputsMixin
from sparse_policy_node.ros.preparer import EnginePreparer
from sparse_policy_node.ros.stats import RunStats
from sparse_policy_node.ros.worker import WorkerMixin
from std_srvs.srv import Trigger
import torch
from trajectory_msgs.msg import JointTrajectory


class PolicyNode(IntakeMixin, WorkerMixin, AdaptersMixin, OutputsMixin, LifecycleNode):
    """Serve action chunks from synchronized camera and proprioception topics.

    A managed (lifecycle) node: *configure* loads the model and creates the topics, services,
    timers and threads; *activate* starts a new episode and publishing; *deactivate* stops
    chunks and next actions (the robot holds), *cleanup* frees the model. With ``autostart``
    (the default) the node configures and activates itself at start-up.
    """

    def __init__(self, **kwargs):
        super().__init__('policy_node', **kwargs)
        params.declare_policy_parameters(self)
        self.settings = params.settings_from_params(self)
        self.stats = RunStats()
        self.engine = None
        self._active = False
        self._entities = []      # (destroy function, entity) created by configure
        self._threads = []
        self._configure_error = None
        self._error = None       # standing error for diagnostics; cleared by a good chunk
        self._reject_logged = {}  # key -> time.monotonic() of its last rejection log line
        self._lock = threading.Lock()
        self.safety = None        # the safety layer (ros/safety.py), built at configure
        self._preparer = None     # builds engines off the control path (ros/preparer.py)
        self.add_on_set_parameters_callback(params.make_validator(self, self._check))
        # Post-set callback where rclpy has one (Iron+), polled by the worker on Humble.
        self._params_watch = compat.ParameterWatch(
            self, [p.name for p in params.RUNTIME_PARAMS + params.NODE_PARAMS],
            self._mark_dirty)
        if self.settings.autostart:
            self.trigger_configure()
            if self._configure_error is not None:
                raise self._configure_error
            self.trigger_activate()

    # ==== lifecycle ====

    def on_configure(self, state) -> TransitionCallbackReturn:
        """Load the model and create the node's interfaces; FAILURE with a logged reason.

        Every error fails the transition with its reason logged (not only the expected
        model and parameter errors), so nothing ends as a bare "Unable to start transition".
        """
        try:
            self._configure()
        except Exception as exc:  # noqa: B902 - any failure: logged, node stays unconfigured
            self._configure_error = exc
            self.get_logger().error(f'cannot configure: {describe(exc)}')
            self._teardown()
            return TransitionCallbackReturn.FAILURE
        self._configure_error = None
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state) -> TransitionCallbackReturn:
        """Publish again; a re-activation starts a new episode (the robot may have moved)."""
        if self._activated_before:
            self._reset('activated again')
        with self._lock:
            self._activated_before = self._active = True
            self._activated_ns = self.get_clock().now().nanoseconds
            self._commanded = False   # set by the first action sent (deactivate stops it)
        s, c = self.settings, self.safety.config
        if s.output_mode != 'chunk' and c.unlimited() and not s.safety_require_enable \
                and c.watchdog_s <= 0:
            self.get_logger().warning(
                f'output.mode {s.output_mode} commands the robot with no motion limit, no '
                f'enable input and no watchdog (safety.* in docs/safety.md)')
        return super().on_activate(state)  # enables the lifecycle publishers

    def on_deactivate(self, state) -> TransitionCallbackReturn:
        """Stop publishing chunks and next actions; keep the model loaded.

        ``_active`` is cleared under the lock that every chunk is published under, so once
        this returns no chunk goes out, not even one that was being computed; the lifecycle
        publishers are disabled as well.
        """
        with self._lock:
            self._active = False
            self._current = None
            sent = 'nothing had been commanded'
            if self._commanded:  # stop what runs: the controller would finish its command
                sent = self._send_hold(self.get_clock().now().nanoseconds, first=True,
                                       stopping=True)
                self._commanded = False
            self.safety.deadman.clear()
        self.get_logger().info(f'deactivated: {sent}; no chunks until activated again')
        return super().on_deactivate(state)

    def on_cleanup(self, state) -> TransitionCallbackReturn:
        """Stop the threads and free the model and the interfaces."""
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state) -> TransitionCallbackReturn:
        """Stop like cleanup from any state."""
        self._active = False
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        s = self.settings = params.settings_from_params(self)
        if s.num_threads:
            torch.set_num_threads(s.num_threads)
        model_dir = resolve_model_dir(s.model_dir)
        if s.serving_default:
            self._apply_serving_default(model_dir)
        self.engine = load_engine(model_dir, s.device, params.config_from_params(self))
        self._preparer = EnginePreparer(discard=lambda built: built[0].close())
        cfg = self.engine.policy.config
        self.signature = model_signature(cfg)
        self.dt_ns = int(round(1e9 / s.control_rate_hz))
        self.action_dim, self.n_action_steps = cfg.transformer.action_dim, cfg.n_action_steps
        self._check(self.engine.runtime, s)
        self.names = list(s.action_names)
        if len(self.names) != self.action_dim:
            self.get_logger().warning(f'action.names has {len(self.names)} entries but the '
                                      f'model has {self.action_dim} action dimensions; '
                                      f'using a0..')
            self.names = conv.default_action_names(self.action_dim)
        try:
            self.card = read_card(model_dir, cfg)
        except ModelCardError as exc:
            raise ConfigError(f'model card of {model_dir}: {exc}') from exc
        self.card_disagreements = self._check_card(self.card, s)
        # Camera preprocessing as the card says (without a card: resize, no flip).
        self._image_prep = {
            keys.image_key(cam): (spec.get('resize_mode', 'squash'),
                                  bool(spec.get('flip_vertical', False)))
            for cam, spec in (self.card or {}).get('cameras', {}).items()}
        for key, (mode, _) in self._image_prep.items():
            if mode not in conv.RESIZE_MODES:
                raise ConfigError(f'model card: {key} resize_mode {mode!r} is not one of '
                                  f'{conv.RESIZE_MODES}')
        sources = conv.parse_lowdim_map(s.lowdim_map)
        self._check_sources(cfg, sources)
        self.image_size = tuple(cfg.obs.vision.image_size)
        self.image_keys = [keys.image_key(c) for c in cfg.obs.vision.cameras]
        self.keys = self.image_keys + [k for k, _ in cfg.obs.lowdim]
        self.history = ObservationHistory(self.keys, cfg.transformer.n_obs_steps, self.dt_ns,
                                          *self._timing_ns(s))
        self._wake, self._stop, self._dirty = threading.Event(), threading.Event(), False
        self._episode, self._activated_before = 0, False
        self._engine_episode = 0  # the episode whose chunks filled the engine's caches
        self._last = None        # (stamp_ns, n_points) of the last published chunk
        self._last_chunk_ns = None  # stamp of the last published chunk (pause detection)
        self._current = None     # (stamp_ns, (n, A) actions) for ~/next_action
        self._delay = DelayEstimator()  # execution.mode rtc: measured obs-to-chunk latency
        self._skip_stamp = None  # window stamp already rejected (stale / bad observation)
        self._inputs_version = self._sync_failed_version = 0  # accepted inputs / last failure
        self._gap = False        # an input is stale or missing (logged once per gap)
        self._inputs_seen = False  # every input was fresh once (before: waiting at start-up)
        self._diagnostics = Diagnostics(self.get_fully_qualified_name(), '')
        for cam in cfg.obs.vision.cameras:
            self._own(self.destroy_subscription, self.create_subscription(
                Image, s.image_topic_format.format(camera=cam),
                lambda m, k=keys.image_key(cam): self._on_image(k, m), qos_profile_sensor_data))
        by_topic = {}
        for src in sources:
            by_topic.setdefault((src.kind, src.topic), []).append(src)
        for (kind, topic), group in by_topic.items():
            self._own(self.destroy_subscription, self.create_subscription(
                PoseStamped if kind == 'pose' else JointState, topic,
                lambda m, g=group: self._on_lowdim(g, m), qos_profile_sensor_data))
        # Lifecycle publishers: nothing leaves the node unless it is active.
        self.chunk_pub = self._own(self.destroy_lifecycle_publisher,
                                   self.create_lifecycle_publisher(
                                       JointTrajectory, '~/action_chunk', 10))
        self.next_pub = self._own(self.destroy_lifecycle_publisher,
                                  self.create_lifecycle_publisher(
                                      JointState, '~/next_action', 10))
        self.diag_pub = self._own(self.destroy_publisher, self.create_publisher(
            DiagnosticArray, '/diagnostics', 10))
        self._own(self.destroy_service, self.create_service(Trigger, '~/reset', self._on_reset))
        self._configure_outputs(s)
        self._own(self.destroy_timer, self.create_timer(self.dt_ns / 1e9,
                                                        self._on_control_tick))
        # Diagnostics tick on the wall clock so they keep flowing when sim time stops.
        self._own(self.destroy_timer, self.create_timer(
            s.diagnostics_period_s, self._publish_diagnostics,
            clock=Clock(clock_type=ClockType.STEADY_TIME)))
        # Newest accepted frames to encode ahead of the chunk; the oldest are dropped when
        # the encoder falls behind (the chunk then encodes what it still needs).
        self._frames = deque(maxlen=2 * max(1, len(self.image_keys)))
        self._running = None     # (episode, earliest stamp of the window after the running one)
        self._frames_ready = threading.Event()
        self._threads = [threading.Thread(target=self._work, name='inference', daemon=True),
                         threading.Thread(target=self._encode_frames, name='frame_encoder',
                                          daemon=True)]
        for thread in self._threads:
            thread.start()
        backend = self.engine.backend_for(self.engine.runtime).name
        missing = missing_onnx_modules()
        asked = self.engine.runtime.backend
        if asked == 'auto' and backend == 'torch' and s.device == 'cpu' and missing:
            self.get_logger().warning(f'backend auto runs torch: {", ".join(missing)} not '
                                      f'importable (pip install -r requirements/runtime.txt '
                                      f'for the faster onnxruntime backend)')
        self.get_logger().info(f'serving {model_dir} on {s.device} (backend {backend}): '
                               f'inputs {self.keys}, '
                               f'{self.n_action_steps}-step chunks at {s.control_rate_hz} Hz; '
                               f'{torch_origin()}')

    def _own(self, destroy, entity):
        self._entities.append((destroy, entity))
        return entity

    def _teardown(self) -> None:
        """Stop the threads, close the engine and destroy what configure created."""
        if self._threads:
            self._stop.set()
            self._wake.set()
            self._frames_ready.set()
            for thread in self._threads:
                thread.join(timeout=10.0)
            self._threads = []
        if self._preparer is not None:
            self._preparer.cancel()  # a build still running is closed when it ends
            self._preparer = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self.safety = None
        for destroy, entity in reversed(self._entities):
            destroy(entity)
        self._entities = []

    # ==== validation (no side effects) ====

    def _timing_ns(self, s):
        return int(s.sync_tolerance_s * 1e9), int(s.time_jump_reset_s * 1e9)

    def _apply_serving_default(self, model_dir: str) -> None:
        """Set the runtime parameters not given explicitly to the model's serving default.

        The parameters then show what is served (``ros2 param get``) and stay live-tunable.
        """
        values = params.serving_default_values(self, model_dir)
        if not values:
            return
        result = self.set_parameters_atomically(
            [Parameter(name, value=value) for name, value in values.items()])
        if not result.successful:
            raise ConfigError(f'the serving default of {model_dir} was rejected: '
                              f'{result.reason}')
        cuda_only = () if self.settings.device.startswith('cuda') else ('inference.cuda_graphs',)
        self.get_logger().info(
            "runtime from the model's serving default: " + ', '.join(
                f'{name}={value}' for name, value in values.items() if name not in cuda_only))

    def _check(self, runtime, s) -> None:
        if self.engine is None:
            return  # not configured: only the parameters' own checks apply
        if s.model_dir != self.settings.model_dir:
            try:
                new = load_policy_config(resolve_model_dir(s.model_dir))
            except CheckpointError as exc:
                raise ConfigError(f'model_dir: {exc}') from exc
            if model_signature(new) != self.signature:
                raise ConfigError(f'model_dir {s.model_dir!r} needs other inputs or actions '
                                  f'than the running model; restart the node to switch')
            try:
                card = read_card(resolve_model_dir(s.model_dir), new)
            except ModelCardError as exc:
                raise ConfigError(f'model_dir: model card: {exc}') from exc
            if card_contract(card) != card_contract(self.card):
                raise ConfigError(f'model_dir {s.model_dir!r}: its model card differs from the '
                                  f"running model's in what the outputs and the safety layer "
                                  f'depend on (action space, scaling, range, gripper, cameras); '
                                  f'deactivate, clean up and configure again to switch')
        else:
            self.engine.check_runtime(runtime)
        if s.execution_horizon > self.n_action_steps:
            raise ConfigError(f"execution_horizon={s.execution_horizon} exceeds the model's "
                              f'n_action_steps={self.n_action_steps}')
        horizon = s.execution_horizon or self.n_action_steps
        if s.replan_lead_steps >= horizon:
            raise ConfigError(f'replan_lead_steps={s.replan_lead_steps} must be below the '
                              f'execution horizon ({horizon} actions)')
        try:
            conv.action_limits(s.action_lower, s.action_upper, self.action_dim)
        except conv.ConversionError as exc:
            raise ConfigError(str(exc)) from exc
        if self.safety is not None:  # configured: the safety settings against the model
            self._safety_config(s)

    def _check_sources(self, cfg, sources) -> None:
        by_key = {src.key: src for src in sources}
        for key, dim in cfg.obs.lowdim:
            if key not in by_key or by_key[key].dim != dim:
                raise ConfigError(f'lowdim_map must map model key {key!r} to a {dim}-D source, '
                                  f'got {by_key.get(key)}')

    # ==== diagnostics and summary ====

    def _publish_diagnostics(self) -> None:
        self._diagnostics.hardware_id = f'{socket.gethostname()}/{self.settings.device}'
        msg = self._diagnostics.message(
            self.stats, self.history.ages(self.get_clock().now().nanoseconds), self.settings,
            self.engine.runtime, self._active, self._error, self._holding)
        msg.header.stamp = self.get_clock().now().to_msg()
        self.diag_pub.publish(msg)

    def close(self) -> dict:
        """Stop the threads and the engine; return the run summary.

        The summary file (``summary_file``) also holds the per-chunk latencies (``samples``).
        """
        self._active = False
        self._teardown()
        summary = self.stats.snapshot(recent=False)
        if self.settings.summary_file:
            with open(self.settings.summary_file, 'w') as f:
                json.dump(dict(summary, samples=self.stats.samples()), f, indent=2)
        return summary


def main(args=None) -> int:
    """Run the policy node; exit 1 when the model or the parameters cannot be loaded."""
    try:
        with compat.ros_session(args):
            try:
                node = PolicyNode()
            except Exception as exc:  # noqa: B902 - every start-up failure: reason, exit 1
                print(f'[policy_node] cannot start: {describe(exc)}', file=sys.stderr)
                return 1
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            try:
                executor.spin()
            finally:
                summary = node.close()
                print(f'[policy_node] summary: {json.dumps(summary)}', file=sys.stderr)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
