"""``sparse-policy latency``: closed-loop success and smoothness under injected inference delay.

Every other closed-loop number of the project is lockstep: the simulator waits for each
chunk, so inference costs the robot nothing. Here the simulator keeps stepping while a chunk
is computed. The delay is injected, deterministically, in control steps::

    d = ceil(latency / control period)              (20 Hz: 100 ms -> 2, 200 ms -> 4)
    step   t0 .. t0+d-1 : the previous chunk's remaining actions run (a hold when none:
                          an underrun; the first chunk of an episode waits d steps)
    step   t0+d ..      : the chunk from the observation at t0 applies from its step d on

The chunk is computed from the observation at ``t0`` (then the simulator is advanced ``d``
steps with the actions already executing): an honest model of a fixed latency that does not
depend on how fast this machine happens to be. The next chunk starts when ``lead`` steps of
the executing one are left (:func:`schedule`: back to back, ``lead = 0`` at zero latency,
the usual lockstep evaluation), so every mode sees the same schedule and the same seeds.

Chunks are combined by the policy node's own executor
(:class:`sparse_policy_node.ros.execution.ChunkExecutor`, pure numpy) in ``replace``, ``blend``
(the overlap left at arrival crossfaded) or ``rtc`` (the chunk is sampled with the executing
chunk's overlap inpainted, :mod:`sparse_policy_node.core.rtc`, the same calls as the node).

Smoothness, on the arm's 6 action dimensions (the gripper's open/close flip is left out):
``|da|`` is the norm of a_t - a_(t-1), ``|d2a|`` the norm of a_t - 2 a_(t-1) + a_(t-2);
a difference is *within* a chunk when all its actions came from one chunk, at a *boundary*
when they came from two; differences that touch a hold are in neither.
"""

import argparse
from collections import deque
import json
import math
import os
import time
from typing import List

import numpy as np
from sparse_policy_node.core import keys
from sparse_policy_node.core.checkpoint import load_policy_config
from sparse_policy_node.ros.execution import smoothness
from sparse_policy_node.tools.args import add_episode_arguments
from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_episode_arguments
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import CommandError
from sparse_policy_node.tools.args import ListAction
import torch

MODES = ('replace', 'blend', 'rtc')
CONTROL_HZ = 20.0  # robosuite control_freq of every task here (sim/robosuite_env.py)


def delay_steps(latency_ms: float, hz: float = CONTROL_HZ) -> int:
    """Control steps a chunk takes to arrive (ceil: a late action misses its tick)."""
    return int(math.ceil(latency_ms * hz / 1000.0 - 1e-9))


def schedule(d: int, n: int) -> int:
    """Return ``lead``: start the next chunk when this many steps of the current are left.

    0 at zero latency (replan when the chunk is done, as lockstep evaluation). Else
    ``max(d, n - d)``: inference runs back to back, as in the RTC paper (a new chunk every
    ``s = d`` steps), and a chunk arrives when ``n - 2d`` of the current one are left (the
    overlap that blend crossfades and rtc inpaints beyond the ``d`` frozen steps). With
    ``2d > n`` a chunk cannot cover the wait for the next one: underruns are unavoidable.
    """
    return 0 if d == 0 else max(d, n - d)


def drop_camera_frames(obs: dict, previous: dict, image_keys, rng, rate: float) -> dict:
    """Return ``obs`` with each camera's image replaced by ``previous``'s at ``rate``.

    A dropped camera frame: the policy sees the last frame that did arrive while the
    proprioception is current (as a node whose camera link loses frames).

    Args:
        obs: this step's observation (not modified).
        previous: the observation the policy saw at the previous step.
        image_keys: the observation keys of the cameras.
        rng: a ``numpy.random.Generator`` (one draw per camera and step).
        rate: probability of a drop in [0, 1).
    """
    if rate <= 0:
        return obs
    out = dict(obs)
    for key in image_keys:
        if rng.random() < rate:
            out[key] = previous[key]
    return out


