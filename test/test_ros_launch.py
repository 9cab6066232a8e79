"""launch/policy.launch.py and ``sparse-policy launch`` agree; the bring-up stops cleanly.

``launch`` and ``launch_ros`` are not installable here, so the launch file is checked with
``ast`` (it only uses real launch API names) and then executed against recording stand-ins
of those modules: the arguments it declares and the nodes it starts must equal the shared
table and the plan the rclpy bring-up runs.
"""

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import pytest
from sparse_policy_node.ros import bringup
from sparse_policy_node.ros import launch_args as la
from sparse_policy_node.ros.testing import isolate_ros
from sparse_policy_node.ros.testing import save_tiny_model
from sparse_policy_node.ros.testing import TINY_PARAMS
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_FILE = os.path.join(ROOT, 'launch', 'policy.launch.py')
REAL_API = {
    'launch': {'LaunchDescription'},
    'launch.actions': {'DeclareLaunchArgument', 'OpaqueFunction', 'Shutdown'},
    'launch.substitutions': {'LaunchConfiguration'},
    'launch_ros.actions': {'Node', 'LifecycleNode'},
    'ament_index_python.packages': {'get_package_share_directory'},
}


class Recorder:
    """Stand-in for a launch class: records its keyword arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class LifecycleRecorder(Recorder):
    """Stand-in for launch_ros's LifecycleNode."""


class FakeConfiguration(Recorder):
    """Stand-in for LaunchConfiguration: the context is the dict of values."""

    def perform(self, context):
        return context[self.args[0]]


def load_launch_file(monkeypatch, share):
    modules = {
        'launch': {'LaunchDescription': Recorder},
        'launch.actions': {'DeclareLaunchArgument': Recorder, 'OpaqueFunction': Recorder,
                           'Shutdown': Recorder},
        'launch.substitutions': {'LaunchConfiguration': FakeConfiguration},
        'launch_ros': {},
        'launch_ros.actions': {'Node': Recorder, 'LifecycleNode': LifecycleRecorder},
        'ament_index_python': {},
        'ament_index_python.packages': {'get_package_share_directory': lambda pkg: share},
    }
    for name, attrs in modules.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    namespace = {}
    with open(LAUNCH_FILE) as f:
        exec(compile(f.read(), LAUNCH_FILE, 'exec'), namespace)
    return namespace['generate_launch_description']()


def test_launch_file_uses_only_real_launch_api():
    tree = ast.parse(open(LAUNCH_FILE).read())
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.setdefault(node.module, set()).update(a.name for a in node.names)
    for module, names in imported.items():
        if module.startswith(('launch', 'ament_index')):
            assert names <= REAL_API[module], (module, names - REAL_API[module])
    assert {'LAUNCH_ARGS', 'plan_nodes'} <= imported['sparse_policy_node.ros.launch_args']
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert 'generate_launch_description' in functions


@pytest.mark.parametrize('tokens', [
    [], ['sim:=none', 'device:=cpu', 'sparsity:=off'],
    ['model:=/m', 'sparsity:=0.93', 'steps:=16', 'episodes:=5', 'seed:=7',
     'params_file:=/p.yaml', 'summary_dir:=/s', 'log_level:=debug', 'use_sim_time:=false',
     'lockstep:=false', 'namespace:=robot1'],
    ['sim:=none', 'namespace:=/arm/left', 'remap:=ee_pose=/arm/ee_pose,'
     'agentview/image_raw=/camera/color/image_raw']])
def test_launch_file_and_bringup_start_the_same_nodes(monkeypatch, tokens):
    description = load_launch_file(monkeypatch, '/share')
    entities = description.args[0]
    declared = [e for e in entities if isinstance(e, Recorder) and 'default_value' in e.kwargs]
    assert [e.args[0] for e in declared] == list(la.ARG_NAMES)
    for entity, arg in zip(declared, la.LAUNCH_ARGS):
        assert entity.kwargs['default_value'] == arg.default
        assert entity.kwargs['description'] == arg.description
        assert entity.kwargs.get('choices') == (list(arg.choices) if arg.choices else None)
    opaque = [e for e in entities if 'function' in e.kwargs][0]
    values = la.parse_launch_args(tokens)
    nodes = opaque.kwargs['function'](values)
    plan = la.plan_nodes(values, '/share')
    assert [n.kwargs['name'] for n in nodes] == [p.name for p in plan]
    for node, p in zip(nodes, plan):
        assert node.kwargs['package'] == la.PACKAGE
        assert node.kwargs['executable'] == p.executable
        assert node.kwargs['parameters'] == p.params_files + [p.overrides]
        assert node.kwargs['ros_arguments'] == ['--log-level', p.log_level]
        # The policy node is a LifecycleNode in the launch file; namespace and remaps are
        # the same in both bring-ups.
        assert isinstance(node, LifecycleRecorder) == p.lifecycle == (p.name == 'policy_node')
        assert node.kwargs['namespace'] == p.namespace
        assert node.kwargs['remappings'] == p.remappings
        cmd = bringup.node_command(p, '/o.yaml')
        assert cmd[cmd.index('-m') + 1] == p.module
        rules = [cmd[i + 1] for i, t in enumerate(cmd) if t == '-r']
        namespace = [f'__ns:={p.namespace}'] if p.namespace else []
        remaps = [f'{a}:={b}' for a, b in p.remappings]
        assert rules == [f'__node:={p.name}'] + namespace + remaps
        files = [cmd[i + 1] for i, t in enumerate(cmd) if t == '--params-file']
        assert files == p.params_files + ['/o.yaml']


