"""robosuite tasks behind a small, seedable wrapper with policy-ready observations.

Observations follow the robomimic naming the policy expects: ``f'{camera}_image'`` as
(3, H, W) uint8 upright images, ``robot0_eef_pos`` (3), ``robot0_eef_quat`` (4, xyzw),
``robot0_gripper_qpos`` (2) and optionally ``object`` (robosuite's ``object-state``).
Rendering is offscreen; on CPU-only machines set ``MUJOCO_GL=egl`` before importing.
"""

from dataclasses import dataclass
import logging
import os
from typing import Dict
from typing import Optional
from typing import Sequence
from typing import Tuple

import numpy as np
from sparse_policy_node.core import keys

os.environ.setdefault('MUJOCO_GL', 'egl')

LOWDIM_KEYS = ('robot0_eef_pos', 'robot0_eef_quat', 'robot0_gripper_qpos')
OBJECT_KEY = 'object'
ACTION_DIM = 7
CONTROL_FREQ = 20
# The model (object sizes, materials) is built once at make() time from this seed, so every
# process sees the same scene; per-episode variation comes from reset(seed).
BUILD_SEED = 0


@dataclass(frozen=True)
class TaskSpec:
    """One robosuite task.

    Args:
        env_name: robosuite environment class name.
        max_steps: episode length limit at 20 Hz (robomimic's horizon).
        object_name: name of the manipulated object's observables (``f'{name}_pos'``).
    """

    env_name: str
    max_steps: int
    object_name: str


TASKS = {
    'lift': TaskSpec('Lift', 400, 'cube'),
    'can': TaskSpec('PickPlaceCan', 400, 'Can'),
    'square': TaskSpec('NutAssemblySquare', 400, 'SquareNut'),
}


def obs_from_robosuite(raw: Dict[str, np.ndarray], cameras: Sequence[str],
                       include_object: bool = False) -> Dict[str, np.ndarray]:
    """Map a robosuite observation dict to the policy's keys and layouts.

    robosuite renders with the OpenGL convention (row 0 is the bottom of the image), so images
    are flipped vertically to be upright, then moved to channel-first.

    Args:
        raw: robosuite observation; images are (H, W, 3) uint8, bottom row first.
        cameras: camera names whose ``f'{camera}_image'`` keys are kept.
        include_object: also return ``object`` (robosuite's ``object-state``).

    Returns:
        ``f'{camera}_image'`` (3, H, W) uint8 upright; ``robot0_eef_pos`` (3),
        ``robot0_eef_quat`` (4), ``robot0_gripper_qpos`` (2) float32; ``object`` (D,) float32.
    """
    obs = {}
    for cam in cameras:
        image = np.asarray(raw[keys.image_key(cam)])
        obs[keys.image_key(cam)] = np.ascontiguousarray(
            image[::-1].transpose(2, 0, 1), dtype=np.uint8)  # (3, H, W)
    for key in LOWDIM_KEYS:
        obs[key] = np.asarray(raw[key], dtype=np.float32)
    if include_object:
        obs[OBJECT_KEY] = np.asarray(raw['object-state'], dtype=np.float32)
    return obs


# robosuite's start-up messages that say nothing about this project's use of it: a private
# macro file is optional, and robosuite_models / mink serve robots and IK this project does
# not use. The controller configuration it loads is always the default Panda OSC.
HARMLESS_ROBOSUITE_MESSAGES = (
    'No private macro file found', 'It is recommended to use a private macro file',
    'To setup, run:', 'Could not import robosuite_models', 'Could not load the mink-based',
    'Loading controller configuration from')