def run_latency_episode(env, engine, seed: int, n_obs_steps: int, d: int,
                        mode: str, drop_frames: float = 0.0) -> dict:
    """Run one episode with a delay of ``d`` control steps; return its result and jerk lists.

    Args:
        env: a :class:`RobosuiteEnv` (delta actions).
        engine: a :class:`SparseEngine` (any runtime).
        seed: reset seed; torch's global generator is seeded with it too.
        n_obs_steps: T_o.
        d: delay in control steps.
        mode: ``replace``, ``blend`` or ``rtc``.
        drop_frames: probability that a camera frame is lost (:func:`drop_camera_frames`;
            seeded with ``seed``).
    """
    from sparse_policy_node.core.rtc import prefix_from
    from sparse_policy_node.ros import execution as ex
    from sparse_policy_node.training.evaluate import obs_window
    n = engine.policy.config.n_action_steps
    lead = schedule(d, n)
    dt_ns = int(round(1e9 / CONTROL_HZ))
    blend = max(1, lead - d) if mode == 'blend' else 0
    execu = ex.ChunkExecutor(ex.DELTA, dt_ns, mode, blend)
    torch.manual_seed(seed)
    engine.reset()
    obs = env.reset(seed)
    drop_rng = np.random.default_rng(seed)
    image_keys = [keys.image_key(c) for c in engine.policy.config.obs.vision.cameras]
    dropped = 0
    history = deque([obs] * n_obs_steps, maxlen=n_obs_steps)
    pending = None          # (arrival step, base, (n, A) chunk, chunk id)
    chunk_id, current_id = 0, -1
    actions, source = [], []
    underruns = startup = 0
    gripper = -1.0          # robosuite: -1 open
    chunk_ms = []
    done, info, t = False, {'success': False}, 0
    while not done:
        now = t * dt_ns
        if pending is not None and t >= pending[0]:
            execu.add(pending[1] * dt_ns, pending[2], now, base=pending[1])
            current_id, pending = pending[3], None
        if pending is None and (execu.current is None or execu.remaining() <= lead):
            prefix = None
            if mode == 'rtc':
                prefix = prefix_from(execu.committed(now, execu.sent), d, n)
            t0 = time.perf_counter()
            out = engine.predict_action(obs_window(history), prefix=prefix)
            chunk_ms.append((time.perf_counter() - t0) * 1e3)
            pending = (t + d, execu.sent, out['action'][0].numpy(), chunk_id)
            chunk_id += 1
        if pending is not None and t >= pending[0]:  # d = 0: it applies now
            execu.add(pending[1] * dt_ns, pending[2], now, base=pending[1])
            current_id, pending = pending[3], None
        sent = execu.tick(now)
        if sent is None:
            # Hold still, gripper as last commanded (the realtime bridge's hold).
            action = np.zeros(engine.policy.config.transformer.action_dim)
            action[-1] = gripper
            if current_id < 0:
                startup += 1
            else:
                underruns += 1
            source.append(-1)
        else:
            action = execu.current[2][sent[0]].copy()
            gripper = float(action[-1])
            source.append(current_id)
        actions.append(action)
        obs, _, done, info = env.step(action)
        seen = drop_camera_frames(obs, history[-1], image_keys, drop_rng, drop_frames)
        dropped += sum(seen[k] is not obs[k] for k in image_keys)
        history.append(seen)
        t += 1
    result = {'seed': seed, 'success': bool(info['success']), 'steps': env.steps,
              'underruns': underruns, 'startup_holds': startup, 'chunks': chunk_id,
              'dropped_frames': dropped,
              'chunk_ms': round(float(np.mean(chunk_ms)), 2)}
    result.update(smoothness(np.stack(actions), source))
    return result


