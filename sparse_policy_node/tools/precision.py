"""``sparse-policy precision``: reduced precision and CUDA graphs against the float32 engine.

Offline accuracy check of ``RuntimeConfig.precision`` (and ``cuda_graphs``) where no simulator
is at hand, e.g. on a GPU machine. Every variant samples the same observation windows with
identical noise, episode by episode in recorded order (so the rollout cache carries over as it
does when deployed), and its chunks are compared with the float32 eager engine's:

* ``err_mean`` / ``err_max``: mean and max ``|a_variant - a_float32|`` over every action of
  every chunk, in raw action units (as the robot receives them);
* ``noise_spread``: the same mean for float32 under *other* noise, i.e. how much the policy's
  own sampling varies: an error well below it cannot change behaviour much; one near it can;
* ``vs_recorded``: float32 on this device against the dense chunks recorded in the rollout
  file (same noise; recorded on the machine that wrote the file), for dense rows.

Latency: median chunk time per variant, dense and sparse, after the first two chunks of each
engine. With ``--rollouts`` the windows, initial noise and variance noise come from a rollout
file (:mod:`rollouts`); otherwise random windows and seeded noise are used, which the output
says. A closed-loop success check (``sparse-policy eval``) is still needed before a reduced
precision can become a default.
"""

import json
import statistics
import sys
import time

from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import check_rollouts
from sparse_policy_node.tools.args import ListAction
import torch

PRECISIONS = ('float32', 'float16', 'bfloat16')


def add_arguments(parser):
    """Register the command's options."""
    add_model_argument(parser, default='models/lift',
                       help_text="model directory ('' for a random-weight --preset with a "
                                 'random pruner: latency only)')
    parser.add_argument('--preset', default='paper', help="preset when --model is ''")
    parser.add_argument('--rollouts', default=None,
                        help='rollout file of this model (observation windows and noise); '
                             'default: random windows')
    parser.add_argument('--windows', type=int, default=64,
                        help='observation windows (chunks) per variant, whole episodes first')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='torch device')
    parser.add_argument('--precisions', action=ListAction, default=['float16', 'bfloat16'],
                        check=_precision,
                        help='reduced precisions to compare with float32, space or comma '
                             'separated')
    parser.add_argument('--cuda-graphs', action='store_true',
                        help='also run float32 (and each precision) with CUDA graphs')
    parser.add_argument('--sampler', default=None, choices=('ddpm', 'ddim'),
                        help="default: the rollout file's, else the model config's")
    parser.add_argument('--steps', type=int, default=None, help='K (default: as --sampler)')
    parser.add_argument('--sparsity', type=float, default=-1.0,
                        help='sparse rows: dial (negative: learned gates as trained)')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the random windows and noise (without --rollouts)')
    parser.add_argument('--json', action='store_true', help='print one JSON object only')


def _precision(name: str) -> str:
    if name not in PRECISIONS:
        raise ValueError(f'unknown precision {name!r}; choose from {", ".join(PRECISIONS[1:])}')
    return name


def check_args(args) -> None:
    """Check the values, the model and the rollout file before anything is loaded or run."""
    check_range(args.windows, '--windows', low=1)
    check_range(args.steps, '--steps', low=1)
    check_range(args.sparsity, '--sparsity', high=0.99,
                hint='give a fraction in [0, 0.99], or a negative value for the learned gates')
    if args.model:
        check_model_dir(args.model, pruners=True)
    else:
        from sparse_policy_node.core.config import make_preset
        make_preset(args.preset)
    if args.rollouts:
        check_rollouts(args.rollouts)


def _windows(args, policy, sampler: str, steps: int):
    """Episodes of (obs window, noise, step noise, recorded prediction or None) on the host."""
    from sparse_policy_node.tools.common import random_obs
    if args.rollouts:
        from sparse_policy_node.training.rollouts import load_rollouts
        from sparse_policy_node.training.rollouts import read_rollout_attrs
        attrs = read_rollout_attrs(args.rollouts)
        same = (attrs['sampler'], int(attrs['num_inference_steps'])) == (sampler, steps)
        g = torch.Generator().manual_seed(args.seed)  # variance noise of another schedule
        episodes, left = [], args.windows
        for ep in load_rollouts(args.rollouts):
            n = min(left, len(ep['action_pred']))
            frames = []
            for f in range(n):
                obs = {k: torch.from_numpy(v[f])[None] for k, v in ep['obs'].items()}
                step_noise = (torch.from_numpy(ep['step_noise'][f])[:, None] if same else
                              torch.randn((steps, *policy.action_shape(1)), generator=g))
                frames.append((obs, torch.from_numpy(ep['noise'][f])[None], step_noise,
                               torch.from_numpy(ep['action_pred'][f])[None] if same else None))
            episodes.append(frames)
            left -= n
            if left <= 0:
                break
        return episodes, f'{args.rollouts} ({attrs["sampler"]}-{attrs["num_inference_steps"]})'
    g = torch.Generator().manual_seed(args.seed)
    shape = policy.action_shape(1)
    frames = [(random_obs(policy, args.seed + i), torch.randn(shape, generator=g),
               torch.randn((steps, *shape), generator=g), None) for i in range(args.windows)]
    return [frames], 'random windows (no --rollouts)'


def _run(engine, episodes, device, other_noise=False):
    """Sample every window in order; return (chunks (N, T_a, A) on the host, chunk ms)."""
    g = torch.Generator().manual_seed(12345)
    chunks, ms = [], []
    for frames in episodes:
        engine.reset()
        for obs, noise, step_noise, _ in frames:
            if other_noise:
                noise = torch.randn(noise.shape, generator=g)
                step_noise = None if step_noise is None else torch.randn(step_noise.shape,
                                                                         generator=g)
            obs = {k: v.to(device) for k, v in obs.items()}
            noise = noise.to(device)
            step_noise = None if step_noise is None else step_noise.to(device)
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = engine.predict_action(obs, noise=noise, step_noise=step_noise)
            chunk = out['action_pred'][0].cpu()  # the sync that ends the chunk
            ms.append((time.perf_counter() - t0) * 1e3)
            chunks.append(chunk)
    return torch.stack(chunks), ms


