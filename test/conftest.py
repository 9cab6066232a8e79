"""Shared fixtures: a tiny policy config and seeded observation batches."""

import os
import sys
import warnings

import pytest
import torch

# Keep test runs off the user's other cores and deterministic.
torch.set_num_threads(1)
os.environ.setdefault('MUJOCO_GL', 'egl')


@pytest.fixture
def tiny_config():
    """Return a seconds-fast PolicyConfig."""
    from sparse_policy_node.core.config import tiny_config as make
    return make()


def make_obs(policy, batch=1, seed=0):
    """Random observation window matching ``policy.expected_obs_shapes()``."""
    g = torch.Generator().manual_seed(seed)
    obs = {}
    for key, shape in policy.expected_obs_shapes().items():
        if key.endswith('_image'):
            obs[key] = torch.randint(0, 256, (batch, *shape), generator=g, dtype=torch.uint8)
        else:
            obs[key] = torch.randn((batch, *shape), generator=g)
    return obs


@pytest.fixture
def tiny_policy(tiny_config):
    """Return a randomly initialised tiny DiffusionPolicy in eval mode."""
    from sparse_policy_node.core.policy import DiffusionPolicy
    torch.manual_seed(0)
    return DiffusionPolicy(tiny_config).eval()


@pytest.fixture
def context(tmp_path):
    """Return an initialised rclpy Context isolated to this test (DDS on localhost, own logs)."""
    import rclpy
    from sparse_policy_node.ros.testing import isolate_ros
    isolate_ros(str(tmp_path / 'log'))
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    ctx.try_shutdown()


# ==== service-call measurement: every call_service of the run (sparse_policy_node.ros.services
# records them), printed at the end; SPARSE_POLICY_SERVICE_LOG=path also writes them as JSON.

SERVICE_CALLS = []   # (test node id, CallRecord), in call order
SHM_FILES = {}       # 'start': the Fast DDS files in /dev/shm when the run began
DROPPED_RESPONSES = []  # node ids of tests, once per response a server could not send


def fastdds_shm_files():
    """Fast DDS shared-memory segments, port locks and semaphores in /dev/shm (sorted)."""
    try:
        names = os.listdir('/dev/shm')
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(('fastdds_', 'fastrtps_', 'fast_datasharing',
                                                    'sem.fastdds_', 'sem.fastrtps_')))


def pytest_sessionstart(session):
    """Count the Fast DDS files in /dev/shm before the first test."""
    SHM_FILES['start'] = fastdds_shm_files()


def pytest_warning_recorded(warning_message, when, nodeid, location):
    """Count responses a service dropped (rclpy warns: the client's reader was not matched)."""
    if 'failed to send response' in str(warning_message.message):
        DROPPED_RESPONSES.append(nodeid)


@pytest.fixture(autouse=True)
def _every_dropped_response_warns():
    """Let rclpy's RuntimeWarning for a response rmw gave up on through every time."""
    warnings.filterwarnings('always', message='failed to send response', category=RuntimeWarning)


def _take_service_calls(nodeid):
    services = sys.modules.get('sparse_policy_node.ros.services')
    while services is not None and services.CALL_LOG:
        try:
            SERVICE_CALLS.append((nodeid, services.CALL_LOG.popleft()))
        except IndexError:  # taken by another thread in between
            break


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Attribute the service calls made during a test to it."""
    yield
    _take_service_calls(item.nodeid)


def service_call_summary(records):
    """Lines of the end-of-run block: per service count, p50/max answer time, re-sends."""
    by_service = {}
    records = [r for r in records if not r['service'].startswith('/fake_')]  # unit tests'
    for record in records:
        by_service.setdefault(record['service'], []).append(record)
    lines = []
    for service, calls in sorted(by_service.items()):
        times = sorted(c['answer_s'] for c in calls if c['answer_s'] is not None)
        resent = sum(max(0, c['sends'] - 1) for c in calls)
        unanswered = sum(c['sends'] > 0 and c['answer_s'] is None for c in calls)
        undiscovered = sum(c['sends'] == 0 for c in calls)
        answer = (f'answer p50 {times[len(times) // 2]:.3f} s max {times[-1]:.3f} s'
                  if times else 'no answer')
        discovery = max(c['discovery_s'] for c in calls)
        lines.append(f'{service}: {len(calls)} calls, {answer}, {resent} re-sends, '
                     f'{unanswered} unanswered, {undiscovered} undiscovered '
                     f'(discovery max {discovery:.3f} s)')
    stalled = [r for r in records if r.get('stall')]
    for record in stalled[:5]:
        lines.append(f"stalled {record['service']} in {record['test']}: discovery "
                     f"{record['discovery_s']:.3f} s, sends {record['sends']}, answer "
                     f"{record['answer_s']}; seen then: {record['stall']}")
    return lines


def pytest_terminal_summary(terminalreporter):
    """Print the service-call block; write the records where SPARSE_POLICY_SERVICE_LOG says."""
    import json
    _take_service_calls('(after the last test)')
    records = [dict(r.as_dict(), test=nodeid) for nodeid, r in SERVICE_CALLS]
    start, end = SHM_FILES.get('start', []), fastdds_shm_files()
    tr = terminalreporter
    tr.write_sep('-', f'service calls: {len(records)}')
    for line in service_call_summary(records):
        tr.write_line(line)
    tr.write_line(f'responses dropped by servers (rmw timeout): {len(DROPPED_RESPONSES)}; '
                  f'/dev/shm Fast DDS files: {len(start)} at start, {len(end)} at end')
    path = os.environ.get('SPARSE_POLICY_SERVICE_LOG')
    if path:
        with open(path, 'w') as f:
            json.dump({'calls': records, 'dropped_responses': DROPPED_RESPONSES,
                       'shm_start': start, 'shm_end': end}, f, indent=1)
        tr.write_line(f'service calls written to {path}')
