"""rosbag2 recording, replay and conversion to demonstrations (outside the pure-torch core).

Bags are read and written with ``rosbags`` (pure Python, no ROS distribution needed); only
the recorder and the replayer need rclpy.
"""
