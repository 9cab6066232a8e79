"""``sparse-policy bench``: dense vs sparse chunk latency, side by side in one process.

Every repetition runs, on the same observation and the same noise, one dense chunk, one sparse
chunk with gates from the chosen source (the pruner runs concurrently with step 0), and the
same sparse chunk with its gate map precomputed (no pruner in the loop), interleaved so that
machine noise hits all three alike. Medians are reported; ratios come from the same run.
"""

import json
import os
import platform
import statistics
import sys
import time

from sparse_policy_node.tools.common import build_model
from sparse_policy_node.tools.common import random_obs
from sparse_policy_node.tools.common import set_threads


def add_arguments(parser):
    """Register the command's options."""
    parser.add_argument('--model', default=None,
                        help='model directory (default: random-weight --preset with a pruner)')
    parser.add_argument('--preset', default='paper', help='preset when --model is not given')
    parser.add_argument('--gates', default='pruner', choices=('pruner', 'random', 'static'),
                        help='sparsity source: the pruner (with the dial when --sparsity is '
                             'set), a random mask, or a FORA-style static schedule')
    parser.add_argument('--sparsity', type=float, default=0.93,
                        help='target sparsity (the dial); negative: pruner argmax as trained')
    parser.add_argument('--directions', default='forward,timestep,rollout',
                        help='allowed reuse directions, comma separated')
    parser.add_argument('--steps', type=int, default=None,
                        help='inference steps K (default: the model config)')
    parser.add_argument('--sampler', default=None, choices=('ddpm', 'ddim'))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=2, help='torch threads (0: default)')
    parser.add_argument('--reps', type=int, default=10, help='timed repetitions')
    parser.add_argument('--warmup', type=int, default=2, help='untimed repetitions')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--json', action='store_true', help='print one JSON object only')
    parser.add_argument('--mask-png', default=None,
                        help='save the gate maps of the timed sparse chunks as a PNG')
    parser.add_argument('--baselines', action='store_true',
                        help='also time the baselines in the same harness: dense DDIM with '
                             'fewer steps, a static (FORA-style) schedule and random gates at '
                             'the same sparsity')


def _device_name(device) -> str:
    import torch
    if str(device).startswith('cuda'):
        return f'{device} ({torch.cuda.get_device_name(torch.device(device))})'
    return f'cpu ({platform.machine()}, {os.cpu_count()} cores)'


def _sync(device):
    import torch
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


