"""Soak: thousands of lockstep chunks through a policy node process; memory stays flat."""

import json
import os
import signal
import subprocess
import sys
import time

import rclpy
from sparse_policy_node.ros.testing import FakeRobot
from sparse_policy_node.ros.testing import isolate_ros
from sparse_policy_node.ros.testing import save_tiny_model
from sparse_policy_node.ros.testing import Spinner
from sparse_policy_node.ros.testing import TINY_PARAMS
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNKS = 2000
DT = 50_000_000


def rss_kib(pid: int) -> int:
    with open(f'/proc/{pid}/status') as f:
        return int([line for line in f if line.startswith('VmRSS')][0].split()[1])


def test_soak_thousands_of_chunks_memory_flat_nothing_lost(tmp_path):
    isolate_ros(str(tmp_path / 'log'))
    model = save_tiny_model(str(tmp_path / 'model'))
    params = tmp_path / 'soak.yaml'
    values = dict(TINY_PARAMS, model_dir=model, use_sim_time=True, execution_horizon=1,
                  summary_file=str(tmp_path / 'summary.json'))
    params.write_text(yaml.safe_dump({'/**': {'ros__parameters': values}}))
    node = subprocess.Popen([sys.executable, '-m', 'sparse_policy_node.ros.policy_node',
                             '--ros-args', '--params-file', str(params)],
                            env=dict(os.environ, PYTHONPATH=ROOT))
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    robot = FakeRobot(context=ctx, sim_clock=True)
    try:
        with Spinner(ctx, robot):
            t = 1_000_000_000
            assert robot.drive(t, timeout=60.0) is not None   # start-up and discovery
            rss, start = {}, time.monotonic()
            for i in range(1, CHUNKS):
                t += DT
                assert robot.drive(t, timeout=10.0) is not None, f'chunk {i} lost'
                if i in (CHUNKS // 4, CHUNKS - 1):
                    rss[i] = rss_kib(node.pid)
            elapsed = time.monotonic() - start
        stamps = [c.header.stamp.sec * 10 ** 9 + c.header.stamp.nanosec for c in robot.chunks]
        assert len(stamps) == CHUNKS and stamps == sorted(set(stamps))
        growth_mib = (rss[CHUNKS - 1] - rss[CHUNKS // 4]) / 1024
        assert growth_mib < 8.0, (rss, elapsed)
    finally:
        node.send_signal(signal.SIGINT)
        code = node.wait(timeout=30)
        robot.destroy_node()
        ctx.try_shutdown()
    assert code == 0
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['chunks'] == CHUNKS
    assert not any(k.startswith(('rejected', 'stale', 'discarded', 'worker')) for k in summary)
