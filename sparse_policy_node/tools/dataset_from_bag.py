r"""``sparse-policy dataset-from-bag``: teleoperation bags -> robomimic-layout HDF5 demos.

One bag (rosbag2 directory, MCAP or sqlite3) is one demonstration. Example::

    sparse-policy dataset-from-bag bags/demo_* --out demos.hdf5 --rate 20 \
        --camera agentview=agentview/image_raw \
        --lowdim robot0_eef_pos=pose:ee_pose:position \
        --lowdim robot0_eef_quat=pose:ee_pose:orientation \
        --lowdim robot0_gripper_qpos=joint_state:joint_states:position:finger_l,finger_r \
        --action-topic /teleop/command
"""

import json
import os

from sparse_policy_node.tools.args import check_bag
from sparse_policy_node.tools.args import check_out_path
from sparse_policy_node.tools.args import check_positive
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import CommandError


def add_arguments(parser):
    """Register the command's options."""
    parser.add_argument('bags', nargs='+', help='rosbag2 directories, one demonstration each')
    parser.add_argument('--out', required=True, help='output .hdf5 path')
    parser.add_argument('--camera', action='append', default=[], metavar='NAME=TOPIC',
                        help='camera name and its sensor_msgs/Image topic (repeatable)')
    parser.add_argument('--lowdim', action='append', default=[], metavar='KEY=SPEC',
                        help='low-dim key in the lowdim_map grammar of the policy node '
                             '(repeatable, in the order of the model)')
    parser.add_argument('--action-topic', required=True,
                        help='commanded actions: std_msgs/Float64MultiArray or '
                             'trajectory_msgs/JointTrajectory (first point)')
    parser.add_argument('--rate', type=float, default=20.0, help='control rate in Hz')
    parser.add_argument('--image-size', type=int, nargs=2, default=[84, 84],
                        metavar=('H', 'W'), help='image height and width of the dataset')
    parser.add_argument('--min-steps', type=int, default=1,
                        help='skip bags with fewer steps than this')


def parse_cameras(entries):
    """``['agentview=agentview/image_raw']`` -> ``{'agentview': 'agentview/image_raw'}``."""
    cameras = {}
    for entry in entries:
        name, sep, topic = entry.partition('=')
        if not sep or not name.strip() or not topic.strip():
            raise CommandError(f'--camera {entry!r} must look like NAME=TOPIC, e.g. '
                               f'agentview=agentview/image_raw')
        if name.strip() in cameras:
            raise CommandError(f'camera {name.strip()!r} given twice; give each camera once')
        cameras[name.strip()] = topic.strip()
    return cameras


def run(args) -> int:
    """Convert the bags and print a JSON summary."""
    check_positive(args.rate, '--rate', 'the control rate in Hz, e.g. 20')
    check_range(args.min_steps, '--min-steps', low=1)
    check_range(min(args.image_size), '--image-size', low=1)
    cameras = parse_cameras(args.camera)
    for bag in args.bags:
        check_bag(bag)  # BagError: missing, or not a rosbag2 bag
    check_out_path(args.out, '--out')
    from sparse_policy_node.bags.demos import BagLayout
    from sparse_policy_node.bags.demos import bags_to_dataset
    from sparse_policy_node.bags.rosbag_io import BagError
    from sparse_policy_node.ros.conversions import ConversionError
    try:
        layout = BagLayout(cameras=cameras, lowdim_map=tuple(args.lowdim),
                           action_topic=args.action_topic, rate_hz=args.rate,
                           image_size=tuple(args.image_size))
        summary = bags_to_dataset(args.bags, args.out, layout, min_steps=args.min_steps)
    except (BagError, ConversionError) as exc:
        if os.path.exists(args.out):
            os.remove(args.out)  # no half-written dataset
        raise SystemExit(f'dataset-from-bag: {exc}') from exc
    if not summary['demos']:
        raise SystemExit(f'dataset-from-bag: no bag had --min-steps={args.min_steps} steps')
    print(json.dumps(summary))
    return 0
