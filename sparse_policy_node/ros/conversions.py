"""Pure message <-> numpy conversions (cv_bridge style): no node, no rclpy executor.

Every function either returns a well-formed value or raises :class:`ConversionError` with a
message that says what was wrong with the message (encoding, size, length, NaN), so that the
node can count and report rejected inputs by reason.
"""

from dataclasses import dataclass
import math
from typing import Dict
from typing import List
from typing import Sequence
from typing import Tuple

from builtin_interfaces.msg import Duration
from builtin_interfaces.msg import Time
import cv2
from diagnostic_msgs.msg import DiagnosticStatus
from diagnostic_msgs.msg import KeyValue
import numpy as np
from sensor_msgs.msg import Image
from trajectory_msgs.msg import JointTrajectory
from trajectory_msgs.msg import JointTrajectoryPoint

# encoding -> (channels, channel order the policy needs to undo); all are 8-bit.
ENCODINGS = {'rgb8': 3, 'bgr8': 3, 'mono8': 1, 'rgba8': 4, 'bgra8': 4}
MAX_IMAGE_SIDE = 8192


class ConversionError(ValueError):
    """A message cannot be converted; the message says why (used as the rejection reason)."""


# ==== time ====

def stamp_to_ns(stamp: Time) -> int:
    """Convert a ``builtin_interfaces/Time`` to integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> Time:
    """Convert integer nanoseconds to ``builtin_interfaces/Time``."""
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


def ns_to_duration(ns: int) -> Duration:
    """Convert integer nanoseconds to ``builtin_interfaces/Duration``."""
    return Duration(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


# ==== images ====

def image_to_rgb(msg: Image) -> np.ndarray:
    """Decode an 8-bit ``sensor_msgs/Image`` into an (H, W, 3) uint8 RGB array.

    Handles rgb8, bgr8, mono8 (replicated to three channels), rgba8 and bgra8 (alpha dropped)
    and row padding (``step > width * channels``).

    Raises:
        ConversionError: unsupported encoding, zero or huge size, or data whose length does
            not match ``height * step``.
    """
    channels = ENCODINGS.get(msg.encoding)
    if channels is None:
        raise ConversionError(f'unsupported image encoding {msg.encoding!r}; '
                              f'expected one of {sorted(ENCODINGS)}')
    h, w = int(msg.height), int(msg.width)
    if not (0 < h <= MAX_IMAGE_SIDE and 0 < w <= MAX_IMAGE_SIDE):
        raise ConversionError(f'image size {w}x{h} is empty or too large')
    row = w * channels
    if msg.step < row:
        raise ConversionError(f'image step {msg.step} is smaller than width*channels = {row}')
    data = msg.data
    if len(data) != msg.step * h:
        raise ConversionError(f'image data has {len(data)} bytes, expected step*height = '
                              f'{msg.step * h} for {w}x{h} {msg.encoding}')
    buf = np.frombuffer(bytes(data) if not isinstance(data, (bytes, bytearray)) else data,
                        dtype=np.uint8)
    img = buf.reshape(h, msg.step)[:, :row].reshape(h, w, channels)  # (H, W, C)
    if msg.encoding == 'mono8':
        return np.repeat(img, 3, axis=2)
    if msg.encoding.startswith('bgr'):
        return np.ascontiguousarray(img[:, :, 2::-1])
    return np.ascontiguousarray(img[:, :, :3])


def resize_rgb(img: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to ``size`` = (H, W); area filter when shrinking."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    shrink = img.shape[0] > h or img.shape[1] > w
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def crop_to_aspect(img: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Centre-crop an (H, W, 3) image to the aspect ratio of ``size`` = (H, W)."""
    h, w = img.shape[:2]
    th, tw = size
    if h * tw > w * th:                   # too tall: crop rows
        keep = max(1, round(w * th / tw))
        top = (h - keep) // 2
        return img[top:top + keep]
    keep = max(1, round(h * tw / th))     # too wide (or equal): crop columns
    left = (w - keep) // 2
    return img[:, left:left + keep]


RESIZE_MODES = ('squash', 'cover_crop')


def image_to_chw(msg: Image, size: Tuple[int, int], mode: str = 'squash',
                 flip_vertical: bool = False) -> np.ndarray:
    """Decode and resize an image message to the policy's (3, H, W) uint8 layout.

    ``mode`` ``squash`` resizes to ``size`` whatever the aspect ratio; ``cover_crop`` keeps
    the aspect ratio (centre crop to the target's aspect, then resize). ``flip_vertical``
    turns the image upside down first (a model trained on flipped frames).
    """
    if mode not in RESIZE_MODES:
        raise ConversionError(f'image resize mode must be one of {RESIZE_MODES}, got {mode!r}')
    rgb = image_to_rgb(msg)
    if flip_vertical:
        rgb = rgb[::-1]
    if mode == 'cover_crop':
        rgb = crop_to_aspect(rgb, size)
    return np.ascontiguousarray(resize_rgb(np.ascontiguousarray(rgb), size).transpose(2, 0, 1))