def _timed(engine, obs, noise, step_noise, device, gates=None):
    _sync(device)
    t0 = time.perf_counter()
    out = engine.predict_action(obs, noise=noise, step_noise=step_noise, gates=gates)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def run_benchmark(args) -> dict:
    """Run the interleaved benchmark and return the result dictionary."""
    import torch

    from sparse_policy_node.core.config import RuntimeConfig
    from sparse_policy_node.core.engine import SparseEngine
    from sparse_policy_node.core.flops import chunk_macs

    threads = set_threads(args.threads)
    policy, pruner, description = build_model(args.model, args.preset, args.device,
                                              with_pruner=args.gates == 'pruner')
    if args.gates == 'pruner' and pruner is None:
        raise SystemExit('bench: --gates pruner needs a model directory with a pruner '
                         '(or no --model, for a random-weight preset with a random pruner)')
    cfg = policy.config
    steps = args.steps or cfg.scheduler.num_inference_steps
    sampler = args.sampler or cfg.scheduler.sampler
    directions = tuple(d for d in args.directions.split(',') if d)
    dense_rt = RuntimeConfig(sparsity_enabled=False, gate_source='dense', sampler=sampler,
                             num_inference_steps=steps)
    sparse_rt = RuntimeConfig(gate_source=args.gates, target_sparsity=args.sparsity,
                              directions=directions, sampler=sampler,
                              num_inference_steps=steps)
    dense = SparseEngine(policy, pruner, dense_rt)
    sparse = SparseEngine(policy, pruner, sparse_rt)
    replay = SparseEngine(policy, pruner, sparse_rt)
    obs = random_obs(policy, args.seed, args.device)
    g = torch.Generator().manual_seed(args.seed)
    t = cfg.transformer
    noise = torch.randn(1, t.horizon, t.action_dim, generator=g).to(args.device)
    step_noise = torch.randn(steps, 1, t.horizon, t.action_dim, generator=g).to(args.device)
    # First chunks after reset are dense by rule; run them so the rollout cache is warm.
    for engine in (sparse, replay):
        engine.predict_action(obs, noise=noise, step_noise=step_noise)

    rows = {'dense': [], 'sparse': [], 'replay': [], 'dense_dec': [], 'sparse_dec': [],
            'pruner': [], 'sparsity': []}
    gate_maps = []
    counts = None
    for rep in range(args.warmup + args.reps):
        ms_dense, out_dense = _timed(dense, obs, noise, step_noise, args.device)
        ms_sparse, out_sparse = _timed(sparse, obs, noise, step_noise, args.device)
        ms_replay, _ = _timed(replay, obs, noise, step_noise, args.device,
                              gates=sparse.last_gates)
        if rep < args.warmup:
            continue
        st = out_sparse['stats']
        rows['dense'].append(ms_dense)
        rows['sparse'].append(ms_sparse)
        rows['replay'].append(ms_replay)
        rows['dense_dec'].append(out_dense['stats']['decoder_ms'])
        rows['sparse_dec'].append(st['decoder_ms'])
        rows['pruner'].append(st['pruner_ms'])
        rows['sparsity'].append(st['realized_sparsity'])
        gate_maps.append(sparse.last_gates.clone())
        counts = {k: st[k] for k in ('compute', 'forward', 'timestep', 'rollout')}
    med = {k: statistics.median(v) for k, v in rows.items()}
    kinds = [int((gate_maps[-1][:, j::3] == 0).sum()) for j in range(3)]
    macs_dense = chunk_macs(t, cfg.obs.obs_feature_dim, steps)
    macs_sparse = chunk_macs(t, cfg.obs.obs_feature_dim, steps, kinds,
                             pruner.config if args.gates == 'pruner' else None)
    if args.mask_png:
        from sparse_policy_node.tools.mask_plot import plot_gate_maps
        plot_gate_maps(gate_maps[:6], args.mask_png, policy.transformer.unit_index_names(),
                       title=f'{args.gates} gates, target sparsity {args.sparsity}')
    result = {
        'model': description,
        'device': _device_name(args.device),
        'threads': threads,
        'torch': torch.__version__,
        'sampler': sampler,
        'steps': steps,
        'gates': args.gates,
        'target_sparsity': args.sparsity,
        'directions': list(directions),
        'reps': args.reps,
        'dense_ms': round(med['dense'], 2),
        'sparse_ms': round(med['sparse'], 2),
        'speedup': round(med['dense'] / med['sparse'], 2),
        'decoder_dense_ms': round(med['dense_dec'], 2),
        'decoder_sparse_ms': round(med['sparse_dec'], 2),
        'decoder_speedup': round(med['dense_dec'] / med['sparse_dec'], 2),
        'sparse_precomputed_mask_ms': round(med['replay'], 2),
        'pruner_overhead_ratio': round(med['sparse'] / med['replay'], 3),
        'pruner_ms': round(med['pruner'], 2),
        'realized_sparsity': round(statistics.mean(rows['sparsity']), 4),
        'choice_counts': counts,
        'gflops_dense': round(macs_dense['total'] / 1e9, 4),
        'gflops_sparse': round(macs_sparse['transformer'] / 1e9, 4),
        'gflops_pruner': round(macs_sparse['pruner'] / 1e9, 4),
        'gflops_sparse_with_pruner': round(macs_sparse['total'] / 1e9, 4),
        'flops_ratio_with_pruner': round(macs_sparse['total'] / macs_dense['total'], 4),
        'dense_ms_p90': round(sorted(rows['dense'])[int(0.9 * (len(rows['dense']) - 1))], 2),
        'sparse_ms_p90': round(sorted(rows['sparse'])[int(0.9 * (len(rows['sparse']) - 1))],
                               2),
        'note': 'gflops are multiply-accumulate counts of the transformer (+ pruner), the '
                'convention of the paper; the vision encoder is in the latencies, not the '
                'gflops',
    }
    if args.baselines:
        # Baselines run at the same sparsity: the dial's, or what the learned gates realized.
        matched = args.sparsity if args.sparsity >= 0 else round(result['realized_sparsity'], 2)
        result['baselines'] = run_baselines(policy, pruner, args, obs, directions, steps,
                                            sampler, med['dense'], matched)
    for engine in (dense, sparse, replay):
        engine.close()
    return result


