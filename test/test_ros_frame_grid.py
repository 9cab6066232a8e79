"""Only frames that can land on the control grid are encoded ahead, newest first."""

import numpy as np
from sparse_policy_node.ros.obs_history import ObservationHistory
from sparse_policy_node.tools.bench_frames import run

MS = 1_000_000
DT = 50 * MS  # 20 Hz


def camera_history():
    h = ObservationHistory(['cam', 'pos'], n_steps=2, dt_ns=DT, tolerance_ns=25 * MS,
                           jump_ns=500 * MS)
    for i in range(30):               # a 30 Hz camera from 1 s, joints at 100 Hz
        h.add('cam', 1000 * MS + i * 33 * MS, np.zeros(1))
    for i in range(100):
        h.add('pos', 1000 * MS + i * 10 * MS, np.zeros(1))
    return h


def test_frames_before_the_next_window_are_not_wanted():
    h = camera_history()
    newest = 1000 * MS + 29 * 33 * MS             # 1.957 s; the joints are newer
    # Without a schedule: only the newest window's frames (t_ref - dt - tolerance on).
    assert h.may_pick('cam', newest)
    assert h.may_pick('cam', newest - 66 * MS)    # 1.891 s: nearest to t_ref - dt
    assert not h.may_pick('cam', newest - 99 * MS)
    assert h.may_pick('cam', 1000 * MS)           # the episode's first frame pads
    # The next chunk is due at 2.3 s: even the newest frame is no longer useful.
    assert not h.may_pick('cam', newest, 2300 * MS)
    assert h.may_pick('cam', newest, 2000 * MS)


def test_a_newer_frame_before_every_future_step_makes_an_older_one_useless():
    h = ObservationHistory(['cam'], n_steps=2, dt_ns=DT, tolerance_ns=25 * MS,
                           jump_ns=500 * MS)
    for i in range(60):               # a 62.5 Hz camera: frames 16 ms apart
        h.add('cam', 1000 * MS + i * 16 * MS, np.zeros(1))
    due = 1962 * MS                   # earliest future step: 1.912 s
    # 1.896 s is within the tolerance of that step, but 1.912 s is nearer every step.
    assert not h.may_pick('cam', 1896 * MS, due)
    assert h.may_pick('cam', 1912 * MS, due)


def test_a_30hz_camera_is_mostly_not_encoded_and_chunks_keep_coming():
    out = run(seconds=2.0, camera_hz=30.0, joint_hz=100.0)
    assert out['camera_frames'] >= 55 and out['chunks'] >= 6, out
    # 4-step chunks at 20 Hz use about 10 frames a second of the 30; before, every frame
    # was encoded ahead (tools/bench_frames.py: 30.0/s).
    assert out['encoder_calls_ahead'] <= 0.75 * out['camera_frames'], out
    assert out['frames_skipped_off_grid'] > 0
