"""Simulator wrapper: observation mapping, image orientation, seeded resets (real robosuite)."""

import numpy as np
import pytest
from sparse_policy_node.sim.robosuite_env import HARMLESS_ROBOSUITE_MESSAGES
from sparse_policy_node.sim.robosuite_env import obs_from_robosuite
from sparse_policy_node.sim.robosuite_env import TASKS


def raw_obs(height=6, width=4):
    """Return a robosuite-like raw observation whose image row i has value i."""
    rows = np.arange(height, dtype=np.uint8)[:, None, None]
    image = np.broadcast_to(rows, (height, width, 3)).copy()
    image[..., 1] += 100  # channel 1 tells channels apart
    return {'agentview_image': image,
            'robot0_eef_pos': np.array([0.1, 0.2, 0.3]),
            'robot0_eef_quat': np.array([0.0, 0.0, 0.0, 1.0]),
            'robot0_gripper_qpos': np.array([0.02, -0.02]),
            'object-state': np.arange(10, dtype=np.float64),
            'robot0_joint_pos': np.zeros(7)}


def test_obs_mapping_flips_rows_and_moves_channels_first():
    obs = obs_from_robosuite(raw_obs(), ['agentview'])
    image = obs['agentview_image']
    assert image.shape == (3, 6, 4) and image.dtype == np.uint8
    # OpenGL row 0 is the bottom of the picture: after the flip it must be the last row.
    np.testing.assert_array_equal(image[0, :, 0], [5, 4, 3, 2, 1, 0])
    np.testing.assert_array_equal(image[1, :, 0], [105, 104, 103, 102, 101, 100])
    assert image.flags['C_CONTIGUOUS']


def test_obs_mapping_keys_shapes_and_object_state():
    obs = obs_from_robosuite(raw_obs(), ['agentview'])
    assert sorted(obs) == ['agentview_image', 'robot0_eef_pos', 'robot0_eef_quat',
                           'robot0_gripper_qpos']
    assert obs['robot0_eef_pos'].shape == (3,) and obs['robot0_eef_pos'].dtype == np.float32
    assert obs['robot0_eef_quat'].shape == (4,)
    assert obs['robot0_gripper_qpos'].shape == (2,)
    with_object = obs_from_robosuite(raw_obs(), [], include_object=True)
    assert 'agentview_image' not in with_object
    np.testing.assert_array_equal(with_object['object'], np.arange(10))


def test_task_registry_names_robosuite_envs():
    assert {k: v.env_name for k, v in TASKS.items()} == {
        'lift': 'Lift', 'can': 'PickPlaceCan', 'square': 'NutAssemblySquare'}
    assert all(v.max_steps > 0 for v in TASKS.values())


@pytest.fixture(scope='module')
def lift_env():
    pytest.importorskip('robosuite')
    from sparse_policy_node.sim.robosuite_env import make_env
    env = make_env('lift', cameras=('agentview',), image_size=(32, 32), include_object=True)
    yield env
    env.close()


@pytest.mark.sim
def test_real_lift_observation_is_upright_and_policy_shaped(lift_env):
    obs = lift_env.reset(0)
    image = obs['agentview_image']
    assert image.shape == (3, 32, 32) and image.dtype == np.uint8
    assert obs['robot0_eef_pos'].shape == (3,) and obs['robot0_gripper_qpos'].shape == (2,)
    assert obs['robot0_eef_quat'].shape == (4,) and obs['object'].shape == (10,)
    # agentview: the bright table top fills the bottom of an upright picture.
    quarter = image.shape[1] // 4
    assert image[:, -quarter:].mean() > image[:, :quarter].mean() + 50


@pytest.mark.sim
def test_real_reset_seed_is_reproducible_and_step_reports_success(lift_env):
    first = lift_env.reset(3)
    cube = lift_env.object_pos()
    lift_env.reset(4)
    assert not np.allclose(lift_env.object_pos(), cube)
    again = lift_env.reset(3)
    np.testing.assert_allclose(lift_env.object_pos(), cube)
    np.testing.assert_allclose(again['robot0_eef_pos'], first['robot0_eef_pos'])
    np.testing.assert_array_equal(again['agentview_image'], first['agentview_image'])
    obs, reward, done, info = lift_env.step(np.zeros(7))
    assert info['success'] is False and done is False and lift_env.steps == 1
    assert obs['agentview_image'].shape == (3, 32, 32)


@pytest.mark.sim
def test_robosuite_start_up_prints_none_of_its_known_harmless_messages():
    import subprocess
    import sys
    pytest.importorskip('robosuite')
    code = ('from sparse_policy_node.sim.robosuite_env import make_env\n'
            "make_env('lift', cameras=(), seed=0).close()\n"
            'import logging\n'
            "logging.getLogger('robosuite_logs').warning('a real warning still shows')\n")
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout + done.stderr
    assert 'a real warning still shows' in out
    assert not [m for m in HARMLESS_ROBOSUITE_MESSAGES if m in out], out[-2000:]
