"""Frame-encoder calls per second with a fast camera: the policy node on the wall clock.

A fake driver publishes a camera at ``--camera-hz`` (default 30, stamped now minus
``--camera-lag-ms``) and the gripper joints and end-effector pose at ``--joint-hz``; the node
serves chunks from them at its control rate. Every call of the engine's ``encode_frame`` (the
frame-encoder thread, ahead of the chunks) is counted, and the frames the chunks encoded
themselves::

    python -m sparse_policy_node.tools.bench_frames --seconds 5 [--model models/lift]

Without ``--model`` a seeded tiny model (4-action chunks) is used.
"""

import argparse
import json
import tempfile
import time


def run(seconds: float = 5.0, camera_hz: float = 30.0, joint_hz: float = 100.0,
        camera_lag_ms: float = 0.0, model_dir: str = '', overrides=None) -> dict:
    """Drive a policy node for ``seconds`` of wall time; return the encoder counts."""
    import rclpy
    from rclpy.parameter import Parameter
    from sparse_policy_node.ros.policy_node import PolicyNode
    from sparse_policy_node.ros.testing import FakeRobot
    from sparse_policy_node.ros.testing import isolate_ros
    from sparse_policy_node.ros.testing import save_tiny_model
    from sparse_policy_node.ros.testing import Spinner
    from sparse_policy_node.ros.testing import TINY_PARAMS

    tmp = tempfile.mkdtemp(prefix='bench_frames_')
    isolate_ros(tmp)
    context = rclpy.Context()
    rclpy.init(context=context)
    try:
        values = dict(TINY_PARAMS) if not model_dir else {'num_threads': 1}
        values.update(model_dir=model_dir or save_tiny_model(f'{tmp}/model'),
                      max_obs_age_s=2.0)
        values.update(overrides or {})
        node = PolicyNode(context=context, parameter_overrides=[
            Parameter(k, value=v) for k, v in values.items()])
        size = tuple(node.engine.policy.config.obs.vision.image_size)
        robot = FakeRobot(context=context, image_size=size)
        calls = []
        encode = node.engine.encode_frame

        def counted(*args, **kwargs):
            calls.append(time.monotonic())
            return encode(*args, **kwargs)
        node.engine.encode_frame = counted
        with Spinner(context, node, robot):
            deadline = time.monotonic() + 10.0
            while not (robot.image_pub.get_subscription_count()
                       and node.chunk_pub.get_subscription_count()) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            start = time.monotonic()
            next_cam = next_joint = start
            frames = 0
            while time.monotonic() - start < seconds:
                now = time.monotonic()
                stamp = time.time_ns()
                if now >= next_cam:
                    robot.publish_image(stamp - int(camera_lag_ms * 1e6))
                    frames += 1
                    next_cam += 1.0 / camera_hz
                if now >= next_joint:
                    robot.publish_joints(stamp)
                    robot.publish_pose(stamp)
                    next_joint += 1.0 / joint_hz
                time.sleep(max(0.0, min(next_cam, next_joint) - time.monotonic()))
            elapsed = time.monotonic() - start
            time.sleep(0.3)
        counters = dict(node.stats.counters)
        node.close()
        node.destroy_node()
        robot.destroy_node()
    finally:
        context.try_shutdown()
    ahead = sum(1 for t in calls if start <= t <= start + elapsed)
    return {'seconds': round(elapsed, 2), 'camera_frames': frames,
            'camera_hz': round(frames / elapsed, 1), 'chunks': counters.get('chunks', 0),
            'encoder_calls_ahead': ahead,
            'encoder_calls_ahead_per_s': round(ahead / elapsed, 1),
            'frames_encoded_in_chunks': counters.get('frames_encoded_in_chunks', 0),
            'frames_skipped_off_grid': counters.get('frames_skipped_off_grid', 0)}


def main(argv=None) -> int:
    """Run the bench and print its counts as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seconds', type=float, default=5.0)
    parser.add_argument('--camera-hz', type=float, default=30.0)
    parser.add_argument('--joint-hz', type=float, default=100.0)
    parser.add_argument('--camera-lag-ms', type=float, default=0.0)
    parser.add_argument('--model', default='', help='model directory (default: tiny model)')
    args = parser.parse_args(argv)
    print(json.dumps(run(args.seconds, args.camera_hz, args.joint_hz, args.camera_lag_ms,
                         args.model)))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