def test_plan_maps_arguments_to_parameters():
    values = la.parse_launch_args(['sparsity:=0.93', 'steps:=16', 'device:=cpu'])
    policy, bridge = la.plan_nodes(values, '/share')
    assert policy.params_files == ['/share/config/policy.yaml']
    assert policy.overrides == {'use_sim_time': True, 'device': 'cpu', 'sampler.steps': 16,
                                'sparsity.enabled': True, 'sparsity.target': 0.93}
    assert bridge.overrides == {'task': 'lift', 'publish_clock': True}
    bridge = la.plan_nodes(la.parse_launch_args(['lockstep:=false']), '/share')[1]
    assert bridge.overrides['lockstep'] is False
    assert la.sparsity_overrides('off') == {'sparsity.enabled': False}
    policy = la.plan_nodes(la.parse_launch_args(
        ['sim:=none', 'namespace:=robot1', 'remap:=ee_pose=/arm/ee_pose']), '/share')[0]
    assert (policy.namespace, policy.remappings) == ('/robot1', [('ee_pose', '/arm/ee_pose')])
    for bad in (['sparsity:=2'], ['sim:=gazebo'], ['nonsense'], ['steps:=x'], ['x:=1'],
                ['lockstep:=maybe'], ['remap:=ee_pose=/arm/ee_pose'],   # needs sim:=none
                ['sim:=none', 'remap:=ee_pose'], ['namespace:=1robot']):
        with pytest.raises(ValueError):
            la.plan_nodes(la.parse_launch_args(bad), '/share')


def test_entry_points_exist_for_every_executable():
    setup = open(os.path.join(ROOT, 'setup.py')).read()
    for p in la.plan_nodes(la.parse_launch_args([]), '/share'):
        assert re.search(rf"'{p.executable} = {p.module}:main'", setup), p.executable


def test_show_args_lists_every_argument(capsys):
    parser = __import__('argparse').ArgumentParser()
    bringup.add_arguments(parser)
    assert bringup.run(parser.parse_args(['--show-args'])) == 0
    out = capsys.readouterr().out
    assert all(f"'{name}':" in out for name in la.ARG_NAMES)


# ==== the rclpy bring-up as a process ====

@pytest.fixture
def env(tmp_path):
    isolate_ros(str(tmp_path / 'log'))
    e = dict(os.environ, PYTHONPATH=ROOT, MUJOCO_GL='egl')
    return e


def params_file(path, config_name, **overrides):
    """Write the package's ``config/<config_name>`` with ``overrides`` to ``path``."""
    with open(os.path.join(ROOT, 'config', config_name)) as f:
        data = yaml.safe_load(f)
    data['/**']['ros__parameters'].update(overrides)
    path.write_text(yaml.safe_dump(data))
    return path


def launch(tmp_path, env, *tokens):
    params = params_file(tmp_path / 'params.yaml', 'policy.yaml', **TINY_PARAMS)
    cmd = [sys.executable, '-m', 'sparse_policy_node.cli', 'launch', f'params_file:={params}',
           f'summary_dir:={tmp_path}', *tokens]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for(proc, pattern, timeout=60.0):
    """Read output lines until one matches ``pattern``; return the match."""
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f'{pattern!r} not seen:\n' + ''.join(lines[-30:]))


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_bringup_forwards_signals_and_children_exit(tmp_path, env, sig):
    model = save_tiny_model(str(tmp_path / 'model'))
    proc = launch(tmp_path, env, 'sim:=none', f'model:={model}')
    pid = int(wait_for(proc, r'started policy_node \(pid (\d+)\)').group(1))
    wait_for(proc, r'serving .* on cpu')
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert not os.path.exists(f'/proc/{pid}') or 'zombie' in open(f'/proc/{pid}/status').read()
    assert (tmp_path / 'policy_node.json').exists()  # the node shut down cleanly
    assert 'summary' in out


def test_bringup_fails_cleanly_on_missing_model(tmp_path, env):
    # Checked before any node starts: one line, exit status 2, no node output.
    proc = launch(tmp_path, env, 'sim:=none', f'model:={tmp_path}/nope')
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert out.startswith('sparse-policy launch: error: ') and 'does not exist' in out
    assert len(out.strip().splitlines()) == 1 and 'started' not in out


