"""``sparse-policy record-bag``: record the policy node's inputs and outputs to a rosbag2.

Without ``--topic`` it records the node's default interface with the robosuite bridge
(camera images, joint states, end-effector pose, object state, action chunks, next actions,
episode results: what ``replay-bag`` needs); with it, the
given ``TOPIC:TYPE`` pairs (``/wrist/image_raw:sensor_msgs/msg/Image``). Stops after
``--duration`` seconds or on Ctrl-C, and always closes the bag properly.
"""

import time


def add_arguments(parser):
    """Register the command's options."""
    parser.add_argument('out', help='output bag directory (must not exist)')
    parser.add_argument('--topic', action='append', default=[], metavar='TOPIC:TYPE',
                        help='topic and message type to record (repeatable; default: the '
                             'policy node interface)')
    parser.add_argument('--storage', default='mcap', choices=['mcap', 'sqlite3'])
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
            raise SystemExit(f'record-bag: --topic {entry!r} must look like TOPIC:TYPE')
        topics[topic] = msgtype
    return topics


def run(args) -> int:
    """Record until the duration is over or Ctrl-C."""
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
