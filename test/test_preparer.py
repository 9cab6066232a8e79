"""EnginePreparer: one build at a time beside the serving engine (ros/preparer.py)."""

import threading
import time

import pytest
from sparse_policy_node.ros.preparer import EnginePreparer


def wait_taken(preparer, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = preparer.take()
        if done is not None:
            return done
        time.sleep(0.01)
    return None


def test_a_build_runs_beside_the_caller_and_is_handed_over_once():
    release, discarded = threading.Event(), []
    preparer = EnginePreparer(discard=discarded.append)
    preparer.start(('model', 'cpu'), lambda: release.wait(10.0) and 'engine')
    assert preparer.busy() and preparer.target == ('model', 'cpu')
    with pytest.raises(RuntimeError, match='already preparing'):
        preparer.start(('other', 'cpu'), lambda: 'x')
    assert preparer.take() is None          # still building: the caller goes on serving
    release.set()
    done = wait_taken(preparer)
    assert (done.target, done.value, done.error) == (('model', 'cpu'), 'engine', None)
    assert done.seconds >= 0 and not preparer.busy() and preparer.take() is None
    assert discarded == []


def test_a_failed_build_hands_over_its_error():
    def fail():
        raise OSError('truncated weights')
    preparer = EnginePreparer(discard=lambda v: None)
    preparer.start(('broken',), fail)
    done = wait_taken(preparer)
    assert done.value is None and isinstance(done.error, OSError)


def test_cancel_discards_a_finished_build_and_one_that_finishes_later():
    discarded = []
    preparer = EnginePreparer(discard=discarded.append)
    preparer.start(('a',), lambda: 'built a')
    deadline = time.monotonic() + 10.0
    while preparer.target is not None and preparer._done is None and \
            time.monotonic() < deadline:
        time.sleep(0.01)
    preparer.cancel()
    assert discarded == ['built a'] and not preparer.busy()
    release, later = threading.Event(), EnginePreparer(discard=discarded.append)
    later.start(('b',), lambda: release.wait(10.0) and 'built b')
    later.cancel()
    release.set()
    deadline = time.monotonic() + 10.0
    while len(discarded) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert discarded == ['built a', 'built b'] and later.take() is None
