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
"""

from collections import deque
import json
import os
import socket
import sys
import threading
import time

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
import numpy as np
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
from sparse_policy_node.core.engine import NonFiniteActionError
from sparse_policy_node.core.model_card import ModelCardError
from sparse_policy_node.core.model_card import read_card
from sparse_policy_node.core.model_card import ROTATION_DIMS
from sparse_policy_node.core.policy import ObservationError
from sparse_policy_node.core.seeded_noise import engine_chunk_noise
from sparse_policy_node.ros import actions as act
from sparse_policy_node.ros import compat
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros import execution as ex
from sparse_policy_node.ros import params
from sparse_policy_node.ros import safety as sf
from sparse_policy_node.ros.diagnostics import Diagnostics
from sparse_policy_node.ros.launch_args import package_share_dir
from sparse_policy_node.ros.obs_history import ACCEPTED
from sparse_policy_node.ros.obs_history import future_by_s
from sparse_policy_node.ros.obs_history import ObservationHistory
from sparse_policy_node.ros.obs_history import TIME_JUMP
from sparse_policy_node.ros.stats import RunStats
from std_msgs.msg import Bool
from std_msgs.msg import Float64
from std_srvs.srv import Trigger
import torch
from trajectory_msgs.msg import JointTrajectory


def torch_origin() -> str:
    """Which torch and Python run the node (a ROS workspace may mix apt's and a venv's)."""
    return (f'torch {torch.__version__} from {os.path.dirname(torch.__file__)}, '
            f'python {sys.executable}')


def resolve_model_dir(path: str) -> str:
    """Resolve a relative model path against the working directory, then the share dir."""
    if os.path.isabs(path) or os.path.exists(path):
        return os.path.abspath(path)
    return os.path.join(package_share_dir(), path)


REJECT_LOG_PERIOD_S = 5.0


def describe(exc: BaseException) -> str:
    """Say what went wrong: the message of expected errors, type and message of others."""
    if isinstance(exc, (CheckpointError, ConfigError, conv.ConversionError)):
        return str(exc)
    return f'{type(exc).__name__}: {exc}'


def model_signature(cfg) -> tuple:
    """Return what a replacement model must share with the running one (inputs, actions)."""
    return (tuple(cfg.obs.vision.cameras), tuple(cfg.obs.vision.image_size),
            tuple(cfg.obs.lowdim), cfg.transformer.n_obs_steps, cfg.transformer.action_dim)


class PolicyNode(LifecycleNode):
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

    # ==== intake (executor thread; cheap) ====

    def _on_image(self, key, msg) -> None:
        try:
            mode, flip = self._image_prep.get(key, ('squash', False))
            self._add(key, msg.header.stamp, conv.image_to_chw(msg, self.image_size, mode,
                                                               flip))
        except conv.ConversionError as exc:
            self._reject(key, exc)

    def _on_lowdim(self, group, msg) -> None:
        frame = self.settings.pose_frame
        if isinstance(msg, PoseStamped) and frame and msg.header.frame_id != frame:
            for src in group:
                self.stats.count('frame_mismatches')
                self._reject(src.key, conv.ConversionError(
                    f'pose in frame {msg.header.frame_id!r}, expected pose_frame '
                    f'{frame!r} (transform it, or set pose_frame)'))
            return
        for src in group:
            try:
                self._add(src.key, msg.header.stamp, conv.extract_lowdim(src, msg))
            except conv.ConversionError as exc:
                self._reject(src.key, exc)

    def _add(self, key, stamp, value) -> None:
        ns = conv.stamp_to_ns(stamp)
        if ns == 0:
            raise conv.ConversionError('message is not stamped (header.stamp is 0)')
        ahead = future_by_s(ns, self.get_clock().now().nanoseconds)
        if ahead > self.settings.max_future_stamp_s:
            self.stats.count('future_stamps')
            raise conv.ConversionError(f'stamped {ahead:.3f} s ahead of the node clock '
                                       f'(max_future_stamp_s='
                                       f'{self.settings.max_future_stamp_s}); wrong clock?')
        status = self.history.add(key, ns, value)
        if status == TIME_JUMP:
            self._reset(f'time jumped back on {key}', keep_floor=False)
            status = self.history.add(key, ns, value)
        if status != ACCEPTED:
            self.stats.count(f'dropped_{status}')
            return
        self._inputs_version += 1
        if key in self.image_keys and self.settings.encode_on_arrival:
            self._frames.append((key, (self._episode, ns), value))
            self._frames_ready.set()
        self._wake.set()

    def _reject(self, key, exc) -> None:
        """Count a rejected input; log it, at most every 5 s per key (not per call site)."""
        self.stats.count(f'rejected_{key}')
        now, last = time.monotonic(), self._reject_logged.get(key)
        if last is None or now - last >= REJECT_LOG_PERIOD_S:
            self._reject_logged[key] = now
            self.get_logger().warning(f'rejected {key}: {exc}')

    def _reset(self, reason: str, keep_floor: bool = True) -> None:
        with self._lock:
            self._episode += 1
            # Messages captured before now belong to the old episode, even if they arrive
            # after the reset request (topics and services are not ordered).
            self.history.clear(self.get_clock().now().nanoseconds if keep_floor else None)
            self._last = self._current = None
            self._last_target = None
            if self.safety is not None:
                self.safety.deadman.clear()
                self.safety.forget()
        self.stats.count('resets')
        self.get_logger().info(f'new episode ({reason}): caches cleared, next chunk dense')
        self._wake.set()

    def _on_reset(self, request, response):
        self._reset('reset service')
        response.success, response.message = True, 'new episode; next chunk is dense'
        return response

    def _mark_dirty(self) -> None:
        if self.engine is None:
            return  # configure reads the parameters
        self._apply_safety()
        self._dirty = True
        self._wake.set()

    def _apply_safety(self) -> None:
        """Apply the safety.* and action bound parameters from the next tick on."""
        try:
            s = params.settings_from_params(self)
            config = self._safety_config(s)
        except ConfigError as exc:  # validated on set: only reached by a concurrent change
            self.get_logger().error(f'safety parameters not applied: {exc}')
            return
        with self._lock:
            self.safety.update(config)
            self.limits = config.limits()
            self._eef_limited = self._eef_limits_set(s)

    # ==== frame-encoder thread ====

    def _encode_frames(self) -> None:
        while not self._stop.is_set():
            self._frames_ready.wait(0.05)
            self._frames_ready.clear()
            while self._frames and not self._stop.is_set():
                try:  # newest first: the next window needs the newest frames soonest
                    key, frame_id, image = self._frames.pop()
                except IndexError:
                    break
                if not self._frame_wanted(key, frame_id):
                    self.stats.count('frames_skipped_off_grid')
                    continue
                try:
                    self.engine.encode_frame(key, frame_id, torch.from_numpy(image))
                    self.stats.count('frames_encoded_ahead')
                except ObservationError as exc:
                    self._reject(key, exc)
                except Exception as exc:  # noqa: B902 - the chunk encodes the frame instead
                    self.stats.count('frame_encoder_errors')
                    self.get_logger().error(f'frame encoder failed: {exc!r}',
                                            throttle_duration_sec=5.0)

    def _frame_wanted(self, key, frame_id) -> bool:
        """Return False for a frame no future window picks (off the control grid).

        The next window is due at the last (or running) chunk's stamp plus the executed
        horizon; frames before its first step, less the sync tolerance, are never picked.
        A chunk still encodes any frame it needs that was skipped here.
        """
        episode, ns = frame_id
        if episode != self._episode:
            return False
        s, dt, due = self.settings, self.dt_ns, None
        last, running = self._last, self._running
        if last is not None:
            due = last[0] + (last[1] - s.replan_lead_steps) * dt - dt // 2
        if running is not None and running[0] == episode:
            due = running[1] if due is None else max(due, running[1])
        return self.history.may_pick(key, ns, due)

    # ==== worker thread: one chunk at a time ====

    def _work(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            try:
                self._params_watch.poll()  # Humble: no post-set callback
                self._apply_changes()
                self._maybe_run_chunk()
            except Exception as exc:  # noqa: B902 - keep serving; the error is diagnosed
                self.stats.count('worker_errors')
                self._error = f'inference failed: {describe(exc)}'
                self.get_logger().error(self._error, throttle_duration_sec=5.0)

    def _apply_changes(self) -> None:
        with self._lock:
            dirty, self._dirty = self._dirty, False
        if not dirty:
            return
        s, old = params.settings_from_params(self), self.settings
        runtime = params.config_from_params(self)
        if (s.model_dir, s.device) != (old.model_dir, old.device):
            try:
                new = load_engine(resolve_model_dir(s.model_dir), s.device, runtime)
            except Exception as exc:  # noqa: B902 - any load failure keeps the old model
                self._keep_running_model(s, old, exc)
            else:
                self.engine.close()
                self.engine = new
                new.reset()
                self.get_logger().info(f'now serving {s.model_dir} on {s.device}')
        self.engine.set_runtime(runtime)
        if s.num_threads and s.num_threads != old.num_threads:
            torch.set_num_threads(s.num_threads)
        self.history.set_timing(*self._timing_ns(s))
        self.settings = s

    def _keep_running_model(self, s, old, exc) -> None:
        """Keep the running model and revert the parameters after a failed model change.

        The reverted parameters show what is actually served, later unrelated changes do not
        retry the load, and the error stands in the diagnostics until the next good chunk.
        """
        self.stats.count('model_load_failures')
        self._error = (f'model change to {s.model_dir} on {s.device} failed, kept '
                       f'{old.model_dir} on {old.device}: {describe(exc)}')
        self.get_logger().error(self._error)
        s.model_dir, s.device = old.model_dir, old.device
        result = self.set_parameters([Parameter('model_dir', value=old.model_dir),
                                      Parameter('device', value=old.device)])
        if not all(r.successful for r in result):
            self.get_logger().error(f'could not revert model_dir/device: {result}')

    def _watch_inputs(self, window_reason: str) -> list:
        """Apply the staleness rule to every input; log each gap once; count sync failures.

        Returns:
            the stale or missing observation keys.
        """
        s = self.settings
        ages = self.history.ages(self.get_clock().now().nanoseconds)
        stale = [k for k, a in ages.items() if a > s.max_obs_age_s]
        if stale and not self._gap and not self._inputs_seen:
            self._gap = True  # start-up: the inputs' publishers may not run yet
            self.get_logger().info(f'waiting for the first inputs: {", ".join(stale)}; '
                                   f'chunks start when every input has arrived')
        elif stale and not self._gap:
            self._gap = True
            self.stats.count('input_gaps')
            self.get_logger().warning(
                'no chunks: stale or missing inputs ' + ', '.join(
                    f'{k} ({ages[k]:.2f} s)' for k in stale) + f' (max_obs_age_s='
                f'{s.max_obs_age_s}); chunks resume when they are fresh again')
        elif not stale and self._gap:
            self._gap = False
            self.get_logger().info('all inputs fresh again: chunks resume' if self._inputs_seen
                                   else 'all inputs arrived: chunks start')
        if not stale and not self.history.missing():
            self._inputs_seen = True
        if window_reason and not window_reason.startswith('waiting for') \
                and self._inputs_version != self._sync_failed_version:
            self._sync_failed_version = self._inputs_version  # once per new input
            self.stats.count('sync_failures')
            self.get_logger().warning(f'no synchronized window: {window_reason}',
                                      throttle_duration_sec=5.0)
        return stale

    def _pause_before(self, stamp_ns: int) -> bool:
        """Return True after a hold, or an input gap longer than resume_dense_after_s."""
        if self._last_chunk_ns is None:
            return False
        s = self.settings
        limit = s.safety_resume_dense_after_s or \
            2 * (s.execution_horizon or self.n_action_steps) * self.dt_ns / 1e9
        with self._lock:
            paused = self._paused
        if paused or stamp_ns - self._last_chunk_ns > limit * 1e9:
            self.get_logger().info('first chunk after a pause: rollout cache dropped, dense')
            with self._lock:
                self._paused = False
                self._last_chunk_ns = None
            return True
        return False

    def _maybe_run_chunk(self) -> None:
        if not self._active or self.safety.deadman.reason(
                self.get_clock().now().nanoseconds, self.safety.config.enable_timeout_s):
            return
        s, dt = self.settings, self.dt_ns
        # Read the episode before the window: a reset in between makes the chunk one of the
        # old episode (discarded below), never a new-episode chunk of old observations.
        episode = self._episode
        window, why = self.history.window()
        stale = self._watch_inputs(why)
        if window is None or window.stamp_ns == self._skip_stamp:
            return
        if self._last is not None and window.stamp_ns < self._last[0] + (
                self._last[1] - s.replan_lead_steps) * dt - dt // 2:
            return  # the previous chunk is still being executed
        if stale:
            self._skip_stamp = window.stamp_ns
            self.stats.count('stale_skips')
            return
        device = self.engine.device
        # While this chunk runs, the frame encoder skips frames before the next window.
        self._running = (episode, window.stamp_ns + ((s.execution_horizon or self.n_action_steps)
                                                     - s.replan_lead_steps) * dt - dt // 2)
        obs = {k: torch.from_numpy(v).unsqueeze(0).to(device) for k, v in window.arrays.items()}
        frame_ids = {k: [(episode, ns) for ns in window.stamps[k]] for k in self.image_keys}
        # noise_seed >= 0: noise from (seed, window stamp), reproducible offline (replay-bag).
        noise = engine_chunk_noise(self.engine, s.noise_seed, window.stamp_ns)
        if episode != self._engine_episode:
            # The episode's first chunk: dense, from empty caches. Tied to the chunk's own
            # episode, not to when the worker last looked for changes: a reset that lands
            # after that look still clears, and a chunk of the old episode never clears.
            self.engine.reset()
            self._engine_episode = episode
        elif self._pause_before(window.stamp_ns):
            self.engine.reset()  # after a hold or an input gap: the first chunk is dense
            self.stats.count('dense_after_pause')
        try:
            out = self.engine.predict_action(obs, frame_ids=frame_ids, **noise)
        except ObservationError as exc:
            self._skip_stamp = window.stamp_ns
            self._reject('observation', exc)
            return
        except NonFiniteActionError as exc:
            self._skip_stamp = window.stamp_ns
            self._reject('action', exc)
            return
        horizon = s.execution_horizon or self.n_action_steps
        try:
            actions = conv.clamp_actions(  # the action bounds (ros/safety.py)
                out['action'][0, :horizon].double().cpu().numpy(),
                self.safety.config.lower, self.safety.config.upper)
        except conv.ConversionError as exc:
            self._skip_stamp = window.stamp_ns
            self._reject('action', exc)
            return
        try:
            actions, plan = self._plan(window.stamp_ns, actions)
        except conv.ConversionError as exc:
            self._skip_stamp = window.stamp_ns
            self._reject('action', exc)
            return
        # Checked and published under the lock that resets and deactivation take: a chunk
        # of an old episode, or one finished after deactivation, never goes out; nor one
        # that the enable input or the watchdog holds now (checked at publish time).
        with self._lock:
            now = self.get_clock().now().nanoseconds
            if episode != self._episode:
                self.stats.count('discarded_after_reset')  # computed for the old episode
                return
            if not self._active:
                self.stats.count('discarded_inactive')     # deactivated while computing
                return
            reason = self._hold_reason(now, covered=True)
            if reason:
                self.stats.count('discarded_holding')      # disabled or stalled meanwhile
                self._hold(reason, now)
                return
            if not self._publish_plan(window.stamp_ns, actions, plan):
                return
            if self._holding:
                self._holding = None
                self.get_logger().info('hold released: commanding again')
            self._exec.commit(self._planned)
            self._last, self._current = (window.stamp_ns, len(actions)), (window.stamp_ns,
                                                                          actions, plan)
            self._last_chunk_ns, self._paused = window.stamp_ns, False
            self.chunk_pub.publish(conv.chunk_to_trajectory(
                actions, self.names, dt, conv.ns_to_stamp(window.stamp_ns)))
            self._publish_due_step()
        self._error = None
        st = out['stats']
        self.stats.chunk(st['latency_ms'], (time.monotonic() - window.newest_arrival) * 1e3,
                         st['realized_sparsity'], st['dense'])
        self.stats.count('frames_encoded_in_chunks', st['frames_encoded'])
        self.get_logger().debug(f'chunk at {window.stamp_ns / 1e9:.3f} s: '
                                f'{st["latency_ms"]:.1f} ms, sparsity '
                                f'{st["realized_sparsity"]:.2f}')

    # ==== model card, output adapters and the safety layer ====

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
        self.limits = config.limits()
        self._eef_limited = self._eef_limits_set(s)
        self.get_logger().info(f'action bounds from {config.bounds_source}: '
                               f'{config.lower.tolist()} .. {config.upper.tolist()}')
        self._poses = deque(maxlen=256)      # measured (stamp_ns, position, quaternion)
        self._joints = None                  # measured joint positions (output order)
        self._joints_ns = None               # when they arrived (node clock)
        self._paused = False                 # held or inputs gapped since the last chunk
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
            self.gripper_pub = self._own(self.destroy_lifecycle_publisher,
                                         self.create_lifecycle_publisher(
                                             Float64, '~/gripper_command', 10))
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
        explicit = {'action.lower', 'action.upper'} & set(
            getattr(self, '_parameter_overrides', {}) or {}) or \
            (tuple(s.action_lower), tuple(s.action_upper)) != ((-1.0,), (1.0,))
        if s.output_mode == 'chunk' and self._eef_limits_set(s) and self.space != 'delta_eef':
            raise ConfigError('end-effector speed and workspace limits on chunk output need a '
                              'delta_eef model card')
        try:
            bounds = sf.action_bounds(self.space, self.card, s.action_lower, s.action_upper,
                                      bool(explicit), self.action_dim)
            return sf.config_from_settings(s, self.dt_ns, self.action_dim, bounds)
        except sf.SafetyConfigError as exc:
            raise ConfigError(str(exc)) from exc

    def _on_measured_pose(self, msg) -> None:
        frame = self.settings.pose_frame
        if frame and msg.header.frame_id != frame:
            return  # rejected and logged by the observation intake
        try:
            pose = conv.pose_to_vector(msg, 'pose').astype(np.float64)
        except conv.ConversionError:
            return  # rejected and logged by the observation intake
        p, q = pose[:3], pose[3:]
        with self._lock:
            self._poses.append((conv.stamp_to_ns(msg.header.stamp), p, q))

    def _on_measured_joints(self, msg) -> None:
        index = {n: i for i, n in enumerate(msg.name)}
        names = self.settings.output_joint_names
        if all(n in index for n in names) and len(msg.position) == len(msg.name):
            values = np.array([msg.position[index[n]] for n in names], float)
            if np.isfinite(values).all():
                with self._lock:
                    self._joints = values
                    self._joints_ns = self.get_clock().now().nanoseconds

    def _on_enable(self, msg) -> None:
        now = self.get_clock().now().nanoseconds
        with self._lock:
            timeout = self.safety.config.enable_timeout_s
            was = not self.safety.deadman.reason(now, timeout)
            self.safety.deadman.receive(bool(msg.data), now)
            on = not self.safety.deadman.reason(now, timeout)
            if not on:
                self._current = self._last = None   # never resume an old chunk
        if was != on:
            self.get_logger().warning('enable input: ' + (
                'enabled, commanding again' if on else 'disabled: holding'))
            self._wake.set()

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
        """Apply the safety limits and build the adapter's plan for a chunk.

        Returns:
            the limited actions (n, A) and the plan: None (chunk output), (positions,
            quaternions) of the pose targets, or the joint targets (n, J).
        """
        s, limits = self.settings, self.limits
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
            actions = self.safety.chunk(actions, prev)
            n_limited = self.safety.limited - before
        plan = None
        if s.output_mode == 'pose_target' or (s.output_mode == 'chunk' and self._eef_limited):
            if self.space == 'delta_eef':
                p0, q0 = self._measured_pose_at(stamp_ns)
                sc = self.card['action']['scaling']
                pos, quat, actions, n = act.integrate_deltas(
                    actions, p0, q0, sc['position_m_per_unit'], sc['rotation_rad_per_unit'],
                    limits)
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
                pos, quat, n = act.limit_pose_targets(actions[:, :3], quats, start[0],
                                                      start[1], limits)
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
            joints, n = act.limit_joint_targets(actions[:, :nj], j0, limits)
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

    def _pose_msg(self, stamp_ns: int, position, quat) -> PoseStamped:
        msg = PoseStamped()
        msg.header.stamp = conv.ns_to_stamp(stamp_ns)
        msg.header.frame_id = self.settings.pose_frame
        p, o = msg.pose.position, msg.pose.orientation
        p.x, p.y, p.z = (float(v) for v in position)
        o.x, o.y, o.z, o.w = (float(v) for v in quat)
        return msg

    def _publish_plan(self, stamp_ns: int, actions: np.ndarray, plan) -> bool:
        """At chunk time (under the lock): the joint trajectory, or the current step.

        Returns False when the chunk must not go out: joint output with no reference for the
        joint limits (no trajectory sent, no joint state), or a chunk whose targets elapsed.
        """
        now = self.get_clock().now().nanoseconds
        if self.settings.output_mode == 'joint_trajectory':
            k0 = act.first_pending_step(stamp_ns, self.dt_ns, now, len(plan))
            if k0 >= len(plan):
                self.stats.count('late_chunks')  # every target has elapsed
                return False
            nj = len(self.settings.output_joint_names)
            times = stamp_ns + np.arange(k0, len(plan), dtype=np.int64) * self.dt_ns
            limited = self.safety.trajectory(times, plan[k0:], now, self._fresh_joints(now),
                                             slice(0, nj))
            if limited is None:
                self.stats.count('held_no_joint_state')
                self.get_logger().warning('holding: no measured joint state to limit the '
                                          'joint targets from; chunk not sent',
                                          throttle_duration_sec=5.0)
                return False
            if not np.allclose(limited, plan[k0:]):
                self.stats.count('safety_limited_steps')
            plan[k0:] = limited
            actions[k0:, :nj] = limited
            msg = JointTrajectory(joint_names=list(self.settings.output_joint_names))
            msg.header.stamp = conv.ns_to_stamp(stamp_ns)
            msg.points = conv.chunk_to_trajectory(plan[k0:], msg.joint_names, self.dt_ns,
                                                  conv.ns_to_stamp(stamp_ns)).points
            for i, point in enumerate(msg.points):
                point.time_from_start = conv.ns_to_duration((k0 + i) * self.dt_ns)
            self.joint_traj_pub.publish(msg)
            self._commanded = True
            self.stats.count('skipped_elapsed_targets', k0)
        return True

    def _publish_due_step(self) -> None:
        """After a chunk is committed: the step due now goes out at once (not joints)."""
        if self.settings.output_mode == 'joint_trajectory':
            return
        now = self.get_clock().now().nanoseconds
        step = self._exec.tick(now) if self._exec.kind == ex.DELTA else (
            None if self._exec.peek(now) is None else (self._exec.peek(now), 0))
        if step is not None:
            self._covered_ns = now
            self._publish_step(self._current, step[0])

    def _fresh_joints(self, now: int):
        """Return the measured joints (J,) if received within the measured max age."""
        if self._joints is None or self._joints_ns is None or \
                now - self._joints_ns > self.safety.config.measured_max_age_s * 1e9:
            return None
        return self._joints

    def _fresh_pose(self, now: int):
        """Return the newest measured pose (p, q) if it is recent enough, else None."""
        if not self._poses:
            return None
        ns, p, q = self._poses[-1]
        if now - ns > self.safety.config.measured_max_age_s * 1e9:
            return None
        return p, q

    def _publish_step(self, current, k: int) -> None:
        """Publish the outputs for step ``k`` of the current chunk (under the lock).

        Every value passes the safety layer, measured from what was sent last.
        """
        stamp_ns, actions, plan = current
        t = stamp_ns + k * self.dt_ns
        before, self._commanded = self.safety.limited, True
        value = self.safety.action(actions[k])
        msg = JointState(name=list(self.names), position=value.tolist())
        msg.header.stamp = conv.ns_to_stamp(t)
        self.next_pub.publish(msg)
        if self.settings.output_mode == 'pose_target':
            target = (plan[0][k], plan[1][k])
            if self._delta_reference == 'measured' and self._poses:
                # The delta is relative to the pose measured now (robosuite's OSC semantics).
                _, p, q = self._poses[-1]
                sc = self.card['action']['scaling']
                p = p + value[:3] * sc['position_m_per_unit']
                q = act.quat_mul(act.quat_from_rotvec(
                    value[3:6] * sc['rotation_rad_per_unit']), q)
                target = (p, q)
            now = self.get_clock().now().nanoseconds
            self._last_target = self.safety.pose(*target, reference=self._fresh_pose(now))
            self.target_pub.publish(self._pose_msg(t, *self._last_target))
        if self.gripper_index is not None:
            self._last_gripper = self.safety.gripper(value[self.gripper_index],
                                                     self.gripper_index)
            if self.gripper_pub is not None:
                self.gripper_pub.publish(Float64(data=self._last_gripper))
        if self.safety.limited > before:
            self.stats.count('safety_limited_steps', self.safety.limited - before)

    def _hold_reason(self, now: int, covered: bool) -> str:
        """Return why the node holds now ('' to command): enable input, then the watchdog."""
        since = None
        if not covered:
            since = self._covered_ns if self._covered_ns is not None else self._activated_ns
        ages = self.history.ages(now) if self.safety.config.watchdog_s > 0 else {}
        return self.safety.hold_reason(now, ages, since)

    def _hold(self, reason: str, now: int) -> None:
        """Hold (under the lock): log once per hold, drop the chunk, send the hold output."""
        first = self._holding is None
        if first:
            self.stats.count('holds')
            self.get_logger().warning(f'holding: {reason}')
        self._holding = reason
        self._current = None
        self._paused = True       # the next chunk starts dense (docs/safety.md)
        self._send_hold(now, first)

    def _send_hold(self, now: int, first: bool, stopping: bool = False) -> str:
        """Send the output mode's hold command through the safety layer; say what was sent.

        Never a place the arm is not at: chunk output sends zero motion for deltas and the
        last action sent for absolute actions; pose_target the last target sent (else the
        measured pose, if recent); joint_trajectory, once, a one-point trajectory at the
        target in force now (else the measured joints): the arm stops, it is not pulled back.
        With ``safety.hold_output: silent`` nothing is sent (``stopping``, at deactivation,
        sends the stop anyway). The gripper command is repeated unchanged.
        """
        if self.safety is None:
            return 'nothing sent (not configured)'
        if self.safety.config.hold_output == 'silent' and not stopping:
            if first:
                self.safety.forget()  # another source may drive: restart from measurements
            return 'nothing sent (silent hold)'
        stamp, mode, sent = conv.ns_to_stamp(now), self.settings.output_mode, 'nothing sent'
        if mode == 'chunk':
            values = None
            if self.kind == ex.DELTA:
                values = np.zeros(self.action_dim)
                if self.gripper_index is not None and self._last_gripper is not None:
                    values[self.gripper_index] = self._last_gripper
            elif self.safety.sent.action is not None:
                values = self.safety.sent.action
            if values is not None:
                msg = JointState(name=list(self.names),
                                 position=self.safety.action(values, hold=True).tolist())
                msg.header.stamp = stamp
                self.next_pub.publish(msg)
                sent = 'sent zero motion' if self.kind == ex.DELTA else \
                    'repeated the last action'
        elif mode == 'pose_target':
            target = self.safety.sent.pose or self._fresh_pose(now)
            if target is not None:
                self._last_target = self.safety.pose(*target)
                self.target_pub.publish(self._pose_msg(now, *self._last_target))
                sent = 'repeated the last target pose'
        elif first:
            joints = self.safety.joint_stop(now, self._fresh_joints(now))
            if joints is None:
                self.get_logger().warning('no joint target in force and no recent joint state '
                                          'to stop at: nothing sent')
            else:
                msg = JointTrajectory(joint_names=list(self.settings.output_joint_names))
                msg.points = conv.chunk_to_trajectory(
                    joints[None], msg.joint_names, self.dt_ns, stamp).points
                msg.points[0].time_from_start = conv.ns_to_duration(self.dt_ns)
                self.joint_traj_pub.publish(msg)
                sent = 'sent a stop at the joint target in force'
        if self.gripper_pub is not None and self._last_gripper is not None:
            self.gripper_pub.publish(Float64(data=self._last_gripper))
        return sent

    # ==== outputs on timers ====

    def _on_control_tick(self) -> None:
        now = self.get_clock().now().nanoseconds
        with self._lock:
            if not self._active:
                return
            current = self._current
            covered = current is not None and self._exec.covers(now)
            if covered:
                self._covered_ns = now
            reason = self._hold_reason(now, covered)
            if reason:
                self._hold(reason, now)
                return
            if self._holding:
                self._holding = None
                self.get_logger().info('hold released: commanding again')
            step = self._exec.tick(now) if covered else None
            if step is not None:
                self._publish_step(current, step[0])

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