def _not_harmless(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(HARMLESS_ROBOSUITE_MESSAGES)


def quiet_robosuite() -> None:
    """Drop robosuite's known harmless start-up messages (call before importing it)."""
    logger = logging.getLogger('robosuite_logs')
    if _not_harmless not in logger.filters:
        logger.addFilter(_not_harmless)  # a callable filter (Python >= 3.2)


class RobosuiteEnv:
    """A robosuite environment with seeded resets and policy-layout observations."""

    def __init__(self, task: str, cameras: Sequence[str] = ('agentview',),
                 image_size: Tuple[int, int] = (84, 84), include_object: bool = False,
                 max_steps: Optional[int] = None):
        if task not in TASKS:
            raise ValueError(f'unknown task {task!r}; valid tasks: {sorted(TASKS)}')
        quiet_robosuite()
        import robosuite
        self.task = task
        self.spec = TASKS[task]
        self.cameras = tuple(cameras)
        self.image_size = tuple(image_size)
        self.include_object = include_object
        self.max_steps = max_steps or self.spec.max_steps
        self.env_kwargs = {
            'env_name': self.spec.env_name, 'robots': 'Panda', 'control_freq': CONTROL_FREQ,
            'has_renderer': False, 'has_offscreen_renderer': bool(self.cameras),
            'use_camera_obs': bool(self.cameras), 'use_object_obs': True,
            'camera_names': list(self.cameras) or 'agentview',
            'camera_heights': self.image_size[0], 'camera_widths': self.image_size[1],
            'reward_shaping': False, 'ignore_done': True, 'hard_reset': False,
        }
        self.env = robosuite.make(seed=BUILD_SEED, **self.env_kwargs)
        self.raw = None
        self.steps = 0

    @property
    def sim(self):
        """The MuJoCo simulation (object poses for scripted experts)."""
        return self.env.sim

    def env_args(self) -> dict:
        """robomimic-style ``env_args`` describing this environment (stored in datasets)."""
        kwargs = {k: v for k, v in self.env_kwargs.items() if k != 'env_name'}
        return {'env_name': self.spec.env_name, 'type': 1, 'env_kwargs': kwargs,
                'task': self.task}

    def reset(self, seed: int) -> Dict[str, np.ndarray]:
        """Reset to the initial state determined by ``seed`` and return the observation."""
        # Robots, placement samplers and objects hold references to the same generator, so
        # its state is replaced in place rather than swapping in a new generator.
        self.env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        self.raw = self.env.reset()
        self.steps = 0
        return self.observation()

    def observation(self) -> Dict[str, np.ndarray]:
        """Return the latest observation in policy layout."""
        return obs_from_robosuite(self.raw, self.cameras, self.include_object)

    def step(self, action: np.ndarray):
        """Apply a 7-D action in [-1, 1] (OSC pose delta + gripper).

        Returns:
            ``(obs, reward, done, info)``; ``done`` is True on success or at ``max_steps``,
            ``info['success']`` says which.
        """
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(ACTION_DIM), -1.0, 1.0)
        self.raw, reward, _, info = self.env.step(action)
        self.steps += 1
        success = self.is_success()
        info = dict(info, success=success)
        return self.observation(), float(reward), success or self.steps >= self.max_steps, info

    def is_success(self) -> bool:
        """Return True when the task's success condition holds."""
        return bool(self.env._check_success())

    def object_pos(self) -> np.ndarray:
        """(3,) world position of the manipulated object."""
        return np.array(self.raw[f'{self.spec.object_name}_pos'], dtype=np.float64)

    def close(self) -> None:
        """Release the renderer."""
        self.env.close()


def make_env(task: str, cameras: Sequence[str] = ('agentview',),
             image_size: Tuple[int, int] = (84, 84), seed: Optional[int] = None,
             include_object: bool = False, max_steps: Optional[int] = None) -> RobosuiteEnv:
    """Create a :class:`RobosuiteEnv`, reset to ``seed`` when one is given.

    Args:
        task: one of :data:`TASKS` (``'lift'``, ``'can'``, ``'square'``).
        cameras: camera names; empty for state-only observations (much faster).
        image_size: (height, width) of rendered images.
        seed: optional seed of a first reset.
        include_object: add the ``object`` state vector to observations.
        max_steps: episode limit; the task's default when None.
    """
    env = RobosuiteEnv(task, cameras, image_size, include_object, max_steps)
    if seed is not None:
        env.reset(seed)
    return env
