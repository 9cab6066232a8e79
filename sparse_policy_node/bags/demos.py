"""Turn a teleoperation bag into one demonstration on a fixed control grid.

A bag holds streams at their own rates: camera images, proprioception (``PoseStamped`` /
``JointState``, mapped to model keys by the node's ``lowdim_map`` grammar) and the commanded
actions (``Float64MultiArray``, or the first point of a ``JointTrajectory``). The episode is
sampled at ``rate_hz`` on the bag's receive-time axis: step k at ``t_k = t_0 + k / rate``,
where ``t_0`` is the first time every stream has a message and the last step is the last
one whose command interval has begun before the last action message.

- observation k: the newest message of each stream at or before ``t_k`` (zero-order hold);
- action k: the newest command received before ``t_k + 1 / rate``, i.e. the command in force
  during step k (a command sent just after the observation it answers belongs to that step).

Timing uses the bag's receive times, one clock for every stream (the recorder writes the
node clock, so sim time under ``use_sim_time``).
"""

from dataclasses import dataclass
from typing import Dict
from typing import List
from typing import Sequence
from typing import Tuple

import numpy as np
from sparse_policy_node.bags.rosbag_io import absolute
from sparse_policy_node.bags.rosbag_io import BagError
from sparse_policy_node.bags.rosbag_io import read_messages
from sparse_policy_node.core import keys
from sparse_policy_node.ros import conversions as conv


@dataclass
class BagLayout:
    """Which topics make a demonstration.

    Args:
        cameras: ``{camera: image topic}``; camera ``c`` becomes observation ``f'{c}_image'``.
        lowdim_map: entries of the node's ``lowdim_map`` grammar
            (``key=pose:topic:position``, ``key=joint_state:topic:position:j1,j2``).
        action_topic: commanded actions (``std_msgs/Float64MultiArray``,
            ``sensor_msgs/JointState`` or ``trajectory_msgs/JointTrajectory``, first point).
        rate_hz: control rate of the demonstration grid.
        image_size: (H, W) the images are resized to.
    """

    cameras: Dict[str, str]
    lowdim_map: Tuple[str, ...]
    action_topic: str
    rate_hz: float = 20.0
    image_size: Tuple[int, int] = (84, 84)

    def __post_init__(self):
        if not self.cameras and not self.lowdim_map:
            raise BagError('a demonstration needs at least one camera or low-dim key')
        if not self.rate_hz > 0:
            raise BagError(f'rate_hz must be > 0, got {self.rate_hz}')
        self.sources = conv.parse_lowdim_map(self.lowdim_map)


def action_vector(msg) -> np.ndarray:
    """Return the (A,) float32 command of a message.

    ``std_msgs/Float64MultiArray`` (``data``), ``trajectory_msgs/JointTrajectory`` (first
    point's positions) or ``sensor_msgs/JointState`` (``position``).
    """
    if hasattr(msg, 'points'):
        if not len(msg.points):
            raise conv.ConversionError('JointTrajectory has no points')
        values = msg.points[0].positions
    elif hasattr(msg, 'position'):
        values = msg.position
    else:
        values = msg.data
    vec = np.asarray(values, dtype=np.float32)
    if vec.ndim != 1 or vec.size == 0 or not np.isfinite(vec).all():
        raise conv.ConversionError(f'action {vec.tolist()} is empty or not finite')
    return vec


def _streams(path: str, layout: BagLayout) -> Dict[str, Tuple[np.ndarray, List]]:
    """Read every stream: ``{key: (times (N,) int64 ns, values)}``; 'action' for commands."""
    by_topic = {}
    for cam, topic in layout.cameras.items():
        by_topic.setdefault(absolute(topic), []).append(
            (keys.image_key(cam), lambda m: conv.image_to_chw(m, layout.image_size)))
    for source in layout.sources:
        by_topic.setdefault(absolute(source.topic), []).append(
            (source.key, lambda m, s=source: conv.extract_lowdim(s, m)))
    by_topic.setdefault(absolute(layout.action_topic), []).append((keys.ACTION, action_vector))
    streams = {key: ([], []) for entries in by_topic.values() for key, _ in entries}
    for topic, t_ns, msg in read_messages(path, sorted(by_topic)):
        for key, convert in by_topic[topic]:
            try:
                value = convert(msg)
            except conv.ConversionError as exc:
                raise BagError(f'{path}: message on {topic!r} at {t_ns} ns: {exc}') from exc
            streams[key][0].append(t_ns)
            streams[key][1].append(value)
    for key, (times, _) in streams.items():
        if not times:
            raise BagError(f'{path}: no messages for {key!r}')
    return {key: (np.asarray(t, dtype=np.int64), v) for key, (t, v) in streams.items()}


Episode = Tuple[List[Dict[str, np.ndarray]], np.ndarray]


def episode_from_bag(path: str, layout: BagLayout) -> Episode:
    """Sample one demonstration from a bag (see the module docstring for the timing).

    Returns:
        (observations, actions): L dicts of ``f'{camera}_image'`` (3, H, W) uint8 and
        low-dim (d,) float32, and (L, A) float32 actions.

    Raises:
        BagError: a topic is missing or empty, a message cannot be converted, the commands
            change length, or the streams never overlap.
    """
    streams = _streams(path, layout)
    period = int(round(1e9 / layout.rate_hz))
    action_times, actions = streams[keys.ACTION]
    if len({a.shape for a in actions}) != 1:
        raise BagError(f'{path}: commands change length: {sorted({a.size for a in actions})}')
    t0 = max(times[0] for times, _ in streams.values())
    last = int(action_times[-1])
    if t0 > last:
        raise BagError(f'{path}: the streams never overlap (every stream starts after the '
                       f'last command)')
    ticks = np.arange(t0, last + 1, period, dtype=np.int64)  # (L,)
    obs = [{} for _ in ticks]
    for key, (times, values) in streams.items():
        if key == keys.ACTION:
            continue
        index = np.searchsorted(times, ticks, side='right') - 1  # newest at or before t_k
        for k, i in enumerate(index):
            obs[k][key] = values[i]
    index = np.searchsorted(action_times, ticks + period, side='left') - 1  # before t_k + dt
    return obs, np.stack([actions[i] for i in index])


def bags_to_dataset(paths: Sequence[str], out: str, layout: BagLayout,
                    min_steps: int = 1) -> dict:
    """Write one demonstration per bag into a robomimic-layout HDF5 (``train-policy`` input).

    Returns:
        a summary: demos written, steps per demo, action dimension, skipped short bags.
    """
    from sparse_policy_node.training.dataset import DemoWriter
    lengths, skipped, action_dim = [], [], None
    env_args = {'source': 'rosbag', 'rate_hz': layout.rate_hz,
                'cameras': dict(layout.cameras), 'lowdim_map': list(layout.lowdim_map),
                'action_topic': layout.action_topic}
    with DemoWriter(out, env_args) as writer:
        for path in paths:
            obs, actions = episode_from_bag(path, layout)
            if action_dim is not None and actions.shape[1] != action_dim:
                raise BagError(f'{path}: action dimension {actions.shape[1]}, earlier bags '
                               f'have {action_dim}')
            action_dim = actions.shape[1]
            if len(actions) < min_steps:
                skipped.append(path)
                continue
            writer.add(obs, actions, attrs={'bag': str(path)})
            lengths.append(len(actions))
    return {'demos': len(lengths), 'steps': lengths, 'action_dim': action_dim,
            'skipped': skipped, 'out': out}