def summarize_point(episodes: List[dict]) -> dict:
    """Success, steps per success, underruns and jerk statistics of one (latency, mode)."""
    wins = [e['steps'] for e in episodes if e['success']]
    out = {'episodes': len(episodes), 'success': sum(e['success'] for e in episodes),
           'steps_success': round(float(np.mean(wins)), 2) if wins else None,
           'underruns': sum(e['underruns'] for e in episodes),
           'startup_holds': sum(e['startup_holds'] for e in episodes),
           'chunk_ms': round(float(np.mean([e['chunk_ms'] for e in episodes])), 2),
           'dropped_frames': sum(e.get('dropped_frames', 0) for e in episodes)}
    for key in ('da_within', 'da_boundary', 'd2a_within', 'd2a_boundary'):
        values = [v for e in episodes for v in e[key]]
        out[f'{key}_mean'] = round(float(np.mean(values)), 5) if values else None
        out[f'{key}_max'] = round(float(np.max(values)), 5) if values else None
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the command's options."""
    add_model_argument(parser, default='models/lift')
    parser.add_argument('--latency-ms', action=ListAction, check=float,
                        default=[0.0, 100.0, 200.0, 300.0],
                        help='injected inference latencies (ms), space or comma separated')
    parser.add_argument('--modes', action=ListAction, default=list(MODES),
                        check=_mode_arg, help=f'chunk execution modes: {", ".join(MODES)}')
    parser.add_argument('--episodes', type=int, default=50, help='episodes per point')
    parser.add_argument('--seed-start', type=int, default=910000, help='first reset seed')
    parser.add_argument('--dense', action='store_true',
                        help="every unit computed (the serving schedule without the pruner's "
                             'gates): whether rtc needs a pruner of its own')
    parser.add_argument('--drop-frames', type=float, default=0.0,
                        help='probability that a camera frame is lost (the policy keeps the '
                             'last frame that arrived; seeded per episode); a separate set of '
                             'points, file names ending in _drop<P>')
    add_episode_arguments(parser, task=False, schedule=False, workers=False)
    parser.add_argument('--report-only', action='store_true',
                        help='run nothing: summarize and plot the points already in --out '
                             '(each with the episodes it has of the seed range)')
    parser.add_argument('--out', required=True,
                        help='directory: one JSON per point (written per episode, resumed), '
                             'latency.json and latency.png')


def _mode_arg(name: str) -> str:
    if name not in MODES:
        raise argparse.ArgumentTypeError(f'unknown mode {name!r}; one of {", ".join(MODES)}')
    return name


def point_path(out: str, latency_ms: float, mode: str, dense: bool,
               drop_frames: float = 0.0) -> str:
    """JSON file of one (latency, mode) point."""
    drop = f'_drop{drop_frames:g}' if drop_frames > 0 else ''
    return os.path.join(out, f'{"dense_" if dense else ""}{mode}_{latency_ms:g}ms{drop}.json')


def _load(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)['episodes_detail']


def _save(path: str, meta: dict, episodes: List[dict]) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(dict(meta, **summarize_point(episodes), episodes_detail=episodes), f)
    os.replace(tmp, path)


