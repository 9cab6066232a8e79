"""Play a recorded bag into a running policy node and check its chunks against the engine.

The player publishes the node's input topics from the bag at the recorded timing (receive
times, optionally scaled), collects the chunks the node publishes, then recomputes every one
offline (:mod:`sparse_policy_node.bags.offline`) on the same observation windows with the
same noise (``noise_seed``) and reports the largest difference per chunk.

Clock: with a node on sim time (``use_sim_time``) the player publishes ``/clock`` at each
message's header stamp and keeps the stamps, so chunks carry the recorded stamps and can be
compared with the chunks recorded in the bag too. With a node on the wall clock it shifts
every header stamp by (now - first stamp), so the node sees fresh inputs.

Lockstep (sim time): when the bag holds the node's recorded chunks, the player stops at each
of them (at its place in the recording) until the node has published the chunk of the same
stamp, like the lockstep bridge, so a slower or faster CPU than the recording's does not
change which windows the node computes. On the wall clock the player paces the inputs by
their stamps and never waits: the node must keep up, as on a robot, and the chunks it
computes (whichever windows) are each checked against the offline engine.
"""

import threading
import time
import types
from typing import Dict
from typing import List
from typing import Optional

from rcl_interfaces.srv import GetParameters
from rclpy.node import Node
from rclpy.parameter import parameter_value_to_python
from rclpy.serialization import deserialize_message
from rosgraph_msgs.msg import Clock
from sparse_policy_node.bags.offline import absolute
from sparse_policy_node.bags.offline import compare
from sparse_policy_node.bags.offline import EPISODE
from sparse_policy_node.bags.offline import node_inputs
from sparse_policy_node.bags.offline import offline_chunks
from sparse_policy_node.bags.offline import ReplayError
from sparse_policy_node.bags.recorder import message_class
from sparse_policy_node.bags.rosbag_io import bag_topics
from sparse_policy_node.bags.rosbag_io import read_messages
from sparse_policy_node.ros import conversions as conv
from sparse_policy_node.ros import params
from sparse_policy_node.ros.services import call_service
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory
import yaml

EPISODE_TOPIC = '/sim_bridge/episode_result'
PARAMETER_NAMES = [p.name for p in params.RUNTIME_PARAMS + params.NODE_PARAMS] + [
    'use_sim_time']


