"""Observation history: alignment to the policy rate, padding, ordering and resets."""

import time

import numpy as np
from sparse_policy_node.ros import obs_history as oh

DT = 50_000_000
TOL = 10_000_000
JUMP = 500_000_000


def make(keys=('cam', 'joint')):
    return oh.ObservationHistory(keys, n_steps=2, dt_ns=DT, tolerance_ns=TOL, jump_ns=JUMP)


def test_window_aligns_steps_within_tolerance():
    h = make()
    for i in range(3):
        h.add('cam', 1_000_000_000 + i * DT, np.full(2, i))
        h.add('joint', 1_000_000_000 + i * DT + 4_000_000, np.full(1, i))  # 4 ms later
    window, why = h.window()
    assert why == '' and window.stamp_ns == 1_000_000_000 + 2 * DT
    np.testing.assert_array_equal(window.arrays['cam'][:, 0], [1, 2])
    np.testing.assert_array_equal(window.arrays['joint'][:, 0], [1, 2])


def test_episode_start_repeats_first_entry_but_gaps_fail():
    h = make()
    h.add('cam', 10 * DT, np.ones(2))
    window, why = h.window()
    assert window is None and 'joint' in why
    h.add('joint', 10 * DT, np.ones(1))
    window, _ = h.window()
    assert window.arrays['cam'].shape == (2, 2)  # padded with the first observation
    h.add('cam', 13 * DT, np.ones(2))
    h.add('joint', 13 * DT, np.ones(1))
    window, why = h.window()
    assert window is None and 'no entry within 10 ms' in why


def test_out_of_order_duplicate_and_time_jump():
    h = make(('cam',))
    assert h.add('cam', 100 * DT, np.ones(1)) == oh.ACCEPTED
    assert h.add('cam', 100 * DT, np.ones(1)) == oh.DUPLICATE
    assert h.add('cam', 99 * DT, np.ones(1)) == oh.OUT_OF_ORDER
    assert h.add('cam', 10 * DT, np.ones(1)) == oh.TIME_JUMP


def test_reset_floor_drops_late_messages_of_the_old_episode():
    h = make(('cam',))
    h.add('cam', 100 * DT, np.ones(1))
    h.clear(floor_ns=95 * DT)  # the newest stamp (100) is the floor
    assert h.add('cam', 100 * DT, np.ones(1)) == oh.BEFORE_RESET
    assert h.add('cam', 101 * DT, np.ones(1)) == oh.ACCEPTED
    h.clear(floor_ns=None)
    assert h.add('cam', 1 * DT, np.ones(1)) == oh.ACCEPTED


def test_one_staleness_rule_stamp_age_or_arrival_age_whichever_is_larger():
    s = 1_000_000_000
    assert oh.input_age_s(9 * s, arrival=9.9, now_ns=10 * s, now_mono=10.0) == 1.0  # old stamp
    assert abs(oh.input_age_s(10 * s, arrival=8.0, now_ns=10 * s, now_mono=10.0) - 2.0) < 1e-9
    assert oh.input_age_s(12 * s, arrival=10.0, now_ns=10 * s, now_mono=10.0) == 0.0  # future
    assert oh.input_age_s(5 * s, arrival=9.5, now_ns=0, now_mono=10.0) == 0.5  # no clock yet
    assert oh.future_by_s(12 * s, 10 * s) == 2.0 and oh.future_by_s(12 * s, 0) == 0.0
    h = make(('a', 'b'))
    arrival = time.monotonic()
    h.add('a', 10 * s, np.ones(1), arrival=arrival)
    ages = h.ages(now_ns=11 * s, now_mono=arrival + 0.5)
    assert ages['a'] == 1.0                    # by its stamp
    assert ages['b'] >= 0.5                    # missing: waiting since the history was cleared


def test_a_1khz_joint_stream_and_a_lagging_30hz_camera_form_a_window():
    h = oh.ObservationHistory(('cam', 'joint'), n_steps=2, dt_ns=DT, tolerance_ns=25_000_000,
                              jump_ns=JUMP)
    t0 = 1_000_000_000
    # Two seconds of a 1 kHz joint stream; the camera runs at 30 Hz and its frames arrive
    # 60 ms behind the joints (its newest frame is older than 60 joint states).
    for ms in range(2000):
        h.add('joint', t0 + ms * 1_000_000, np.full(1, ms))
    cam_stamps = [t0 + round(i * 1e9 / 30) for i in range(60) if i * 1e9 / 30 <= 1.94e9]
    for stamp in cam_stamps:
        h.add('cam', stamp, np.full(2, stamp))
    window, why = h.window()
    assert why == '' and window.stamp_ns == cam_stamps[-1]
    # Each step takes the joint state nearest its time: exact at 1 kHz.
    steps = [cam_stamps[-1] - DT, cam_stamps[-1]]
    assert window.stamps['joint'] == [s // 1_000_000 * 1_000_000 for s in steps]
    assert all(abs(c - s) <= 25_000_000 for c, s in zip(window.stamps['cam'], steps))
    # The joint stream is kept by time: about the retention, not a fixed count of 64.
    assert len(h._streams['joint']) > 64