def test_a_policy_node_that_cannot_configure_stops_the_bridge_at_once(tmp_path, env):
    """A failure only the node sees (pose_target needs a model card) ends the whole launch."""
    pytest.importorskip('robosuite')
    model = save_tiny_model(str(tmp_path / 'model'))
    proc = launch(tmp_path, env, f'model:={model}', 'action_interface:=pose_target',
                  'episodes:=2')
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out[-3000:]
    assert 'needs the model card' in out and 'policy_node exited with code 1' in out
    assert 'episode 0' not in out, out[-3000:]         # the bridge ran no episode
    bridge = json.loads((tmp_path / 'sim_bridge.json').read_text()) \
        if (tmp_path / 'sim_bridge.json').exists() else {'episodes': 0}
    assert bridge['episodes'] == 0


def test_bringup_runs_sim_episodes_and_ends_by_itself(tmp_path, env):
    pytest.importorskip('robosuite')
    model = save_tiny_model(str(tmp_path / 'model'))
    bridge = params_file(tmp_path / 'bridge.yaml', 'sim_bridge.yaml', max_episode_steps=12,
                         image_size=[32, 32])
    proc = launch(tmp_path, env, f'model:={model}', 'episodes:=2',
                  f'bridge_params_file:={bridge}')
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert 'lift: 2 episodes' in out
    summary = yaml.safe_load((tmp_path / 'sim_bridge.json').read_text())
    assert summary['episodes'] == 2 and [r['length'] for r in summary['results']] == [12, 12]
    policy = yaml.safe_load((tmp_path / 'policy_node.json').read_text())
    assert policy['chunks'] >= 6 and policy['dense_chunks'] == 2


def test_bench_node_runs_realtime_episodes_sparse_next_to_dense(tmp_path, env):
    """The real-time bridge mode (lockstep:=false) end to end, through ``bench-node``."""
    pytest.importorskip('robosuite')
    model = save_tiny_model(str(tmp_path / 'model'))
    params = params_file(tmp_path / 'params.yaml', 'policy.yaml', **TINY_PARAMS)
    bridge = params_file(tmp_path / 'bridge.yaml', 'sim_bridge.yaml', image_size=[32, 32])
    out = subprocess.run(
        [sys.executable, '-m', 'sparse_policy_node.cli', 'bench-node', '--model', model,
         '--variants', '0.5,off', '--episodes', '1', '--max-episode-steps', '30',
         '--replan-lead', '1', '--params-file', str(params), '--bridge-params-file',
         str(bridge), '--out', str(tmp_path / 'bench'), '--json'],
        env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result['mode'] == 'realtime'
    assert [r['variant'] for r in result['rows']] == ['0.5', 'off']
    for row in result['rows']:
        # Wall-clock stepping: every step ran, chunks arrived, nothing was lost or NaN.
        assert row['sim_steps'] == 30 and row['chunks'] >= 2
        assert row['obs_to_chunk_p50_ms'] > 0 and 'obs_to_chunk_p99_vs_dense' in row
    sparse, dense = result['rows']
    # The mean over chunks includes each episode's first chunk, dense by rule.
    assert 0.0 < sparse['realized_sparsity'] <= 0.55 and dense['realized_sparsity'] == 0.0
    summary = json.loads((tmp_path / 'bench' / 'off' / 'sim_bridge.json').read_text())
    assert summary['episodes'] == 1 and summary['bad_chunks'] == 0
    assert len(sparse['samples_ms']) == sparse['chunks'] - sparse['dense_chunks']
    assert os.path.getsize(result['plot']) > 1000


def test_summary_reports_latency_with_and_without_the_dense_first_chunks():
    policy = {'chunks': 10, 'dense_chunks': 2, 'chunk_rate_hz': 2.0, 'latency_p50_ms': 30.0,
              'latency_p99_ms': 240.0, 'obs_to_chunk_p50_ms': 31.0,
              'obs_to_chunk_p99_ms': 245.0, 'steady_obs_to_chunk_p50_ms': 30.5,
              'steady_obs_to_chunk_p99_ms': 45.0, 'realized_sparsity': 0.8,
              'rejected_agentview_image': 1}
    bridge = {'task': 'lift', 'episodes': 2, 'successes': 2, 'success_rate': 1.0,
              'mean_length': 57.0, 'steps_per_wall_s': 16.5}
    text = bringup.format_summary(policy, bridge)
    assert 'success rate 100% (2/2)' in text and '10 (2 dense)' in text
    assert 'p99 245.0 ms' in text and 'p50 30.5 ms, p99 45.0 ms' in text
    assert "{'rejected_agentview_image': 1}" in text