class BagPlayer(Node):
    """Publish bag messages into the ROS graph; collect the policy node's chunks."""

    def __init__(self, policy: str = '/policy_node', **kwargs):
        super().__init__('bag_player', **kwargs)
        self.policy = absolute(policy.rstrip('/'))
        self._cond = threading.Condition()
        self.chunks = []  # (stamp ns, (n, A) actions) in arrival order
        self.create_subscription(JointTrajectory, f'{self.policy}/action_chunk',
                                 self._on_chunk, 100)
        self.clock_pub = self.create_publisher(Clock, '/clock', 10)
        self._pubs = {}

    def _on_chunk(self, msg) -> None:
        try:
            stamp, _, actions = conv.trajectory_to_chunk(msg)
        except conv.ConversionError:
            return
        with self._cond:
            self.chunks.append((stamp, actions))
            self._cond.notify_all()

    def node_parameters(self, timeout: float = 10.0) -> Dict[str, object]:
        """Read the policy node's parameters (``~/get_parameters``)."""
        client = self.create_client(GetParameters, f'{self.policy}/get_parameters')
        try:
            response = call_service(client, GetParameters.Request(names=PARAMETER_NAMES),
                                    timeout)
        finally:
            self.destroy_client(client)
        if response is None:
            raise ReplayError(f'no answer from {self.policy}/get_parameters within {timeout} '
                              f's; is the policy node running (sim:=none)?')
        return {n: parameter_value_to_python(v) for n, v in zip(PARAMETER_NAMES,
                                                                response.values)}

    def reset_policy(self, timeout: float = 10.0) -> None:
        """Start a new episode on the policy node (``~/reset``): empty caches, dense chunk."""
        client = self.create_client(Trigger, f'{self.policy}/reset')
        try:
            response = call_service(client, Trigger.Request(), timeout)
        finally:
            self.destroy_client(client)
        if response is None or not response.success:
            raise ReplayError(f'{self.policy}/reset did not answer within {timeout} s')

    def publisher(self, topic: str, msgtype: str):
        """Return (creating it once) the publisher of ``topic``."""
        if topic not in self._pubs:
            self._pubs[topic] = self.create_publisher(message_class(msgtype), topic, 100)
        return self._pubs[topic]

    def wait_subscribers(self, timeout: float) -> List[str]:
        """Wait until every publisher has a subscriber; return the topics that have none."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            missing = [t for t, p in self._pubs.items() if p.get_subscription_count() == 0]
            if not missing:
                return []
            time.sleep(0.05)
        return missing

    def wait_chunk(self, stamp_ns: int, timeout: float) -> bool:
        """Wait for a chunk stamped ``stamp_ns`` or later; return whether one came."""
        with self._cond:
            return self._cond.wait_for(
                lambda: any(s >= stamp_ns for s, _ in self.chunks), timeout)

    def wait_quiet(self, quiet_s: float, timeout: float) -> None:
        """Wait until no chunk has arrived for ``quiet_s`` (at most ``timeout``)."""
        deadline = time.monotonic() + timeout
        count, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            with self._cond:
                n = len(self.chunks)
            if n != count:
                count, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.02)


def _stamp_of(msg) -> Optional[int]:
    header = getattr(msg, 'header', None)
    return None if header is None else conv.stamp_to_ns(header.stamp)


INPUT, CHUNK = 'input', 'chunk'


class PendingReset:
    """Where the node is reset after an episode end, the rule of the bridge and recorder.

    The bridge resets the node before it publishes the next episode's first input, so the
    node resets before the first input stamped after the ended episode's last observation
    (before the next input at all when that stamp is unknown).
    """

    def __init__(self):
        self._due, self._after = False, None

    def episode_ended(self, last_stamp_ns: Optional[int]) -> None:
        """Note that an episode ended; ``last_stamp_ns``: its last observation's stamp, or None."""
        self._due, self._after = True, last_stamp_ns

    def before(self, stamp_ns: Optional[int]) -> bool:
        """Return whether the node resets before an input stamped ``stamp_ns``; once."""
        if not self._due or (self._after is not None and stamp_ns is not None
                             and stamp_ns <= self._after):
            return False
        self._due = False
        return True


