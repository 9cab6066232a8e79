"""Chunk execution maths (pure numpy): latency-aware start per action kind, blend, ensemble."""

import math

import numpy as np
import pytest
from sparse_policy_node.ros import execution as ex

DT = 50_000_000  # 20 Hz


def run_deltas(executor, ticks):
    """Tick at each time; return the (k, stamp) pairs sent (None for an underrun)."""
    return [executor.tick(t) for t in ticks]


def test_action_kind_per_model_and_output():
    assert ex.action_kind('joint_pos', 'integrated', 'joint_trajectory') == ex.ABSOLUTE
    assert ex.action_kind('abs_eef_pose', 'integrated', 'pose_target') == ex.ABSOLUTE
    assert ex.action_kind('delta_eef', 'integrated', 'pose_target') == ex.ABSOLUTE
    assert ex.action_kind('delta_eef', 'measured', 'pose_target') == ex.DELTA
    assert ex.action_kind('delta_eef', 'integrated', 'chunk') == ex.DELTA
    assert ex.action_kind(None, 'integrated', 'chunk') == ex.DELTA


@pytest.mark.parametrize('mode, kind, steps, decay, reason', [
    ('average', ex.ABSOLUTE, 0, 0.01, 'one of'),
    ('blend', ex.ABSOLUTE, 0, 0.01, 'blend_steps >= 1'),
    ('replace', ex.ABSOLUTE, 2, 0.01, 'only applies to execution.mode blend'),
    ('blend', ex.ABSOLUTE, -1, 0.01, '>= 0'),
    ('ensemble', ex.ABSOLUTE, 0, -0.5, 'ensemble_decay'),
    ('ensemble', ex.ABSOLUTE, 0, float('nan'), 'ensemble_decay'),
    ('ensemble', ex.DELTA, 0, 0.01, 'averages absolute targets'),
])
def test_bad_modes_are_refused_with_the_parameter_named(mode, kind, steps, decay, reason):
    with pytest.raises(ValueError, match=reason):
        ex.check_mode(mode, kind, steps, decay)


