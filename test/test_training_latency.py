"""``sparse-policy latency``: delay in control steps, the schedule, jerk split at boundaries."""

import numpy as np
import pytest
from sparse_policy_node.training.latency import delay_steps
from sparse_policy_node.training.latency import schedule
from sparse_policy_node.training.latency import smoothness
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