def play(player: BagPlayer, events, types: Dict[str, str], sim_clock: bool,
         rate: float = 1.0, chunk_timeout: float = 10.0) -> List:
    """Replay ``events`` (:func:`load_bag`) at their recorded timing.

    Sim clock: inputs go out at their receive times with ``/clock`` at their stamp, and at
    a recorded chunk the player waits until the node has published the chunk of the same
    stamp (lockstep). Wall clock: inputs go out at their stamps, shifted to now. After an
    episode end, the node's ``~/reset`` is called before the first input of the next
    episode, as the bridge does.

    Args:
        player: the player node (spinning).
        events: ``(kind, t_ns, topic, payload)`` in receive order: INPUT with the rclpy
            message, CHUNK with the recorded chunk stamp, EPISODE with the stamp of the
            ended episode's last observation (None: unknown).
        types: ``{topic: message type}`` of the inputs.
        sim_clock: publish ``/clock`` at the stamps; else shift stamps to the wall clock.
        rate: playback speed factor.
        chunk_timeout: longest wait at a recorded chunk.

    Returns:
        ``(topic, stamp_ns, msg)`` of every published input message, stamps as published,
        and ``(EPISODE, None, None)`` where the node was reset.
    """
    published = []
    if not events:
        return published
    t0, shift = events[0][1], 0
    if not sim_clock:
        # Real time: paced by the stamps, which must stay near the node's wall clock, so no
        # lockstep waits (a lockstep recording's receive times bunch a chunk's steps).
        stamps = [_stamp_of(p) for k, _, _, p in events if k == INPUT and _stamp_of(p)]
        t0 = min(stamps, default=0)
        shift = player.get_clock().now().nanoseconds - t0
    start, extra, clock_ns = time.monotonic(), 0.0, 0
    pending = PendingReset()
    for kind, t_ns, topic, payload in events:
        if sim_clock or (kind == INPUT and _stamp_of(payload)):
            axis = t_ns if sim_clock else _stamp_of(payload)
            delay = start + extra + (axis - t0) / 1e9 / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        began = time.monotonic()
        if kind == CHUNK and not sim_clock:
            continue
        if kind == EPISODE:
            # The next episode starts after the ended one's last stamp (its last inputs may
            # be received after the result). The first starts with the replay's reset.
            if published:
                pending.episode_ended(payload)
            continue
        if kind == CHUNK:
            if not player.wait_chunk(payload + shift, chunk_timeout):
                player.get_logger().warning(f'no chunk for {payload / 1e9:.3f} s within '
                                            f'{chunk_timeout} s; playing on')
            extra += time.monotonic() - began
            continue
        stamp = _stamp_of(payload)
        if pending.before(stamp):
            player.reset_policy(chunk_timeout)
            published.append((EPISODE, None, None))
            now = player.get_clock().now().nanoseconds
            if not sim_clock and stamp and stamp + shift <= now:
                # The node drops inputs stamped before its reset: move the episode later.
                shift = now - stamp + 1_000_000
            extra += time.monotonic() - began
        if stamp:
            stamp += shift
            payload.header.stamp = conv.ns_to_stamp(stamp)
            if sim_clock and stamp > clock_ns:
                clock_ns = stamp
                player.clock_pub.publish(Clock(clock=conv.ns_to_stamp(clock_ns)))
        player.publisher(topic, types[topic]).publish(payload)
        published.append((topic, stamp, payload))
    return published


def load_bag(path: str, input_topics: List[str], chunk_topic: str, episode_topic: str):
    """Read a bag's node inputs, recorded chunks and episode ends, in receive order.

    Returns:
        ``(events, types, recorded)``: ``(kind, t_ns, topic, payload)`` events for
        :func:`play`, ``{topic: type}`` of the inputs and ``{stamp: actions}`` of the
        recorded chunks.
    """
    available = bag_topics(path)
    missing = [t for t in input_topics if t not in available]
    if missing:
        raise ReplayError(f'bag {path} lacks the node input topic(s) {missing}; it has '
                          f'{sorted(available)}')
    extra = [t for t in (chunk_topic, episode_topic) if t and t in available]
    events, recorded = [], {}
    for topic, t_ns, data in read_messages(path, list(input_topics) + extra, raw=True):
        msg = deserialize_message(bytes(data), message_class(available[topic]))
        if topic == episode_topic:
            values = {kv.key: kv.value for kv in getattr(msg, 'values', [])}
            try:
                last = int(values['last_stamp_ns'])
            except (KeyError, ValueError):
                last = None  # reset before the next input in receive order
            events.append((EPISODE, t_ns, topic, last))
            continue
        if topic == chunk_topic:
            try:
                stamp, _, actions = conv.trajectory_to_chunk(msg)
            except conv.ConversionError:
                continue
            recorded[stamp] = actions
            events.append((CHUNK, t_ns, topic, stamp))
        else:
            events.append((INPUT, t_ns, topic, msg))
    return place_episode_ends(events), {t: available[t] for t in input_topics}, recorded


def place_episode_ends(events: List) -> List:
    """Move each episode end before the next episode's inputs and chunks received earlier.

    The recorder gets the bridge's result on its own topic, and may receive it after the
    first inputs of the next episode although the bridge reset the node before publishing
    them. An end that knows its episode's last stamp goes before every event since the
    previous end that is stamped later (order otherwise kept), so the replay resets the
    node where the bridge did.
    """
    out, since = [], 0   # since: index in out after the previous episode end
    for event in events:
        kind, _, _, payload = event
        if kind == EPISODE and payload is not None:
            segment, out[since:] = out[since:], []
            is_later = [(_event_stamp(e) or payload) > payload for e in segment]
            later = [e for e, moved in zip(segment, is_later) if moved]
            out.extend(e for e, moved in zip(segment, is_later) if not moved)
            out.append(event)
            out.extend(later)
            since = len(out) - len(later)
            continue
        out.append(event)
        if kind == EPISODE:
            since = len(out)
    return out