def plot(summary: List[dict], path: str) -> None:
    """Success and mean |d2a| (boundary solid, within chunks dashed) against latency per mode.

    The zero-latency point (``mode: any``, one run shared by every mode) starts every line.
    """
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    shared = [p for p in summary if p['mode'] == 'any']
    modes = sorted({p['mode'] for p in summary} - {'any'}) or ['any']
    for mode in modes:
        pts = sorted(shared + [p for p in summary if p['mode'] == mode],
                     key=lambda p: p['latency_ms'])
        x = [p['latency_ms'] for p in pts]
        line, = axes[0].plot(x, [p['success'] / p['episodes'] for p in pts], 'o-', label=mode)
        color = line.get_color()
        axes[1].plot(x, [p['d2a_boundary_mean'] or 0.0 for p in pts], 'o-', color=color,
                     label=f'{mode}: boundary')
        axes[1].plot(x, [p['d2a_within_mean'] or 0.0 for p in pts], 'x--', color=color,
                     label=f'{mode}: within', alpha=0.6)
    axes[0].set_ylabel('success rate')
    axes[0].set_ylim(0, 1.05)
    axes[1].set_ylabel('mean |d2a| over the 6 arm action dims')
    for ax in axes:
        ax.set_xlabel('injected latency (ms)')
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Run every (latency, mode) point on the same seeds; resume points already written."""
    check_range(args.episodes, '--episodes', low=1)
    check_episode_arguments(args)
    check_range(args.drop_frames, '--drop-frames', low=0.0, high=0.9)
    for ms in args.latency_ms:
        if not (math.isfinite(ms) and 0 <= ms <= 10000):
            raise CommandError(f'--latency-ms {ms:g} is out of range; give 0 to 10000 ms')
    check_model_dir(args.model, pruners=not args.dense)
    n = load_policy_config(args.model).n_action_steps
    too_slow = [ms for ms in args.latency_ms if delay_steps(ms) >= n]
    if too_slow:
        raise CommandError(f'--latency-ms {too_slow[0]:g} is {delay_steps(too_slow[0])} control '
                           f'steps, not below the chunk of {n}: every chunk would arrive after '
                           f'its own end; give latencies under {1000 * n / CONTROL_HZ:g} ms')
    from sparse_policy_node.core.engine import load_engine
    from sparse_policy_node.sim.robosuite_env import make_env
    from sparse_policy_node.training.evaluate import model_task
    torch.set_num_threads(args.threads)
    engine = load_engine(args.model)
    if args.dense:
        engine.set_runtime(engine.runtime.replace(sparsity_enabled=False))
    policy = engine.policy
    vision = policy.config.obs.vision
    env = make_env(model_task(args.model), vision.cameras, vision.image_size,
                   max_steps=args.max_steps)
    os.makedirs(args.out, exist_ok=True)
    seeds = list(range(args.seed_start, args.seed_start + args.episodes))
    rt = engine.runtime
    runs = f'{rt.sampler}-{rt.num_inference_steps} ' + (
        'dense' if not rt.sparsity_enabled else rt.gate_source)
    summary = []
    try:
        for ms in args.latency_ms:
            d = delay_steps(ms)
            # At zero latency nothing overlaps: every mode is the same run, done once.
            modes = args.modes[:1] if d == 0 else args.modes
            for mode in modes:
                path = point_path(args.out, ms, mode, args.dense, args.drop_frames)
                meta = {'latency_ms': ms, 'delay_steps': d, 'mode': mode if d else 'any',
                        'drop_frames': args.drop_frames,
                        'lead_steps': schedule(d, policy.config.n_action_steps),
                        'runs': runs, 'model': args.model,
                        'seed_start': args.seed_start}
                episodes = [e for e in _load(path) if e['seed'] in seeds]
                done_seeds = {e['seed'] for e in episodes}
                if args.report_only and not episodes:
                    continue
                for seed in seeds:
                    if seed in done_seeds or args.report_only:
                        continue
                    episodes.append(run_latency_episode(
                        env, engine, seed, policy.config.transformer.n_obs_steps, d, mode,
                        args.drop_frames))
                    _save(path, meta, episodes)
                point = dict(meta, **summarize_point(episodes))
                summary.append(point)
                print(f'{ms:6g} ms d={d} {point["mode"]:<8} success {point["success"]}/'
                      f'{point["episodes"]} steps/succ {point["steps_success"]} underruns '
                      f'{point["underruns"]} |d2a| boundary {point["d2a_boundary_mean"]} '
                      f'within {point["d2a_within_mean"]}', flush=True)
    finally:
        env.close()
    name = ('latency_dense' if args.dense else 'latency') + (
        f'_drop{args.drop_frames:g}' if args.drop_frames > 0 else '')
    with open(os.path.join(args.out, f'{name}.json'), 'w') as f:
        json.dump({'command': 'sparse-policy latency', 'points': summary}, f, indent=1)
    plot(summary, os.path.join(args.out, f'{name}.png'))
    return 0
