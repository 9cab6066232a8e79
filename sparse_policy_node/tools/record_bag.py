"""``sparse-policy record-bag``: record the policy node's inputs and outputs to a rosbag2.

Without ``--topic`` it records the node's default interface with the robosuite bridge
(camera images, joint states, end-effector pose, object state, action chunks, next actions,
episode results: what ``replay-bag`` needs); with it, the
given ``TOPIC:TYPE`` pairs (``/wrist/image_raw:sensor_msgs/msg/Image``). Stops after
``--duration`` seconds or on Ctrl-C, and always closes the bag properly.
"""

import os
import time

from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import CommandError


def add_arguments(parser):
    """Register the command's options."""
    parser.add_argument('out', help='output bag directory (must not exist)')
    parser.add_argument('--topic', action='append', default=[], metavar='TOPIC:TYPE',
                        help='topic and message type to record (repeatable; default: the '
                             'policy node interface)')
    parser.add_argument('--storage', default='mcap', choices=['mcap', 'sqlite3'],
                        help='rosbag2 storage format')
    parser.add_argument('--duration', type=float, default=0.0,
                        help='seconds to record (0: until Ctrl-C)')
    parser.add_argument('--use-sim-time', action='store_true',
                        help='stamp messages with /clock (simulator runs)')


def parse_topics(entries):
    """``['/a:std_msgs/msg/String']`` -> ``{'/a': 'std_msgs/msg/String'}``."""
    topics = {}
    for entry in entries:
        topic, sep, msgtype = entry.partition(':')
        if not sep or not topic or not msgtype:
            raise CommandError(f'--topic {entry!r} must look like TOPIC:TYPE, e.g. '
                               f'/wrist/image_raw:sensor_msgs/msg/Image')
        topics[topic] = msgtype
    return topics


def run(args) -> int:
    """Record until the duration is over or Ctrl-C."""
    from sparse_policy_node.bags.rosbag_io import BagError
    from sparse_policy_node.bags.rosbag_io import full_type
    check_range(args.duration, '--duration', low=0.0, hint='0 records until Ctrl-C')
    if os.path.exists(args.out):
        raise CommandError(f'{args.out} already exists; rosbag2 writes a new directory, so '
                           f'give a path that does not exist yet')
    for msgtype in parse_topics(args.topic).values():
        try:
            full_type(msgtype)
        except BagError as exc:
            raise CommandError(f'--topic: {exc}; give a ROS 2 message type such as '
                               f'sensor_msgs/msg/Image') from exc
    import rclpy
    from rclpy.parameter import Parameter
    from sparse_policy_node.bags.recorder import BagRecorder
    from sparse_policy_node.bags.recorder import NODE_TOPICS
    from sparse_policy_node.bags.rosbag_io import BagError
    from sparse_policy_node.ros.testing import Spinner
    topics = parse_topics(args.topic) or dict(NODE_TOPICS)
    rclpy.init()
    try:
        recorder = BagRecorder(args.out, topics, args.storage, parameter_overrides=[
            Parameter('use_sim_time', value=args.use_sim_time)])
    except BagError as exc:
        rclpy.try_shutdown()
        raise SystemExit(f'record-bag: {exc}') from exc
    print(f'record-bag: recording {sorted(topics)} to {args.out}', flush=True)
    start = time.monotonic()
    try:
        with Spinner(rclpy.get_default_context(), recorder):
            while not args.duration or time.monotonic() - start < args.duration:
                time.sleep(0.1)
    except KeyboardInterrupt:
        pass
    finally:
        count = recorder.close()
        rclpy.try_shutdown()
    print(f'record-bag: wrote {count} messages to {args.out}')
    return 0