def _event_stamp(event) -> Optional[int]:
    kind, _, _, payload = event
    if kind == CHUNK:
        return payload
    return _stamp_of(payload) if kind == INPUT else None


def to_samples(inputs, published) -> List:
    """Convert published ``(topic, stamp, msg)`` inputs to ``(key, stamp, value)`` samples.

    Messages the node rejects are left out; EPISODE markers are kept.
    """
    samples = []
    for topic, stamp, msg in published:
        if topic == EPISODE:
            samples.append((EPISODE, None, None))
            continue
        try:
            samples.extend((key, stamp, value) for key, value in inputs.convert(topic, msg))
        except conv.ConversionError:
            pass  # the node rejected it too
    return samples


def recorded_inputs(events) -> List:
    """Return a bag's inputs as the recording node got them, with its episode resets.

    The resets are placed by :class:`PendingReset`, as :func:`play` places them.
    """
    out, pending = [], PendingReset()
    for kind, _, topic, payload in events:
        if kind == EPISODE and out:
            pending.episode_ended(payload)
        elif kind == INPUT:
            stamp = _stamp_of(payload)
            if pending.before(stamp):
                out.append((EPISODE, None, None))
            out.append((topic, stamp, payload))
    return out


def node_values(params_files: List[str], overrides: Dict[str, object],
                node: str = 'policy_node') -> Dict[str, object]:
    """Return the policy node's parameter values from its parameter files, without a node.

    Declared defaults, then each file's ``/**`` and node-name sections in order, then
    ``overrides``; with ``serving_default`` the runtime parameters given nowhere come from
    the model, as the node sets them at configure.
    """
    from sparse_policy_node.ros.policy_node import resolve_model_dir
    values = {p.name: p.default for p in params.RUNTIME_PARAMS + params.NODE_PARAMS}
    explicit = {}
    name = node.strip('/').rpartition('/')[2]
    for path in params_files:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        for key in ('/**', name, '/' + name, node):
            explicit.update((data.get(key) or {}).get('ros__parameters', {}))
    explicit.update(overrides)
    unknown = sorted(set(explicit) - set(values) - {'use_sim_time'})
    if unknown:
        raise ReplayError(f'unknown policy node parameter(s) {unknown}')
    values.update({k: v for k, v in explicit.items() if k in values})
    if values['serving_default']:
        model_dir = resolve_model_dir(values['model_dir'])
        values.update(params.serving_default_values(
            types.SimpleNamespace(_parameter_overrides=explicit), model_dir))
    return values


def check_recorded(bag: str, values: Dict[str, object], policy: str = '/policy_node',
                   device: str = '', episode_topic: str = EPISODE_TOPIC,
                   tolerance: float = 1e-5) -> Dict:
    """Recompute the chunks recorded in ``bag`` with the offline engine (no node).

    Args:
        bag: rosbag2 directory with the node's inputs and ``<policy>/action_chunk``.
        values: the recording node's parameters (:func:`node_values`).
        policy: fully qualified name the recording node had.
        device: torch device of the offline run; empty: the node's.
        episode_topic: where the bag marks episode ends.
        tolerance: as in :func:`replay_bag`.

    Returns:
        the report of :func:`replay_bag`, with the recorded chunks in place of live ones.
    """
    from sparse_policy_node.core.checkpoint import load_policy_config
    from sparse_policy_node.core.engine import load_engine
    from sparse_policy_node.ros.policy_node import resolve_model_dir
    settings = params.settings_from_values(values)
    runtime = params.config_from_values(values)
    check_reproducible(settings)
    model_dir = resolve_model_dir(settings.model_dir)
    config = load_policy_config(model_dir)
    policy = absolute(policy.rstrip('/'))
    inputs = node_inputs(config, settings, model_dir, policy.rpartition('/')[0])
    chunk_topic = f'{policy}/action_chunk'
    events, _, recorded = load_bag(bag, inputs.topics, chunk_topic, episode_topic)
    if not recorded:
        raise ReplayError(f'bag {bag} has no recorded chunks on {chunk_topic}')
    order = [p for k, _, _, p in events if k == CHUNK]
    published = recorded_inputs(events)
    engine = load_engine(model_dir, device or settings.device, runtime)
    try:
        offline = offline_chunks(engine, inputs, to_samples(inputs, published), order,
                                 settings, config.transformer.n_obs_steps)
    finally:
        engine.close()
    rows = compare([(st, recorded[st]) for st in order], dict(zip(order, offline)),
                   tolerance)
    for row in rows:
        row['offline_max_abs_diff'] = row.pop('max_abs_diff')
    return {'bag': bag, 'policy': policy, 'noise_seed': settings.noise_seed,
            'clock': 'recorded', 'chunks': rows, 'live_chunks': len(order),
            'recorded_chunks': len(recorded),
            'published_messages': sum(t != EPISODE for t, _, _ in published),
            'episodes': 1 + sum(t == EPISODE for t, _, _ in published), 'play_s': 0.0,
            'max_offline_diff': max(r['offline_max_abs_diff'] for r in rows),
            'kept_steps': sum(r['kept_steps'] for r in rows)}