def run_check(args) -> dict:
    """Run every variant and return the result dictionary."""
    from sparse_policy_node.core.config import RuntimeConfig
    from sparse_policy_node.core.engine import load_engine
    from sparse_policy_node.tools.common import set_threads
    set_threads(args.threads)
    if args.model:
        engine = load_engine(args.model, args.device)
        policy, pruners = engine.policy, engine.pruners
        engine.close()
    else:
        from sparse_policy_node.tools.common import build_model
        policy, pruner, args.model = build_model(None, args.preset, args.device, True)
        pruners = {None: pruner}
    sched = policy.config.scheduler
    sampler, steps = args.sampler, args.steps
    if args.rollouts and sampler is None:
        from sparse_policy_node.training.rollouts import read_rollout_attrs
        attrs = read_rollout_attrs(args.rollouts)
        sampler, steps = str(attrs['sampler']), steps or int(attrs['num_inference_steps'])
    sampler = sampler or sched.sampler
    steps = steps or sched.num_inference_steps
    episodes, source = _windows(args, policy, sampler, steps)
    from sparse_policy_node.core.checkpoint import for_schedule
    has_pruner = for_schedule(pruners, (sampler, steps)) is not None
    modes = {'dense': {'sparsity_enabled': False}}
    if has_pruner:
        modes['sparse'] = {'gate_source': 'pruner', 'target_sparsity': args.sparsity}
    precisions = ['float32'] + [p for p in dict.fromkeys(args.precisions) if p != 'float32']
    variants = [(p, False) for p in precisions]
    if args.cuda_graphs:
        variants += [(p, True) for p in precisions]
    rows, reference = [], {}
    from sparse_policy_node.core.engine import SparseEngine
    for mode, knobs in modes.items():
        for precision, graphs in variants:
            rt = RuntimeConfig(sampler=sampler, num_inference_steps=steps, precision=precision,
                               cuda_graphs=graphs, **knobs)
            eng = SparseEngine(policy, pruners, rt)
            chunks, ms = _run(eng, episodes, args.device)
            row = {'mode': mode, 'precision': precision, 'cuda_graphs': graphs,
                   'chunks': len(chunks),
                   'chunk_ms': round(statistics.median(ms[2:] or ms), 3)}
            if (precision, graphs) == ('float32', False):
                reference[mode] = chunks
                spread, _ = _run(eng, episodes, args.device, other_noise=True)
                row['noise_spread'] = float((spread - chunks).abs().mean())
                recorded = [f[3] for frames in episodes for f in frames]
                if mode == 'dense' and all(r is not None for r in recorded):
                    rec = torch.cat(recorded)
                    row['vs_recorded_mean'] = float((chunks - rec).abs().mean())
                    row['vs_recorded_max'] = float((chunks - rec).abs().max())
            diff = (chunks - reference[mode]).abs()
            row['err_mean'] = float(diff.mean())
            row['err_max'] = float(diff.max())
            row['finite'] = bool(torch.isfinite(chunks).all())
            rows.append(row)
            eng.close()
    return {'model': args.model, 'device': args.device, 'torch': torch.__version__,
            'sampler': sampler, 'steps': steps, 'source': source,
            'sparse_gates': (f'pruner dial {args.sparsity}' if args.sparsity >= 0
                             else 'pruner as trained') if has_pruner else 'no pruner',
            'rows': rows,
            'note': 'err_*: |a - a_float32| in raw action units, same windows and noise; '
                    "noise_spread: float32 under other noise (the policy's own variation); "
                    'offline only, no closed-loop check'}


def format_table(result: dict) -> str:
    """Return the result as a Markdown table."""
    lines = [f"{result['model']} on {result['device']}, {result['sampler']}-"
             f"{result['steps']}, {result['source']}, sparse rows: {result['sparse_gates']}",
             '',
             '| mode | precision | graphs | chunk ms | mean err | max err | noise spread |',
             '|---|---|---|---:|---:|---:|---:|']
    for r in result['rows']:
        spread = f"{r['noise_spread']:.2e}" if 'noise_spread' in r else ''
        lines.append(f"| {r['mode']} | {r['precision']} | {'on' if r['cuda_graphs'] else 'off'}"
                     f" | {r['chunk_ms']:.2f} | {r['err_mean']:.2e} | {r['err_max']:.2e} | "
                     f'{spread} |')
    for r in result['rows']:
        if 'vs_recorded_mean' in r:
            lines.append(f"\nfloat32 {r['mode']} vs the recorded chunks: mean "
                         f"{r['vs_recorded_mean']:.2e}, max {r['vs_recorded_max']:.2e}")
    return '\n'.join(lines)


def run(args) -> int:
    """Run the check and print a table (and its JSON line), or JSON only."""
    check_args(args)
    precisions = ['float32'] + [p for p in dict.fromkeys(args.precisions) if p != 'float32']
    print(f'precision: comparing {", ".join(precisions)}'
          f'{" with and without CUDA graphs" if args.cuda_graphs else ""} on {args.windows} '
          f'windows of {args.model or "preset " + args.preset} on {args.device} (dense, and '
          f'sparse when a pruner fits); this takes a while...', file=sys.stderr, flush=True)
    result = run_check(args)
    if not args.json:
        print(format_table(result))
    print(json.dumps(result))
    sys.stdout.flush()
    return 0
