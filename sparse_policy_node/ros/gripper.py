"""Gripper commands for ros2_control: the model's value mapped to what a controller takes.

Pure python (no rclpy). The model's gripper dimension is in robosuite units (-1 open,
+1 closed). ``output.gripper_mapping``:

- ``none``: the value as is (std_msgs/Float64 in robosuite units, the default);
- ``threshold``: ``output.gripper_closed`` when the value is above
  ``output.gripper_threshold``, else ``output.gripper_open`` (a binary gripper);
- ``linear``: -1 maps to ``output.gripper_open`` and +1 to ``output.gripper_closed``
  (e.g. a finger width in m for a position controller).

``output.gripper_msg``: ``float64`` (std_msgs/Float64) or ``multi_array``
(std_msgs/Float64MultiArray with one value, as ros2_control's forward command and position
controllers take). The control_msgs gripper action is not supported (not installable here).
"""

MAPPINGS = ('none', 'threshold', 'linear')
MESSAGES = ('float64', 'multi_array')


def check(mapping: str, message: str, open_value: float, closed_value: float,
          threshold: float) -> None:
    """Raise ValueError naming the parameter when a gripper setting is invalid."""
    if mapping not in MAPPINGS:
        raise ValueError(f'output.gripper_mapping must be one of {MAPPINGS}, got {mapping!r}')
    if message not in MESSAGES:
        raise ValueError(f'output.gripper_msg must be one of {MESSAGES}, got {message!r}')
    if mapping != 'none' and open_value == closed_value:
        raise ValueError('output.gripper_open and output.gripper_closed must differ')
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f'output.gripper_threshold must be in [-1, 1], got {threshold}')


def command(value: float, mapping: str, open_value: float, closed_value: float,
            threshold: float) -> float:
    """Map the model's gripper value (-1 open .. +1 closed) to the controller's command."""
    v = float(value)
    if mapping == 'threshold':
        return float(closed_value if v > threshold else open_value)
    if mapping == 'linear':
        v = min(max(v, -1.0), 1.0)
        return float(open_value + (v + 1.0) / 2.0 * (closed_value - open_value))
    return v
