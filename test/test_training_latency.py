"""``sparse-policy latency``: delay in control steps, the schedule, jerk split at boundaries."""

import numpy as np
import pytest
from sparse_policy_node.ros.execution import smoothness
from sparse_policy_node.training.latency import delay_steps
from sparse_policy_node.training.latency import drop_camera_frames
from sparse_policy_node.training.latency import point_path
from sparse_policy_node.training.latency import schedule
from sparse_policy_node.training.latency import summarize_point


def test_delay_is_rounded_up_to_whole_control_steps():
    assert [delay_steps(ms) for ms in (0, 50, 51, 100, 200, 300)] == [0, 1, 2, 2, 4, 6]


def test_schedule_is_lockstep_at_zero_latency_and_back_to_back_otherwise():
    n = 8
    assert schedule(0, n) == 0
    assert [schedule(d, n) for d in (1, 2, 4, 6)] == [7, 6, 4, 6]


def test_differences_are_split_at_chunk_boundaries_and_holds_are_left_out():
    # Chunk 0 moves along x at a constant speed, chunk 1 jumps; a hold (-1) at the end.
    a = np.zeros((7, 7))
    a[:4, 0] = [0.0, 1.0, 2.0, 3.0]
    a[4:6, 0] = [10.0, 11.0]
    a[:, 6] = [-1, -1, 1, 1, 1, 1, 1]      # the gripper flip is not counted
    source = [0, 0, 0, 0, 1, 1, -1]
    out = smoothness(a, source)
    assert out['da_within'] == [1.0, 1.0, 1.0, 1.0]
    assert out['da_boundary'] == [7.0]
    assert out['d2a_within'] == [0.0, 0.0]
    assert out['d2a_boundary'] == [6.0, 6.0]   # (2, 3, 10) and (3, 10, 11)


def test_point_summary_counts_and_means():
    eps = [{'success': True, 'steps': 50, 'underruns': 1, 'startup_holds': 4, 'chunk_ms': 10.0,
            'da_within': [1.0], 'da_boundary': [3.0], 'd2a_within': [], 'd2a_boundary': [2.0]},
           {'success': False, 'steps': 400, 'underruns': 0, 'startup_holds': 4,
            'chunk_ms': 20.0, 'da_within': [2.0], 'da_boundary': [], 'd2a_within': [],
            'd2a_boundary': [4.0]}]
    p = summarize_point(eps)
    assert (p['success'], p['steps_success'], p['underruns']) == (1, 50.0, 1)
    assert p['da_within_mean'] == pytest.approx(1.5) and p['da_boundary_max'] == 3.0
    assert p['d2a_within_mean'] is None and p['d2a_boundary_mean'] == pytest.approx(3.0)


def test_a_dropped_camera_frame_keeps_the_last_image_and_the_current_proprioception():
    previous = {'agentview_image': np.zeros((3, 2, 2)), 'robot0_eef_pos': np.zeros(3)}
    obs = {'agentview_image': np.ones((3, 2, 2)), 'robot0_eef_pos': np.ones(3)}
    keys = ['agentview_image']
    rng = np.random.default_rng(0)
    assert drop_camera_frames(obs, previous, keys, rng, 0.0) is obs
    seen = drop_camera_frames(obs, previous, keys, rng, 0.999999)
    assert seen['agentview_image'] is previous['agentview_image']
    assert seen['robot0_eef_pos'] is obs['robot0_eef_pos']
    assert obs['agentview_image'].sum() == 12  # the input is not modified
    # About the asked share of frames is dropped, the same ones for the same seed.
    draws = [drop_camera_frames(obs, previous, keys, np.random.default_rng(7), 0.3)
             ['agentview_image'] is previous['agentview_image'] for _ in range(3)]
    assert len(set(draws)) == 1
    rng = np.random.default_rng(1)
    share = np.mean([drop_camera_frames(obs, previous, keys, rng, 0.3)['agentview_image']
                     is previous['agentview_image'] for _ in range(2000)])
    assert 0.25 < share < 0.35


def test_points_with_dropped_frames_are_kept_apart():
    assert point_path('o', 200, 'rtc', False).endswith('rtc_200ms.json')
    assert point_path('o', 200, 'rtc', True, 0.2).endswith('dense_rtc_200ms_drop0.2.json')