def rgb_to_image(img: np.ndarray, encoding: str = 'rgb8', stamp: Time = None,
                 frame_id: str = '') -> Image:
    """Encode an (H, W, 3) or (3, H, W) uint8 RGB array as a ``sensor_msgs/Image``."""
    if img.ndim == 3 and img.shape[0] == 3 and img.shape[2] != 3:
        img = img.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ConversionError(f'expected an (H, W, 3) uint8 array, got {img.dtype} '
                              f'{tuple(img.shape)}')
    if encoding == 'bgr8':
        img = img[:, :, ::-1]
    elif encoding == 'mono8':
        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)[:, :, None]
    elif encoding != 'rgb8':
        raise ConversionError(f'cannot encode {encoding!r}; use rgb8, bgr8 or mono8')
    img = np.ascontiguousarray(img)
    msg = Image(height=img.shape[0], width=img.shape[1], encoding=encoding, is_bigendian=0,
                step=img.shape[1] * img.shape[2])
    msg.header.frame_id = frame_id
    if stamp is not None:
        msg.header.stamp = stamp
    msg.data = img.tobytes()
    return msg


# ==== low-dimensional observations ====

POSE_PARTS = {'position': 3, 'orientation': 4, 'pose': 7}
JOINT_FIELDS = ('position', 'velocity', 'effort')


@dataclass(frozen=True)
class LowdimSource:
    """Where one low-dim observation key comes from.

    Args:
        key: the model's observation key, e.g. ``robot0_eef_pos``.
        kind: ``'pose'`` (geometry_msgs/PoseStamped) or ``'joint_state'``
            (sensor_msgs/JointState).
        topic: topic name (relative names resolve in the node's namespace).
        part: pose part (position, orientation, pose) or JointState field (position, ...).
        names: joint names, in the order the model expects (joint_state only).
    """

    key: str
    kind: str
    topic: str
    part: str
    names: Tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        """Length of the vector this source produces."""
        return POSE_PARTS[self.part] if self.kind == 'pose' else len(self.names)


def parse_lowdim_map(entries: Sequence[str]) -> List[LowdimSource]:
    """Parse ``lowdim_map`` entries.

    Grammar, one entry per model key::

        <key>=pose:<topic>:<position|orientation|pose>
        <key>=joint_state:<topic>:<position|velocity|effort>:<name>[,<name>...]

    Raises:
        ConversionError: naming the malformed entry.
    """
    sources = []
    for entry in entries:
        key, sep, spec = entry.partition('=')
        parts = spec.split(':')
        bad = ConversionError(f'lowdim_map entry {entry!r} must look like '
                              f'"key=pose:topic:position" or '
                              f'"key=joint_state:topic:position:joint_a,joint_b"')
        if not sep or not key.strip() or len(parts) < 3 or not parts[1]:
            raise bad
        kind, topic, part = parts[0], parts[1], parts[2]
        if kind == 'pose' and len(parts) == 3 and part in POSE_PARTS:
            sources.append(LowdimSource(key.strip(), kind, topic, part))
        elif kind == 'joint_state' and len(parts) == 4 and part in JOINT_FIELDS:
            names = tuple(n.strip() for n in parts[3].split(',') if n.strip())
            if not names:
                raise bad
            sources.append(LowdimSource(key.strip(), kind, topic, part, names))
        else:
            raise bad
    keys = [s.key for s in sources]
    if len(set(keys)) != len(keys):
        raise ConversionError(f'lowdim_map maps a key twice: {keys}')
    return sources


