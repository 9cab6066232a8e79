"""Scripted state-based experts producing 7-D OSC_POSE delta actions in [-1, 1].

Each expert reads object poses from the simulator and walks through a short list of phases
(approach, descend, grasp, carry, place). Per-episode variation comes from a seeded generator:
approach heights, speeds, grasp offsets, closing durations and small action noise change, so
demonstrations are not all the same trajectory. Actions are (dx, dy, dz, rx, ry, rz, gripper),
where a position unit is 5 cm of end-effector motion per step (robosuite's default Panda
controller) and gripper +1 closes.
"""

from typing import Optional

import numpy as np
from sparse_policy_node.sim.robosuite_env import RobosuiteEnv

POS_SCALE = 0.05  # metres per unit action (controller output_max)
ROT_SCALE = 0.5  # radians per unit action
OPEN, CLOSE = -1.0, 1.0


def quat_to_mat(quat_xyzw: np.ndarray) -> np.ndarray:
    """Return the (3, 3) rotation matrix of an xyzw quaternion."""
    x, y, z, w = np.asarray(quat_xyzw, dtype=np.float64) / np.linalg.norm(quat_xyzw)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def wrap_angle(angle: float, period: float = 2 * np.pi) -> float:
    """Wrap ``angle`` into [-period / 2, period / 2)."""
    return (angle + period / 2) % period - period / 2


class ScriptedExpert:
    """Base class: phase bookkeeping, proportional moves and seeded noise."""

    def __init__(self, rng: Optional[np.random.Generator] = None):
        self.rng = rng if rng is not None else np.random.default_rng()
        self.reset()

    def reset(self, rng: Optional[np.random.Generator] = None) -> None:
        """Start a new episode; draw this episode's variation from ``rng``."""
        if rng is not None:
            self.rng = rng
        self.phase = 0
        self.phase_steps = 0
        self.speed = self.rng.uniform(0.5, 0.8)
        self.noise = self.rng.uniform(0.02, 0.08)
        self.sample_episode()

    def sample_episode(self) -> None:
        """Draw per-episode parameters (subclasses)."""

    def next_phase(self) -> None:
        """Advance to the next phase."""
        self.phase += 1
        self.phase_steps = 0

    def move(self, eef: np.ndarray, target: np.ndarray, gripper: float,
             rot: Optional[np.ndarray] = None, speed: Optional[float] = None) -> np.ndarray:
        """Proportional step towards ``target`` with the gripper command and noise."""
        speed = self.speed if speed is None else speed
        delta = (target - eef) / POS_SCALE
        norm = np.linalg.norm(delta)
        if norm > speed:
            delta *= speed / norm
        action = np.zeros(7)
        action[:3] = delta + self.rng.normal(0.0, self.noise, 3)
        if rot is not None:
            action[3:6] = rot
        action[6] = gripper
        return np.clip(action, -1.0, 1.0)

    def act(self, env: RobosuiteEnv) -> np.ndarray:
        """Return the next action for ``env`` (subclasses)."""
        raise NotImplementedError

    def __call__(self, env: RobosuiteEnv) -> np.ndarray:
        """Return the next action and count the step within the current phase."""
        phase = self.phase
        action = self.act(env)
        if self.phase == phase:
            self.phase_steps += 1
        return action


def reached(eef: np.ndarray, target: np.ndarray, tol: float) -> bool:
    """Return True when ``eef`` is within ``tol`` metres of ``target``."""
    return bool(np.linalg.norm(eef - target) < tol)