def run_baselines(policy, pruner, args, obs, directions, steps, sampler, dense_ms,
                  sparsity) -> list:
    """Time the baselines round-robin on the same observation; speedups vs ``dense_ms``."""
    import torch

    from sparse_policy_node.core.config import RuntimeConfig
    from sparse_policy_node.core.engine import SparseEngine

    cfg = policy.config
    variants = [
        ('dense DDIM-16', RuntimeConfig(sparsity_enabled=False, gate_source='dense',
                                        sampler='ddim', num_inference_steps=16)),
        ('dense DDIM-10', RuntimeConfig(sparsity_enabled=False, gate_source='dense',
                                        sampler='ddim', num_inference_steps=10)),
        (f'static (FORA) {sparsity}', RuntimeConfig(
            gate_source='static', target_sparsity=sparsity, sampler=sampler,
            num_inference_steps=steps)),
        (f'random {sparsity}', RuntimeConfig(
            gate_source='random', target_sparsity=sparsity, directions=directions,
            sampler=sampler, num_inference_steps=steps)),
    ]
    if pruner is not None:
        variants.append((f'pruner dial {sparsity}', RuntimeConfig(
            gate_source='pruner', target_sparsity=sparsity, directions=directions,
            sampler=sampler, num_inference_steps=steps)))
    engines = [(name, SparseEngine(policy, pruner, rt)) for name, rt in variants]
    g = torch.Generator().manual_seed(args.seed)
    times = {name: [] for name, _ in engines}
    stats = {}
    for rep in range(1 + args.warmup + args.reps):
        for name, engine in engines:
            noise = torch.randn(1, cfg.transformer.horizon, cfg.transformer.action_dim,
                                generator=g).to(args.device)
            ms, out = _timed(engine, obs, noise, None, args.device)
            if rep > args.warmup:  # rep 0 is the dense first chunk, then warm-up
                times[name].append(ms)
                stats[name] = out['stats']
    rows = []
    for name, engine in engines:
        ms = statistics.median(times[name])
        rows.append({'name': name, 'ms': round(ms, 2), 'speedup': round(dense_ms / ms, 2),
                     'steps': stats[name]['num_steps'], 'sampler': stats[name]['sampler'],
                     'realized_sparsity': round(stats[name]['realized_sparsity'], 4),
                     'gflops_with_pruner': round(stats[name]['gmacs'], 4)})
        engine.close()
    return rows


def run(args) -> int:
    """Run the benchmark and print JSON or a short table."""
    result = run_benchmark(args)
    if args.json:
        print(json.dumps(result))
        return 0
    width = max(len(k) for k in result)
    for key, value in result.items():
        if key != 'baselines':
            print(f'{key:<{width}}  {value}')
    for row in result.get('baselines', []):
        print(f"  {row['name']:<22} {row['ms']:>9.2f} ms  x{row['speedup']:<6} "
              f"sparsity {row['realized_sparsity']:.3f}  {row['gflops_with_pruner']:.3f} GMAC")
    sys.stdout.flush()
    return 0