def _finite(vec: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(vec).all():
        raise ConversionError(f'{what} contains NaN or inf: {vec.tolist()}')
    return vec


# A quaternion shorter than this cannot be normalized into a rotation (zero or garbage).
MIN_QUATERNION_NORM = 1e-3


def normalized_quaternion(xyzw: Sequence[float]) -> List[float]:
    """Return the unit quaternion of ``xyzw``; drivers often send slightly unnormalized ones.

    Raises:
        ConversionError: NaN/inf, or a norm below :data:`MIN_QUATERNION_NORM` (e.g. the
            all-zero quaternion of an uninitialized pose), which names no rotation.
    """
    q = _finite(np.asarray(xyzw, dtype=np.float64), 'orientation quaternion')
    norm = float(np.linalg.norm(q))
    if norm < MIN_QUATERNION_NORM:
        raise ConversionError(f'orientation quaternion {q.tolist()} has norm {norm:.3g}: not '
                              f'a rotation (uninitialized pose?)')
    return (q / norm).tolist()


def pose_to_vector(msg, part: str) -> np.ndarray:
    """Extract position (3), orientation x, y, z, w (4) or both (7) from a (stamped) pose.

    The orientation is normalized to a unit quaternion; one that cannot be normalized (zero
    norm) or holds NaN/inf is rejected with :class:`ConversionError`.
    """
    pose = getattr(msg, 'pose', msg)
    p, q = pose.position, pose.orientation
    position = [p.x, p.y, p.z]
    quat = normalized_quaternion([q.x, q.y, q.z, q.w]) if part != 'position' else []
    vec = {'position': position, 'orientation': quat, 'pose': position + quat}[part]
    return _finite(np.asarray(vec, dtype=np.float32), f'pose {part}')


def joint_state_to_vector(msg, names: Sequence[str], field: str = 'position') -> np.ndarray:
    """Pick the named joints' ``field`` values from a JointState, in ``names`` order.

    Raises:
        ConversionError: a named joint is missing, the field's length does not match
            ``msg.name``, or a value is NaN/inf.
    """
    values = getattr(msg, field)
    if len(values) != len(msg.name):
        raise ConversionError(f'JointState has {len(msg.name)} names but {len(values)} '
                              f'{field} values')
    index = {n: i for i, n in enumerate(msg.name)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ConversionError(f'JointState lacks joints {missing}; it has {list(msg.name)}')
    vec = np.asarray([values[index[n]] for n in names], dtype=np.float32)
    return _finite(vec, f'JointState {field}')


def extract_lowdim(source: LowdimSource, msg) -> np.ndarray:
    """Return the (dim,) float32 vector of ``source`` from its message."""
    if source.kind == 'pose':
        return pose_to_vector(msg, source.part)
    return joint_state_to_vector(msg, source.names, source.part)


# ==== actions ====

def default_action_names(action_dim: int) -> List[str]:
    """Name the dimensions ``a0 .. a{A-1}`` for models whose dimensions are not named."""
    return [f'a{i}' for i in range(action_dim)]


def broadcast_limits(values: Sequence[float], action_dim: int, what: str) -> np.ndarray:
    """Expand per-dimension limits: one value applies to all dimensions, else exactly A."""
    if len(values) == 1:
        return np.full(action_dim, float(values[0]))
    if len(values) != action_dim:
        raise ConversionError(f'{what} needs 1 or {action_dim} values, got {len(values)}')
    return np.asarray(values, dtype=np.float64)


def action_limits(lower: Sequence[float], upper: Sequence[float],
                  action_dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """Broadcast both limits to ``action_dim`` and check them as a pair.

    Raises:
        ConversionError: a wrong length, a non-finite value, or a dimension whose lower limit
            is not below its upper limit (after broadcasting: ``lower=[-1]`` with an upper
            entry of -2 is inverted).
    """
    lo = broadcast_limits(lower, action_dim, 'action.lower')
    hi = broadcast_limits(upper, action_dim, 'action.upper')
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise ConversionError(f'action limits must be finite, got {lo.tolist()} and '
                              f'{hi.tolist()}')
    bad = [i for i in range(action_dim) if lo[i] >= hi[i]]
    if bad:
        raise ConversionError(f'action.lower must be below action.upper in every dimension; '
                              f'dimensions {bad} are not (lower {lo.tolist()}, upper '
                              f'{hi.tolist()})')
    return lo, hi


def finite_actions(actions: np.ndarray) -> np.ndarray:
    """Return an (n, A) chunk unchanged; a non-finite chunk is an error, never sent."""
    if not np.isfinite(actions).all():
        raise ConversionError('the policy produced NaN or inf actions; chunk dropped')
    return actions


def clamp_actions(actions: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Clamp an (n, A) chunk to the limits; a non-finite chunk is an error, never sent."""
    return np.clip(finite_actions(actions), lower, upper)


def chunk_to_trajectory(actions: np.ndarray, names: Sequence[str], dt_ns: int,
                        stamp: Time, frame_id: str = '') -> JointTrajectory:
    """Encode an (n, A) chunk as a JointTrajectory.

    ``header.stamp`` is the time of the observation the chunk was computed from; point ``k``
    has ``time_from_start = k * dt``, i.e. point 0 is the action for that observation's time.
    """
    msg = JointTrajectory(joint_names=list(names))
    msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.points = [JointTrajectoryPoint(positions=[float(v) for v in row],
                                       time_from_start=ns_to_duration(k * dt_ns))
                  for k, row in enumerate(np.asarray(actions, dtype=np.float64))]
    return msg


def trajectory_to_chunk(msg: JointTrajectory) -> Tuple[int, List[int], np.ndarray]:
    """Decode a chunk: (stamp ns, per-point offsets ns, (n, A) float64 actions).

    Raises:
        ConversionError: empty chunk, ragged points or non-finite values.
    """
    if not msg.points:
        raise ConversionError('trajectory has no points')
    width = len(msg.joint_names)
    if any(len(p.positions) != width for p in msg.points):
        raise ConversionError(f'trajectory points must each have {width} positions')
    actions = _finite(np.asarray([p.positions for p in msg.points], dtype=np.float64),
                      'trajectory')
    offsets = [stamp_to_ns(p.time_from_start) for p in msg.points]
    return stamp_to_ns(msg.header.stamp), offsets, actions


# ==== diagnostics ====

def make_status(name: str, level: bytes, message: str, values: Dict[str, object],
                hardware_id: str = '') -> DiagnosticStatus:
    """Build a DiagnosticStatus; floats are printed with 4 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return 'nan' if math.isnan(v) else f'{v:.4g}'
        return str(v)
    return DiagnosticStatus(level=level, name=name, message=message,
                            hardware_id=hardware_id,
                            values=[KeyValue(key=k, value=fmt(v)) for k, v in values.items()])