def check_reproducible(settings) -> None:
    """Raise ReplayError unless the node's chunks are a function of its windows and seed.

    Unseeded noise differs from any offline draw; the safety layer's step limit, chunk
    blending or ensembling (``execution.mode``) and end-effector limits change chunks
    depending on what ran before.
    """
    if settings.noise_seed < 0:
        raise ReplayError('the policy node draws unseeded noise (noise_seed=-1): its chunks '
                          'cannot be reproduced; start it with noise_seed:=<int >= 0>')
    s = settings
    limited = [name for name, on in (
        ('safety.max_step_change', any(v > 0 for v in s.safety_max_step_change)),
        ('execution.blend_steps', s.execution_blend_steps > 0),
        ('execution.mode', getattr(s, 'execution_mode', 'replace') != 'replace'),
        ('safety.max_linear_speed', s.safety_max_linear_speed > 0),
        ('safety.max_angular_speed', s.safety_max_angular_speed > 0),
        ('safety.workspace_min/max', min(s.safety_workspace_min) > -1000.0
         or max(s.safety_workspace_max) < 1000.0)) if on]
    if limited:
        raise ReplayError(f'the policy node changes chunks after the engine ({", ".join(limited)}'
                          f'): turn these off to compare with the offline engine')


def replay_bag(context, bag: str, policy: str = '/policy_node', rate: float = 1.0,
               against_recorded: bool = False, device: str = '', clock: str = 'auto',
               reset: bool = True, chunk_timeout: float = 10.0,
               discovery_timeout: float = 10.0,
               episode_topic: str = EPISODE_TOPIC, tolerance: float = 1e-5) -> Dict:
    """Replay ``bag`` into the running policy node and compare its chunks with the engine.

    Args:
        context: an initialized rclpy Context.
        bag: rosbag2 directory recorded by ``record-bag`` (or ``ros2 bag record``).
        policy: fully qualified name of the policy node.
        rate: playback speed factor.
        against_recorded: also compare the node's chunks with those recorded in the bag.
        device: torch device of the offline run; empty: the node's.
        clock: 'sim' (publish /clock, keep stamps), 'wall' (shift stamps to now) or 'auto'
            (the node's use_sim_time decides).
        reset: call the node's ``~/reset`` first (the replay starts a new episode).
        chunk_timeout: longest wait for the node's chunk at a recorded chunk (lockstep).
        discovery_timeout: longest wait for the node's parameters and subscriptions.
        episode_topic: where the bag marks episode ends (the bridge's results); the node is
            reset before the next episode's first input, as the bridge resets it.
        tolerance: leading steps of a late chunk that differ by more while the rest agrees
            were kept from the previous chunk by the node's execution (``kept_steps``, see
            ``ros/execution.py``) and are not compared; in lockstep (sim time) no chunk is
            late, so none should be.

    Returns:
        the report: ``chunks`` rows (stamp, offline and recorded max |difference|), the
        largest differences, the node's seed and counts.
    """
    from sparse_policy_node.core.checkpoint import load_policy_config
    from sparse_policy_node.core.engine import load_engine
    from sparse_policy_node.ros.policy_node import resolve_model_dir
    from sparse_policy_node.ros.testing import Spinner
    player = BagPlayer(policy, context=context)
    try:
        with Spinner(context, player):
            values = player.node_parameters(discovery_timeout)
            settings = params.settings_from_values(values)
            runtime = params.config_from_values(values)
            check_reproducible(settings)
            sim_clock = values['use_sim_time'] if clock == 'auto' else clock == 'sim'
            if against_recorded and not sim_clock:
                raise ReplayError('comparing with the recorded chunks needs the recorded '
                                  'stamps (they seed the noise): run the node with '
                                  'use_sim_time:=true, or use --clock sim')
            model_dir = resolve_model_dir(settings.model_dir)
            config = load_policy_config(model_dir)
            namespace = player.policy.rpartition('/')[0]
            inputs = node_inputs(config, settings, model_dir, namespace)
            chunk_topic = f'{player.policy}/action_chunk'
            events, types, recorded = load_bag(bag, inputs.topics, chunk_topic, episode_topic)
            if against_recorded and not recorded:
                raise ReplayError(f'bag {bag} has no recorded chunks on {chunk_topic}')
            for topic, msgtype in types.items():
                player.publisher(topic, msgtype)
            missing = player.wait_subscribers(discovery_timeout)
            if missing:
                raise ReplayError(f'the policy node does not subscribe to {missing} within '
                                  f'{discovery_timeout} s')
            if reset:
                player.reset_policy(discovery_timeout)
            t_start = time.monotonic()
            published = play(player, events, types, sim_clock, rate, chunk_timeout)
            player.wait_quiet(1.0, chunk_timeout)
            play_s = time.monotonic() - t_start
            with player._cond:
                live = list(player.chunks)
    finally:
        player.destroy_node()
    if not live:
        raise ReplayError('the policy node published no chunk during the replay (stale or '
                          'rejected inputs? see its log and diagnostics)')
    samples = to_samples(inputs, published)
    engine = load_engine(model_dir, device or settings.device, runtime)
    try:
        offline = offline_chunks(engine, inputs, samples, [s for s, _ in live], settings,
                                 config.transformer.n_obs_steps)
    finally:
        engine.close()
    rows = compare(live, {s: a for (s, _), a in zip(live, offline)},
                   tolerance)
    for row in rows:
        row['offline_max_abs_diff'] = row.pop('max_abs_diff')
    if against_recorded:
        for row, other in zip(rows, compare(live, recorded, tolerance)):
            row['recorded_max_abs_diff'] = other['max_abs_diff']
            row['kept_steps'] = max(row['kept_steps'], other['kept_steps'])
    report = {'bag': bag, 'policy': player.policy, 'noise_seed': settings.noise_seed,
              'clock': 'sim' if sim_clock else 'wall', 'chunks': rows,
              'live_chunks': len(live), 'recorded_chunks': len(recorded),
              'published_messages': sum(t != EPISODE for t, _, _ in published),
              'episodes': 1 + sum(t == EPISODE for t, _, _ in published),
              'play_s': round(play_s, 3),
              'max_offline_diff': max(r['offline_max_abs_diff'] for r in rows),
              'kept_steps': sum(r['kept_steps'] for r in rows)}
    if against_recorded:
        diffs = [r['recorded_max_abs_diff'] for r in rows]
        # A chunk the recorded node computed but discarded (its episode ended while it ran)
        # may be published in the replay: extra, and harmless (a reset follows it).
        report['unmatched_recorded'] = len(set(recorded) - {s for s, _ in live})
        report['extra_live_chunks'] = sum(d is None for d in diffs)
        report['max_recorded_diff'] = max((d for d in diffs if d is not None),
                                          default=float('inf'))
    return report
