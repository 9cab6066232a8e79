"""Model card: what a model's actions and inputs mean, stored as ``model_card.json``.

The card is what a robot integrator needs and the weights do not say: the action space
(``delta_eef`` with its scaling, ``abs_eef_pose`` with its rotation format, or ``joint_pos``),
the frame actions and poses are expressed in, the control rate, the gripper's semantics, how
camera images were preprocessed, and every input key with its unit. ``save_policy`` writes a
card derived from the config and the training metadata (``train-policy``); ``import-dp``
writes one from the Diffusion Policy config; ``sparse-policy model-card DIR --write`` (re)writes
it for an existing model directory. The policy node checks its parameters against it.

Pure Python: no torch, no ROS.
"""

import json
import os
from typing import List
from typing import Optional

CARD_FILE = 'model_card.json'
CARD_VERSION = 1
ACTION_SPACES = ('delta_eef', 'abs_eef_pose', 'joint_pos')
ROTATION_FORMATS = ('axis_angle', 'quat_xyzw', 'rotation_6d')
ROTATION_DIMS = {'axis_angle': 3, 'quat_xyzw': 4, 'rotation_6d': 6}
# What a delta is relative to: 'measured' (the pose measured at its step, as robosuite's OSC
# sets goal = current pose + delta; the controller's lag is part of what the model learned)
# or 'integrated' (the previous step's target: deltas sum up into a trajectory).
DELTA_REFERENCES = ('measured', 'integrated')

# robosuite 1.5 OSC_POSE (delta input): an input of 1 moves 0.05 m / rotates 0.5 rad per step;
# the last dimension is the gripper, -1 open and +1 closed.
ROBOSUITE_POSITION_SCALE = 0.05
ROBOSUITE_ROTATION_SCALE = 0.5
ROBOSUITE_DELTA_NAMES = ['dx', 'dy', 'dz', 'dax', 'day', 'daz', 'gripper']

# Units of the low-dim keys this package and robomimic use.
KNOWN_INPUTS = {
    'robot0_eef_pos': ('m', 'end-effector position'),
    'robot0_eef_quat': ('unit quaternion x, y, z, w', 'end-effector orientation'),
    'robot0_gripper_qpos': ('m', 'finger joint positions'),
    'robot0_joint_pos': ('rad', 'arm joint positions'),
    'robot0_eef_pos_vel': ('m/s', 'end-effector linear velocity'),
    'object': ('m; unit quaternions x, y, z, w',
               "robosuite's object-state: the object's world pose and its pose relative to "
               'the end effector (PickPlaceCan: position 3, quaternion 4, relative position '
               '3, relative quaternion 4); on a real robot, an object tracker'),
}


class ModelCardError(ValueError):
    """A model card is malformed or contradicts the model."""


def _inputs(config, frame: str) -> dict:
    out = {}
    for key, dim in config.obs.lowdim:
        unit, meaning = KNOWN_INPUTS.get(key, ('unknown', 'as in the training data'))
        entry = {'dim': int(dim), 'unit': unit, 'meaning': meaning}
        if key.endswith(('_pos', '_quat')) and 'eef' in key:
            entry['frame'] = frame
        out[key] = entry
    return out


def _cameras(config, flip_vertical: bool, resize: str, resize_mode: str) -> dict:
    vision = config.obs.vision
    return {cam: {'observation_key': f'{cam}_image', 'encoding': 'rgb8',
                  'image_size': list(vision.image_size),
                  'resize': resize, 'resize_mode': resize_mode,
                  'train_crop': list(vision.crop_size) if vision.crop_size else None,
                  'inference_crop': 'centre' if vision.crop_size else None,
                  'flip_vertical': flip_vertical}
            for cam in vision.cameras}


def build_card(config, action_space: str, control_rate_hz: float, frame: str,
               names: Optional[List[str]] = None, gripper_index: Optional[int] = None,
               gripper_semantics: str = '', position_scale: Optional[float] = None,
               rotation_scale: Optional[float] = None, rotation_format: str = 'axis_angle',
               delta_reference: str = 'integrated',
               joint_names: Optional[List[str]] = None, flip_vertical: bool = False,
               resize: str = 'unknown', resize_mode: str = 'squash',
               source: str = '') -> dict:
    """Return a card for a policy config (see the module docstring for the fields)."""
    action_dim = int(config.transformer.action_dim)
    action = {'space': action_space, 'dim': action_dim,
              'names': list(names) if names else [f'a{i}' for i in range(action_dim)],
              'frame': frame,
              'gripper': None if gripper_index is None else {
                  'index': int(gripper_index), 'semantics': gripper_semantics}}
    if action_space == 'delta_eef':
        action.update(range=[-1.0, 1.0], rotation_format=rotation_format,
                      delta_reference=delta_reference,
                      scaling={'position_m_per_unit': position_scale,
                               'rotation_rad_per_unit': rotation_scale})
    elif action_space == 'abs_eef_pose':
        action.update(rotation_format=rotation_format, units={'position': 'm'})
    elif action_space == 'joint_pos':
        action.update(joint_names=list(joint_names or []), units={'position': 'rad'})
    card = {'card_version': CARD_VERSION, 'source': source, 'action': action,
            'control_rate_hz': float(control_rate_hz), 'frames': {'pose_frame': frame},
            'n_obs_steps': int(config.transformer.n_obs_steps),
            'n_action_steps': int(config.n_action_steps),
            'cameras': _cameras(config, flip_vertical, resize, resize_mode),
            'inputs': _inputs(config, frame)}
    check_card(card, config)
    return card


