"""Key strings shared by the dataset, the simulator wrapper, the nodes and the tests."""

ACTION = 'action'
IMAGE_SUFFIX = '_image'
# robosuite's object-state vector (object pose and its offset to the gripper).
OBJECT = 'object'


def image_key(camera: str) -> str:
    """Observation key of a camera's images (robomimic / robosuite naming)."""
    return f'{camera}{IMAGE_SUFFIX}'