class PickExpert(ScriptedExpert):
    """Hover above the object, descend, close, lift: the grasp shared by every task."""

    lift_height = 0.12

    def sample_episode(self) -> None:
        """Draw hover height, grasp depth and offsets, closing time."""
        self.hover = self.rng.uniform(0.06, 0.12)
        self.grasp_offset = np.append(self.rng.uniform(-0.006, 0.006, 2),
                                      self.rng.uniform(-0.008, 0.0))
        self.close_steps = int(self.rng.integers(8, 13))

    def grasp_target(self, env: RobosuiteEnv) -> np.ndarray:
        """(3,) end-effector position that grasps the object."""
        return env.object_pos() + self.grasp_offset

    def rotation(self, env: RobosuiteEnv) -> Optional[np.ndarray]:
        """Rotation action during the grasp phases (None keeps the orientation)."""
        return None

    def pick(self, env: RobosuiteEnv) -> Optional[np.ndarray]:
        """Run phases 0..3; return None once the object is lifted."""
        eef = env.raw['robot0_eef_pos']
        grasp = self.grasp_target(env)
        above = grasp + np.array([0.0, 0.0, self.hover])
        rot = self.rotation(env)
        if self.phase == 0:
            if reached(eef, above, 0.015) and (rot is None or np.abs(rot).max() < 0.05):
                self.next_phase()
            return self.move(eef, above, OPEN, rot)
        if self.phase == 1:
            if reached(eef, grasp, 0.008) or self.phase_steps > 60:
                self.next_phase()
            return self.move(eef, grasp, OPEN, rot, speed=min(self.speed, 0.5))
        if self.phase == 2:
            if self.phase_steps >= self.close_steps:
                self.next_phase()
            return self.move(eef, grasp, CLOSE, rot)
        if self.phase == 3:
            if self.phase_steps == 0:
                # The object rises with the hand, so the lift target is fixed once.
                self.lift_target = eef + np.array([0.0, 0.0, self.lift_height])
            if eef[2] > self.lift_target[2] - 0.02:
                self.next_phase()
            return self.move(eef, self.lift_target, CLOSE, speed=min(self.speed, 0.6))
        return None


class LiftExpert(PickExpert):
    """Lift the cube: pick it and keep raising it until the episode ends."""

    def act(self, env: RobosuiteEnv) -> np.ndarray:
        """Return the next Lift action."""
        action = self.pick(env)
        if action is None:
            eef = env.raw['robot0_eef_pos']
            action = self.move(eef, eef + np.array([0.0, 0.0, 0.05]), CLOSE)
        return action


class CanExpert(PickExpert):
    """PickPlaceCan: pick the can, carry it over its bin, lower, release and retreat."""

    lift_height = 0.2

    def sample_episode(self) -> None:
        """Draw grasp parameters and the drop point inside the target bin."""
        super().sample_episode()
        self.grasp_offset[2] = self.rng.uniform(-0.005, 0.01)
        self.drop_offset = self.rng.uniform(-0.03, 0.03, 2)
        self.release_steps = int(self.rng.integers(5, 9))

    def act(self, env: RobosuiteEnv) -> np.ndarray:
        """Return the next PickPlaceCan action."""
        action = self.pick(env)
        if action is not None:
            return action
        inner = env.env
        eef = env.raw['robot0_eef_pos']
        bin_xy = inner.target_bin_placements[inner.object_to_id['can']][:2] + self.drop_offset
        carry_z = inner.bin2_pos[2] + 0.25
        if self.phase == 4:
            target = np.append(bin_xy, carry_z)
            if reached(eef[:2], target[:2], 0.015):
                self.next_phase()
            return self.move(eef, target, CLOSE)
        if self.phase == 5:
            target = np.append(bin_xy, inner.bin2_pos[2] + 0.12)
            if reached(eef, target, 0.015):
                self.next_phase()
            return self.move(eef, target, CLOSE)
        if self.phase == 6:
            if self.phase_steps >= self.release_steps:
                self.next_phase()
            return self.move(eef, eef, OPEN)
        return self.move(eef, np.append(bin_xy, carry_z + 0.05), OPEN)


