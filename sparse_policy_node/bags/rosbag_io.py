"""Read and write rosbag2 files (MCAP or sqlite3) with the pure-Python ``rosbags`` library.

Messages are stored as CDR bytes, exactly what rclpy publishes and ``ros2 bag`` records, so a
bag written here plays in ``ros2 bag play`` and a bag from ``ros2 bag record`` reads here.
Deserialized messages are ``rosbags`` dataclasses with the ROS field names, which the
duck-typed converters of :mod:`sparse_policy_node.ros.conversions` accept.
"""

import os
from typing import Dict
from typing import Iterator
from typing import Optional
from typing import Sequence
from typing import Tuple

from rosbags.rosbag2 import Reader
from rosbags.rosbag2 import StoragePlugin
from rosbags.rosbag2 import Writer
from rosbags.typesys import get_typestore
from rosbags.typesys import Stores

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
STORAGE = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}


class BagError(ValueError):
    """A bag is missing, unreadable, or lacks a topic; the message says which."""


def absolute(topic: str) -> str:
    """Return the topic name as rosbag2 records it (``ee_pose`` -> ``/ee_pose``)."""
    return topic if topic.startswith('/') else '/' + topic


def full_type(msgtype: str) -> str:
    """``sensor_msgs/Image`` or ``sensor_msgs/msg/Image`` -> ``sensor_msgs/msg/Image``."""
    parts = msgtype.split('/')
    if len(parts) == 2:
        parts = [parts[0], 'msg', parts[1]]
    name = '/'.join(parts)
    if len(parts) != 3 or name not in TYPESTORE.types:
        raise BagError(f'unknown message type {msgtype!r} (ROS 2 Kilted message types only)')
    return name


class BagWriter:
    """Write CDR-serialized messages to a new rosbag2 directory (context manager).

    Usage::

        with BagWriter(path, {'ee_pose': 'geometry_msgs/msg/PoseStamped'}) as bag:
            bag.write_raw('ee_pose', t_ns, cdr_bytes)    # bytes as rclpy serializes them
            bag.write('ee_pose', t_ns, rosbags_msg)      # or a rosbags message object
    """

    def __init__(self, path: str, topics: Dict[str, str], storage: str = 'mcap'):
        if os.path.exists(path):
            raise BagError(f'{path} already exists; rosbag2 writes a new directory')
        if storage not in STORAGE:
            raise BagError(f'storage must be one of {sorted(STORAGE)}, got {storage!r}')
        self.path = path
        self._writer = Writer(path, version=9, storage_plugin=STORAGE[storage])
        self._writer.open()
        self._connections = {}
        self.types = {}
        for topic, msgtype in topics.items():
            topic = absolute(topic)
            self.types[topic] = full_type(msgtype)
            self._connections[topic] = self._writer.add_connection(
                topic, self.types[topic], typestore=TYPESTORE)
        self.count = 0

    def write_raw(self, topic: str, t_ns: int, data: bytes) -> None:
        """Append one CDR-serialized message received (or stamped) at ``t_ns``."""
        topic = absolute(topic)
        if topic not in self._connections:
            raise BagError(f'topic {topic!r} was not declared; declared: '
                           f'{sorted(self._connections)}')
        self._writer.write(self._connections[topic], int(t_ns), bytes(data))
        self.count += 1

    def write(self, topic: str, t_ns: int, msg) -> None:
        """Serialize a ``rosbags`` message object and append it."""
        self.write_raw(topic, t_ns, TYPESTORE.serialize_cdr(msg, self.types[absolute(topic)]))

    def close(self) -> None:
        """Finish the bag (writes its metadata.yaml)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bag_topics(path: str) -> Dict[str, str]:
    """Return ``{topic: message type}`` of a bag."""
    with _open(path) as reader:
        return {c.topic: c.msgtype for c in reader.connections}


def _open(path: str) -> Reader:
    if not os.path.isdir(path):
        raise BagError(f'bag {path!r} does not exist (a rosbag2 directory is expected)')
    try:
        return Reader(path)
    except Exception as exc:  # noqa: B902 - rosbags raises its own error types per storage
        raise BagError(f'bag {path!r} cannot be read: {exc}') from exc


def read_messages(path: str, topics: Optional[Sequence[str]] = None,
                  raw: bool = False) -> Iterator[Tuple[str, int, object]]:
    """Yield ``(topic, t_ns, message)`` in time order (bag receive time).

    Args:
        path: rosbag2 directory.
        topics: topics to read (all by default); a topic the bag lacks is an error. Names
            are compared as absolute names and yielded as the bag records them.
        raw: yield the CDR bytes instead of deserialized messages.
    """
    with _open(path) as reader:
        available = {c.topic for c in reader.connections}
        wanted = None if topics is None else {absolute(t) for t in topics}
        missing = sorted((wanted or set()) - available)
        if missing:
            raise BagError(f'bag {path!r} has no topic(s) {missing}; it has {sorted(available)}')
        connections = [c for c in reader.connections if wanted is None or c.topic in wanted]
        for connection, t_ns, data in reader.messages(connections=connections):
            msg = data if raw else TYPESTORE.deserialize_cdr(data, connection.msgtype)
            yield connection.topic, int(t_ns), msg