def test_late_delta_chunk_sends_every_delta_once_in_order():
    e = ex.ChunkExecutor(ex.DELTA, DT)
    s = 10 * DT
    assert e.tick(s) is None and e.tick(s + DT) is None       # underrun: nothing yet
    values = np.arange(8.0)[:, None]
    # Computed from the observation at s, arrives 2.6 steps late: nothing had been sent.
    out, first = e.add(s, values, s + 13 * DT // 5)
    assert first == 0 and np.allclose(out, values)
    sent = run_deltas(e, [s + (3 + i) * DT for i in range(10)])
    assert [k for k, _ in sent[:8]] == list(range(8))         # none dropped, none twice
    assert sent[8:] == [None, None] and e.sent == 8


def test_delta_chunk_skips_only_what_already_ran_from_the_old_chunk():
    e = ex.ChunkExecutor(ex.DELTA, DT)
    old = np.full((8, 1), -1.0)
    e.add(0, old, 0)
    # Deltas go out at 0, dt, ..., 5 dt (6 of them); the new chunk's observation was taken
    # at 4 dt, after the 4 deltas of ticks 0..3 and before the one of tick 4.
    for i in range(6):
        assert e.tick(i * DT) == (i, i * DT)
    assert e.sent_before(4 * DT) == 4
    new = np.arange(8.0)[:, None]
    out, first = e.add(4 * DT, new, 6 * DT)
    assert first == 2                               # new steps 0, 1 ran as old steps 4, 5
    assert np.allclose(out, new)                    # replace: the new chunk as predicted
    assert [e.tick((6 + i) * DT)[0] for i in range(6)] == [2, 3, 4, 5, 6, 7]
    assert e.sent == 12                             # 6 old + 6 new: one per execution step


def test_rounding_jitter_at_half_a_period_neither_repeats_nor_skips_absolute_targets():
    rng = np.random.default_rng(0)
    e = ex.ChunkExecutor(ex.ABSOLUTE, DT)
    e.add(0, np.arange(20.0)[:, None], 0)
    # Ticks sit half a period off the chunk's grid, with +-10 % jitter.
    ticks = [int((i + 0.5 + rng.uniform(-0.1, 0.1)) * DT) for i in range(15)]
    got = [e.tick(t)[0] for t in ticks]
    assert got == list(range(got[0], got[0] + 15))
    rounded = [round(t / DT) for t in ticks]       # what rounding each tick did
    assert len(set(rounded)) < 15 or np.any(np.diff(rounded) != 1)


def test_absolute_targets_skip_what_elapsed_and_realign_after_a_clock_jump():
    e = ex.ChunkExecutor(ex.ABSOLUTE, DT)
    out, first = e.add(0, np.arange(10.0)[:, None], 12 * DT // 5)   # arrives 2.4 steps late
    assert first == 2 and e.peek(12 * DT // 5) == 2
    assert e.tick(12 * DT // 5) == (2, 2 * DT)
    assert e.tick(17 * DT // 5) == (3, 3 * DT)
    assert e.tick(7 * DT) == (7, 7 * DT)            # missed ticks: nearest target again
    assert e.tick(12 * DT) is None and e.remaining() == 2


def test_blend_starts_at_the_first_pending_step():
    e = ex.ChunkExecutor(ex.ABSOLUTE, DT, mode='blend', blend_steps=3)
    e.add(0, np.zeros((8, 1)), 0)
    out, first = e.add(4 * DT, np.ones((8, 1)), 5 * DT)       # one step late
    assert first == 1
    # Step 0 elapsed (never sent); steps 1..3 go 3/4, 2/4, 1/4 old; 4 (t = 8 dt) has no
    # old value.
    assert np.allclose(out[:, 0], [1.0, 0.25, 0.5, 0.75, 1, 1, 1, 1])


def test_blend_of_deltas_aligns_by_execution_step():
    e = ex.ChunkExecutor(ex.DELTA, DT, mode='blend', blend_steps=1)
    e.add(0, np.zeros((4, 1)), 0)
    for i in range(3):
        e.tick(i * DT)
    out, first = e.add(2 * DT, np.ones((4, 1)), 3 * DT)
    assert first == 1                               # new 0 ran as old 2
    assert np.allclose(out[:, 0], [1.0, 0.5, 1.0, 1.0])   # new 1 blends with old 3


def test_ensemble_weights_every_chunk_that_predicts_a_step():
    decay = 0.1
    e = ex.ChunkExecutor(ex.ABSOLUTE, DT, mode='ensemble', decay=decay)
    e.add(0, np.zeros((4, 1)), 0)
    e.add(DT, np.ones((4, 1)), DT)
    out, _ = e.add(2 * DT, np.full((4, 1), 2.0), 2 * DT)
    w = [1.0, math.exp(-decay), math.exp(-2 * decay)]
    # Step 0 of the third chunk (t = 2 dt) is predicted by all three; t = 4 dt by two.
    assert out[0, 0] == pytest.approx((w[1] * 1 + w[2] * 2) / sum(w))
    assert out[2, 0] == pytest.approx((1 * 1 + math.exp(-decay) * 2) / (1 + math.exp(-decay)))
    assert out[3, 0] == pytest.approx(2.0)


def test_ensemble_interpolates_chunks_off_the_grid_and_averages_quaternions():
    half = ex.value_at(0, np.array([[0.0], [2.0]]), DT, DT // 2)
    assert half[0] == pytest.approx(1.0)
    q1 = np.array([[0.0, 0.0, 0.0, 1.0]])
    q2 = -np.array([[0.0, 0.0, np.sin(0.1), np.cos(0.1)]])   # same rotation sign-flipped
    mean = ex.ensemble([(0, q1), (0, q2)], DT, 0, 0.0, quat_at=0)
    assert np.isclose(np.linalg.norm(mean), 1.0)
    assert abs(mean[3]) > 0.99                              # not cancelled by the sign


@pytest.mark.parametrize('kwargs, reason', [
    ({'execution_mode': 'average'}, 'execution.mode must be one of'),
    ({'execution_mode': 'blend'}, 'blend_steps >= 1'),
    ({'execution_blend_steps': 3}, 'only applies to execution.mode blend'),
    ({'execution_mode': 'ensemble', 'execution_ensemble_decay': float('inf')},
     'ensemble_decay'),
])
def test_node_settings_reject_bad_execution_parameters(kwargs, reason):
    from sparse_policy_node.core.config import ConfigError
    from sparse_policy_node.ros.params import NodeSettings
    with pytest.raises(ConfigError, match=reason):
        NodeSettings(**kwargs)
    assert NodeSettings(execution_mode='blend', execution_blend_steps=3).execution_mode == 'blend'


def test_a_delta_goes_out_on_arrival_and_the_same_period_does_not_send_another():
    e = ex.ChunkExecutor(ex.DELTA, DT)
    e.add(0, np.arange(4.0)[:, None], 3 * DT // 10)
    assert e.tick(3 * DT // 10) == (0, 0)          # sent on arrival
    assert e.tick(4 * DT // 10) is None            # the period's tick: already sent
    assert e.covers(4 * DT // 10)                  # still covered (no hold)
    assert e.tick(14 * DT // 10) == (1, DT)
    assert e.remaining() == 2


def test_after_a_reset_with_the_clock_jumping_back_a_chunk_starts_at_its_first_delta():
    e = ex.ChunkExecutor(ex.DELTA, DT)
    e.add(100 * DT, np.zeros((4, 1)), 100 * DT)
    for i in range(4):
        e.tick((100 + i) * DT)
    e.drop()                                       # new episode; sim time restarts at 1 s
    _, first = e.add(20 * DT, np.ones((4, 1)), 21 * DT)
    assert first == 0 and e.tick(21 * DT) == (0, 20 * DT)


def test_rtc_delay_is_a_percentile_of_the_measured_latency_with_floor_cap_and_margin():
    est = ex.DelayEstimator(window=10)
    assert est.steps(0.05, 90, floor=1, cap=6) == 1          # nothing measured: the floor
    for ms in (30, 40, 60, 110, 120):
        est.add(ms / 1e3)
    est.add(float('nan'))                                     # not a measurement
    est.add(-0.01)
    assert est.latency_s(50) == pytest.approx(0.060)
    assert est.steps(0.05, 50, floor=0, cap=6) == 2           # 60 ms -> 2 steps (rounded up)
    assert est.steps(0.05, 100, floor=0, cap=6) == 3          # 120 ms
    assert est.steps(0.05, 100, floor=0, cap=6, exec_latency_s=0.04) == 4   # + actuation
    assert est.steps(0.05, 100, floor=0, cap=2) == 2          # capped
    assert est.steps(0.05, 0, floor=3, cap=6) == 3            # floored
    est.reset()
    assert est.latency_s(50) is None


def test_committed_absolute_targets_are_read_at_the_new_chunks_times():
    e = ex.ChunkExecutor(ex.ABSOLUTE, DT, mode='rtc')
    e.add(0, np.arange(6.0)[:, None], 0)
    assert e.committed(2 * DT)[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
    assert e.committed(6 * DT) is None                        # nothing overlaps any more
    e.drop()
    assert e.committed(0) is None