class SquareExpert(PickExpert):
    """NutAssemblySquare: grasp the nut's handle, align the nut with the peg, lower, release."""

    lift_height = 0.15

    def sample_episode(self) -> None:
        """Draw grasp parameters."""
        super().sample_episode()
        self.grasp_offset = np.append(self.rng.uniform(-0.004, 0.004, 2),
                                      self.rng.uniform(-0.004, 0.004))
        self.release_steps = int(self.rng.integers(5, 9))

    def handle(self, env: RobosuiteEnv) -> np.ndarray:
        """(3,) world position of the nut's handle."""
        nut = env.env.nuts[env.env.nut_id]
        site = env.sim.model.site_name2id(nut.important_sites['handle'])
        return np.array(env.sim.data.site_xpos[site])

    def grasp_target(self, env: RobosuiteEnv) -> np.ndarray:
        """(3,) handle position plus this episode's offset."""
        return self.handle(env) + self.grasp_offset

    def yaw_error(self, env: RobosuiteEnv, desired: float) -> float:
        """Yaw (rad) that turns the finger axis onto ``desired`` (modulo pi, finger symmetry)."""
        fingers = quat_to_mat(env.raw['robot0_eef_quat'])[:, 1]
        return wrap_angle(desired - np.arctan2(fingers[1], fingers[0]), np.pi)

    def rotation(self, env: RobosuiteEnv) -> np.ndarray:
        """Turn so the fingers close across the handle bar."""
        bar = self.handle(env) - env.object_pos()
        # Fingers must close along the bar's width: perpendicular to the handle direction.
        desired = np.arctan2(bar[1], bar[0]) + np.pi / 2
        yaw = self.yaw_error(env, desired)
        return np.array([0.0, 0.0, np.clip(yaw / ROT_SCALE, -0.6, 0.6)])

    def nut_yaw(self, env: RobosuiteEnv) -> float:
        """Yaw of the nut's body frame."""
        x_axis = quat_to_mat(env.raw['SquareNut_quat'])[:, 0]
        return np.arctan2(x_axis[1], x_axis[0])

    def act(self, env: RobosuiteEnv) -> np.ndarray:
        """Return the next NutAssemblySquare action."""
        action = self.pick(env)
        if action is not None:
            return action
        inner = env.env
        eef = env.raw['robot0_eef_pos']
        nut = env.object_pos()
        peg = np.array(inner.sim.data.body_xpos[inner.peg1_body_id])
        # The square peg only accepts the nut at multiples of 90 degrees of yaw.
        yaw = wrap_angle(-self.nut_yaw(env), np.pi / 2)
        rot = np.array([0.0, 0.0, np.clip(yaw / ROT_SCALE, -0.6, 0.6)])
        target_xy = eef[:2] + (peg[:2] - nut[:2])
        carry_z = inner.table_offset[2] + 0.2
        if self.phase == 4:
            target = np.append(target_xy, carry_z)
            if reached(nut[:2], peg[:2], 0.006) and abs(yaw) < 0.03:
                self.next_phase()
            return self.move(eef, target, CLOSE, rot, speed=0.4)
        if self.phase == 5:
            target = np.append(target_xy, eef[2] - 0.03)
            if nut[2] < inner.table_offset[2] + 0.06 or self.phase_steps > 60:
                self.next_phase()
            return self.move(eef, target, CLOSE, rot, speed=0.3)
        if self.phase == 6:
            if self.phase_steps >= self.release_steps:
                self.next_phase()
            return self.move(eef, eef, OPEN)
        return self.move(eef, eef + np.array([0.0, 0.0, 0.05]), OPEN)


EXPERTS = {'lift': LiftExpert, 'can': CanExpert, 'square': SquareExpert}


def make_expert(task: str, seed: Optional[int] = None) -> ScriptedExpert:
    """Create the scripted expert of ``task`` with a generator seeded by ``seed``."""
    if task not in EXPERTS:
        raise ValueError(f'no scripted expert for task {task!r}; valid tasks: {sorted(EXPERTS)}')
    return EXPERTS[task](np.random.default_rng(seed))


def rollout(env: RobosuiteEnv, expert: ScriptedExpert, seed: int, record: bool = True):
    """Run one expert episode from ``env.reset(seed)``.

    Returns:
        ``(success, obs_list, actions)``: per-step observations (before each action) and
        (T, 7) actions; the lists are empty when ``record`` is False.
    """
    obs = env.reset(seed)
    expert.reset(np.random.default_rng([seed, 7]))
    observations, actions = [], []
    done, info = False, {'success': False}
    while not done:
        action = expert(env)
        if record:
            observations.append(obs)
            actions.append(action.astype(np.float32))
        obs, _, done, info = env.step(action)
    return bool(info['success']), observations, np.array(actions, dtype=np.float32)