def robosuite_card(config, env_args: dict) -> dict:
    """Card of a policy trained on this package's robosuite demonstrations (OSC pose deltas).

    Images are flipped upright by the simulation layer before training, so a camera that
    delivers upright images needs no flip. Poses are robosuite's world-frame site poses.
    """
    kwargs = env_args.get('env_kwargs', {})
    return build_card(
        config, 'delta_eef', float(kwargs.get('control_freq', 20)), 'world',
        names=ROBOSUITE_DELTA_NAMES if config.transformer.action_dim == 7 else None,
        gripper_index=config.transformer.action_dim - 1,
        gripper_semantics='-1 open, +1 closed (command, not a position)',
        position_scale=ROBOSUITE_POSITION_SCALE, rotation_scale=ROBOSUITE_ROTATION_SCALE,
        resize='none: rendered at image_size (upright); other sizes: keep the aspect '
               'ratio', resize_mode='cover_crop', delta_reference='measured',
        source=f"robosuite {env_args.get('env_name', '?')} ({kwargs.get('robots', '?')}), "
               'OSC_POSE delta control')


def default_card(config, metadata: Optional[dict]) -> Optional[dict]:
    """Card derivable from a config and its training metadata, or None if unknown."""
    env_args = (metadata or {}).get('env_args')
    if env_args and config.transformer.action_dim == 7:
        return robosuite_card(config, env_args)
    return None


def check_card(card: dict, config=None) -> None:
    """Raise :class:`ModelCardError` when the card is malformed or contradicts ``config``."""
    try:
        action = card['action']
        space, dim = action['space'], int(action['dim'])
        rate = float(card['control_rate_hz'])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelCardError(f'model card lacks a field: {exc}') from exc
    if space not in ACTION_SPACES:
        raise ModelCardError(f'action.space must be one of {ACTION_SPACES}, got {space!r}')
    if rate <= 0:
        raise ModelCardError(f'control_rate_hz must be positive, got {rate}')
    if len(action.get('names', [])) != dim:
        raise ModelCardError(f"action.names has {len(action.get('names', []))} entries for "
                             f'{dim} dimensions')
    gripper = action.get('gripper')
    if gripper is not None and not 0 <= int(gripper['index']) < dim:
        raise ModelCardError(f"action.gripper.index {gripper['index']} outside 0..{dim - 1}")
    arm = dim - (gripper is not None)
    if space in ('delta_eef', 'abs_eef_pose'):
        fmt = action.get('rotation_format')
        if fmt not in ROTATION_FORMATS:
            raise ModelCardError(f'action.rotation_format must be one of {ROTATION_FORMATS}, '
                                 f'got {fmt!r}')
        if arm != 3 + ROTATION_DIMS[fmt]:
            raise ModelCardError(f'{space} with {fmt} needs {3 + ROTATION_DIMS[fmt]} arm '
                                 f'dimensions (+ gripper), the card has {arm}')
        if gripper is not None and int(gripper['index']) != dim - 1:
            raise ModelCardError('the gripper must be the last action dimension of an '
                                 'end-effector action')
    if space == 'delta_eef':
        if action.get('delta_reference', 'integrated') not in DELTA_REFERENCES:
            raise ModelCardError(f'action.delta_reference must be one of {DELTA_REFERENCES}, '
                                 f"got {action.get('delta_reference')!r}")
        scaling = action.get('scaling') or {}
        for key in ('position_m_per_unit', 'rotation_rad_per_unit'):
            if not isinstance(scaling.get(key), (int, float)) or scaling[key] <= 0:
                raise ModelCardError(f'delta_eef needs action.scaling.{key} > 0')
    if space == 'joint_pos' and action.get('joint_names') and \
            len(action['joint_names']) != arm:
        raise ModelCardError(f"action.joint_names has {len(action['joint_names'])} names for "
                             f'{arm} joint dimensions')
    if config is not None:
        if dim != config.transformer.action_dim:
            raise ModelCardError(f'the card says {dim} action dimensions, the model has '
                                 f'{config.transformer.action_dim}')
        cams = set(card.get('cameras', {}))
        if cams != set(config.obs.vision.cameras):
            raise ModelCardError(f'the card names cameras {sorted(cams)}, the model '
                                 f'{sorted(config.obs.vision.cameras)}')
        inputs = {k: int(v.get('dim', -1)) for k, v in card.get('inputs', {}).items()}
        if inputs != {k: int(d) for k, d in config.obs.lowdim}:
            raise ModelCardError(f'the card lists inputs {inputs}, the model '
                                 f'{dict(config.obs.lowdim)}')


def write_card(directory: str, card: dict) -> str:
    """Write ``card`` to ``directory/model_card.json``; return the path."""
    path = os.path.join(directory, CARD_FILE)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(card, f, indent=2)
        f.write('\n')
    os.replace(tmp, path)
    return path


def read_card(directory: str, config=None) -> Optional[dict]:
    """Return the checked card of a model directory, or None if it has none."""
    path = os.path.join(directory, CARD_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            card = json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelCardError(f'{path} cannot be read: {exc}') from exc
    if not isinstance(card, dict):
        raise ModelCardError(f'{path} is not a JSON object')
    check_card(card, config)
    return card
