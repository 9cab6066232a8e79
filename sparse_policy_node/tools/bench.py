"""``sparse-policy bench``: dense vs sparse chunk latency, side by side in one process.

Observations stream in like a camera's: every repetition adds one new frame, and the window is
the newest T_o frames. Each repetition runs, on the same window and the same noise:

* ``dense`` and ``sparse`` chunks that encode the whole window (T_o frames per camera), the
  sparse one with gates from the chosen source (the pruner runs concurrently with step 0);
* ``replay``: the same sparse chunk with its gate map precomputed (no pruner in the loop);
* ``stream``: sparse, with frame ids, so only the new frame is encoded (the others come from
  the frame-feature cache);
* ``prepared`` and ``dense_prepared``: every frame was encoded when it arrived (timed apart
  as ``frame_encode_ms``, off the critical path), so the chunk starts from cached features:
  what the ROS node does.

The variants are interleaved so that machine noise hits all alike. Medians are reported; ratios
come from the same run.

With ``--model``, a model directory's serving default (``serving.json``, see ``sparse-policy
frontier``) sets the sampler, K, gates, dial and cache max age of the ``sparse`` chunks unless
they are given on the command line.

Caveat on random weights (no ``--model``): at the dial, a random-weight pruner's compute
preference is nearly the same for every step, so the kept entries after step 0 pile onto a
few units (e.g. the last layer's cross-attention and FFN). That map is cache-friendly and
reads 12-15% faster than a trained or scattered map of the same sparsity; the ``random``
baseline (``--baselines``) is the scattered map to compare with.
"""

from dataclasses import replace
import json
import os
import platform
import statistics
import sys
import time

from sparse_policy_node.core.config import MATCHED_SPARSITY
from sparse_policy_node.core.config import REUSE_DIRECTIONS
from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.args import check_range
from sparse_policy_node.tools.args import CommandError
from sparse_policy_node.tools.args import ListAction
from sparse_policy_node.tools.args import reuse_direction
from sparse_policy_node.tools.common import build_model
from sparse_policy_node.tools.common import random_obs
from sparse_policy_node.tools.common import set_threads
import torch


def add_arguments(parser):
    """Register the command's options."""
    add_model_argument(parser,
                       help_text='model directory (default: random-weight --preset with a '
                                 'pruner)')
    parser.add_argument('--preset', default='paper', help='preset when --model is not given')
    parser.add_argument('--gates', default=None, choices=('pruner', 'random', 'static'),
                        help='sparsity source: the pruner (with the dial when --sparsity is '
                             'set), a random mask, or a FORA-style static schedule (default: '
                             "the model's serving default, else pruner)")
    parser.add_argument('--sparsity', type=float, default=None,
                        help='target sparsity (the dial); negative: pruner argmax as trained '
                             "(default: the model's serving default, else the matched sparsity "
                             f'{MATCHED_SPARSITY})')
    parser.add_argument('--rollout-max-age', type=int, default=None,
                        help='cache aging in chunks, 0: never (default: serving default, '
                             'else 0)')
    parser.add_argument('--directions', action=ListAction, default=list(REUSE_DIRECTIONS),
                        check=reuse_direction,
                        help='allowed reuse directions, space or comma separated')
    parser.add_argument('--steps', type=int, default=None,
                        help='inference steps K (default: the model config)')
    parser.add_argument('--sampler', default=None, choices=('ddpm', 'ddim'),
                        help="sampler (default: the model's serving default, else its config)")
    parser.add_argument('--device', default='cpu', help='torch device')
    parser.add_argument('--backend', nargs='+', default=['torch'],
                        choices=('torch', 'onnxruntime', 'tensorrt'),
                        help='one or more backends, timed side by side in this process (the '
                             'first is the reference of the ratios)')
    parser.add_argument('--graph', default=None, choices=('whole', 'step', 'none'),
                        help='graph form of the sparse chunks: whole (one graph per chunk, '
                             'conditional nodes; on the CPU its body runs eagerly), step '
                             '(per-step pattern graphs, CUDA), none (eager; dense chunks '
                             "eager too); default: the engine's (whole on CUDA where torch "
                             'and CUDA have conditional nodes, else step; eager on the CPU)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads (0: default)')
    parser.add_argument('--reps', type=int, default=10, help='timed repetitions')
    parser.add_argument('--warmup', type=int, default=2, help='untimed repetitions')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the random frames, noise and random-weight model')
    parser.add_argument('--json', action='store_true', help='print one JSON object only')
    parser.add_argument('--tag', default='', help='a name copied into the JSON (scripts)')
    parser.add_argument('--mask-png', default=None,
                        help='save the gate maps of the timed sparse chunks as a PNG')
    parser.add_argument('--baselines', action='store_true',
                        help='also time the baselines in the same harness: dense DDIM with '
                             'fewer steps, a static (FORA-style) schedule and random gates at '
                             'the same sparsity')


def check_args(args) -> None:
    """Check the values and the model (or preset) before anything is built or timed."""
    check_range(args.sparsity, '--sparsity', high=0.99,
                hint='give a fraction in [0, 0.99], or a negative value for the pruner argmax')
    check_range(args.steps, '--steps', low=1)
    check_range(args.reps, '--reps', low=1)
    check_range(args.warmup, '--warmup', low=0)
    if args.rollout_max_age is not None and args.rollout_max_age < 0:
        raise CommandError(f'--rollout-max-age must be >= 0, got {args.rollout_max_age}; '
                           f'0 never expires the cache')
    if args.model:
        check_model_dir(args.model, weights=False)
    else:
        from sparse_policy_node.core.config import make_preset
        make_preset(args.preset)


def _device_name(device) -> str:
    if str(device).startswith('cuda'):
        return f'{device} ({torch.cuda.get_device_name(torch.device(device))})'
    return f'cpu ({platform.machine()}, {os.cpu_count()} cores)'


def _sync(device):
    if str(device).startswith('cuda'):
        torch.cuda.synchronize()


def _timed(engine, obs, noise, step_noise, device, gates=None, frame_ids=None):
    _sync(device)
    t0 = time.perf_counter()
    out = engine.predict_action(obs, noise=noise, step_noise=step_noise, gates=gates,
                                frame_ids=frame_ids)
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def _p90(values) -> float:
    """90th percentile, linear between samples (never below the median, even for 2)."""
    return round(statistics.quantiles(values, n=10, method='inclusive')[-1], 2) \
        if len(values) > 1 else round(values[0], 2)


class FrameStream:
    """Random observation frames arriving one per control step; windows of the newest T_o."""

    def __init__(self, policy, seed: int, device: str):
        self.policy, self.seed, self.device = policy, seed, device
        self.image_keys = [k for k in policy.expected_obs_shapes() if k.endswith('_image')]
        self._frames = {}

    def frame(self, i: int) -> dict:
        """Frame i: per key the value of one step (no batch or time axis)."""
        if i not in self._frames:
            self._frames[i] = {k: v[0, -1] for k, v in
                               random_obs(self.policy, self.seed + i, self.device).items()}
        return self._frames[i]

    def window(self, end: int, T_o: int) -> dict:
        """Batch-1 window of frames end - T_o + 1 .. end, each key (1, T_o, ...)."""
        steps = [self.frame(i) for i in range(end - T_o + 1, end + 1)]
        return {k: torch.stack([s[k] for s in steps])[None] for k in steps[0]}

    def ids(self, end: int, T_o: int) -> dict:
        """Frame ids of that window per camera."""
        return {k: list(range(end - T_o + 1, end + 1)) for k in self.image_keys}

    def encode_newest(self, engine, end: int, n: int) -> None:
        """Encode the newest n frames into ``engine``'s frame cache, as on arrival."""
        for i in range(end - n + 1, end + 1):
            for key in self.image_keys:
                engine.encode_frame(key, i, self.frame(i)[key])


def run_benchmark(args) -> dict:
    """Run the interleaved benchmark and return the result dictionary."""
    from sparse_policy_node.core.config import RuntimeConfig
    from sparse_policy_node.core.engine import SparseEngine
    from sparse_policy_node.core.flops import chunk_macs

    threads = set_threads(args.threads)
    apply_serving_default(args)
    policy, pruner, description = build_model(args.model, args.preset, args.device,
                                              with_pruner=args.gates == 'pruner')
    if args.gates == 'pruner' and not pruner:
        raise SystemExit('bench: --gates pruner needs a model directory with a pruner '
                         '(or no --model, for a random-weight preset with a random pruner)')
    cfg = policy.config
    steps = args.steps or cfg.scheduler.num_inference_steps
    sampler = args.sampler or cfg.scheduler.sampler
    directions = tuple(args.directions)
    graphs = args.graph != 'none'
    dense_rt = RuntimeConfig(sparsity_enabled=False, gate_source='dense', sampler=sampler,
                             num_inference_steps=steps, cuda_graphs=graphs)
    sparse_rt = RuntimeConfig(gate_source=args.gates, target_sparsity=args.sparsity,
                              directions=directions, sampler=sampler,
                              num_inference_steps=steps, rollout_max_age=args.rollout_max_age,
                              cuda_graphs=graphs)
    backends = list(dict.fromkeys(args.backend))
    names = ('dense', 'sparse', 'replay', 'stream', 'prepared', 'dense_prepared')
    engines = {}
    for backend in backends:
        for name in names:
            rt = dense_rt if name.startswith('dense') else sparse_rt
            engines[backend, name] = SparseEngine(policy, pruner, replace(rt, backend=backend),
                                                  model_dir=args.model)
            engines[backend, name].graph_form = args.graph
    T_o = cfg.transformer.n_obs_steps
    frames = FrameStream(policy, args.seed, args.device)
    g = torch.Generator().manual_seed(args.seed)
    t = cfg.transformer
    noise = torch.randn(1, t.horizon, t.action_dim, generator=g).to(args.device)
    step_noise = torch.randn(steps, 1, t.horizon, t.action_dim, generator=g).to(args.device)
    columns = names + ('frame_encode', 'dense_dec', 'sparse_dec', 'pruner', 'sparsity')
    rows = {b: {k: [] for k in columns} for b in backends}
    gate_maps = {b: [] for b in backends}
    counts = {}
    # Rep 0 is the dense first chunk of every engine (the rule after a reset); then warm-up.
    # Backends alternate within each repetition, so machine noise hits them alike.
    for rep in range(1 + args.warmup + args.reps):
        end = rep + T_o - 1
        obs, ids = frames.window(end, T_o), frames.ids(end, T_o)
        for backend in backends:
            eng = {name: engines[backend, name] for name in names}
            ms = {}
            _sync(args.device)
            t0 = time.perf_counter()
            for e in (eng['prepared'], eng['dense_prepared']):
                frames.encode_newest(e, end, T_o if rep == 0 else 1)
            _sync(args.device)
            ms['frame_encode'] = (time.perf_counter() - t0) * 1e3 / 2
            ms['dense'], out_dense = _timed(eng['dense'], obs, noise, step_noise, args.device)
            ms['sparse'], out_sparse = _timed(eng['sparse'], obs, noise, step_noise,
                                              args.device)
            ms['replay'], _ = _timed(eng['replay'], obs, noise, step_noise, args.device,
                                     gates=eng['sparse'].last_gates)
            for name in ('stream', 'prepared', 'dense_prepared'):
                ms[name], _ = _timed(eng[name], obs, noise, step_noise, args.device,
                                     frame_ids=ids)
            if rep <= args.warmup:
                continue
            st = out_sparse['stats']
            row = rows[backend]
            for name, value in ms.items():
                row[name].append(value)
            row['dense_dec'].append(out_dense['stats']['decoder_ms'])
            row['sparse_dec'].append(st['decoder_ms'])
            row['pruner'].append(st['pruner_ms'])
            row['sparsity'].append(st['realized_sparsity'])
            gate_maps[backend].append(eng['sparse'].last_gates.clone())
            counts[backend] = {k: st[k] for k in ('compute', 'forward', 'timestep', 'rollout')}
    first = backends[0]
    sparse = engines[first, 'sparse']
    med = {k: statistics.median(v) for k, v in rows[first].items()}
    kinds = [int((gate_maps[first][-1][:, j::3] == 0).sum()) for j in range(3)]
    macs_dense = chunk_macs(t, cfg.obs.obs_feature_dim, steps)
    used_pruner = sparse.pruner_for(sampler, steps) if args.gates == 'pruner' else None
    macs_sparse = chunk_macs(t, cfg.obs.obs_feature_dim, steps, kinds,
                             used_pruner.config if used_pruner is not None else None)
    if args.mask_png:
        from sparse_policy_node.tools.mask_plot import plot_gate_maps
        plot_gate_maps(gate_maps[first][:6], args.mask_png,
                       policy.transformer.unit_index_names(),
                       title=f'{args.gates} gates, target sparsity {args.sparsity}')
    result = {
        'model': description,
        'device': _device_name(args.device),
        'threads': threads,
        'torch': torch.__version__,
        'backend': first,
        'sampler': sampler,
        'steps': steps,
        'gates': args.gates,
        'target_sparsity': args.sparsity,
        'rollout_max_age': args.rollout_max_age,
        'serving_default': args.serving_default,
        'directions': list(directions),
        'reps': args.reps,
        'tag': args.tag,
        'graph': args.graph,
        'paths': {'dense': engines[first, 'dense'].path_name(),
                  'sparse': sparse.path_name()},
        **_latencies(rows[first]),
        'choice_counts': counts[first],
        'gflops_dense': round(macs_dense['total'] / 1e9, 4),
        'gflops_sparse': round(macs_sparse['transformer'] / 1e9, 4),
        'gflops_pruner': round(macs_sparse['pruner'] / 1e9, 4),
        'gflops_sparse_with_pruner': round(macs_sparse['total'] / 1e9, 4),
        'flops_ratio_with_pruner': round(macs_sparse['total'] / macs_dense['total'], 4),
        'note': 'gflops are multiply-accumulate counts of the transformer (+ pruner), the '
                'convention of the paper; the vision encoder is in the latencies, not the '
                'gflops. *_prepared_ms: frames encoded on arrival (frame_encode_ms per frame, '
                'all cameras), the chunk starts from cached features. Random weights: the '
                'dial piles kept entries onto few units (cache-friendly, 12-15% faster than a '
                'trained or scattered map); compare with the random baseline',
    }
    if len(backends) > 1:
        result['backends'] = {b: {**_latencies(rows[b]), 'choice_counts': counts[b]}
                              for b in backends}
        result['backend_ratios'] = {
            f'{b}/{first}': {k: round(result['backends'][b][k] / result[k], 3)
                             for k in ('dense_ms', 'sparse_ms', 'sparse_prepared_ms',
                                       'dense_prepared_ms', 'decoder_dense_ms',
                                       'decoder_sparse_ms', 'frame_encode_ms')}
            for b in backends[1:]}
    if args.baselines:
        # Baselines run at the same sparsity: the dial's, or what the learned gates realized.
        matched = args.sparsity if args.sparsity >= 0 else round(result['realized_sparsity'], 2)
        result['baselines'] = run_baselines(policy, pruner, args, obs, directions, steps,
                                            sampler, med['dense'], matched)
    for engine in engines.values():
        engine.close()
    return result


def _latencies(rows: dict) -> dict:
    """Medians, p90s and ratios of one backend's timed chunks."""
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        'dense_ms': round(med['dense'], 2),
        'sparse_ms': round(med['sparse'], 2),
        'speedup': round(med['dense'] / med['sparse'], 2),
        'decoder_dense_ms': round(med['dense_dec'], 2),
        'decoder_sparse_ms': round(med['sparse_dec'], 2),
        'decoder_speedup': round(med['dense_dec'] / med['sparse_dec'], 2),
        'sparse_precomputed_mask_ms': round(med['replay'], 2),
        'sparse_stream_ms': round(med['stream'], 2),
        'sparse_prepared_ms': round(med['prepared'], 2),
        'dense_prepared_ms': round(med['dense_prepared'], 2),
        'speedup_prepared': round(med['dense_prepared'] / med['prepared'], 2),
        'frame_encode_ms': round(med['frame_encode'], 2),
        'pruner_overhead_ratio': round(med['sparse'] / med['replay'], 3),
        'pruner_ms': round(med['pruner'], 2),
        'realized_sparsity': round(statistics.mean(rows['sparsity']), 4),
        'dense_ms_p90': _p90(rows['dense']),
        'sparse_ms_p90': _p90(rows['sparse']),
        'sparse_prepared_ms_p90': _p90(rows['prepared']),
    }


def apply_serving_default(args) -> None:
    """Fill gates / sparsity / schedule / max age left unset from the model's serving default.

    Sets ``args.serving_default`` to the point name used, or None.
    """
    from sparse_policy_node.core.checkpoint import pruner_dirs
    from sparse_policy_node.core.checkpoint import read_serving_config
    serving = read_serving_config(args.model) if args.model else None
    args.serving_default = None
    if serving is not None and args.gates is None and args.sparsity is None:
        rt = serving['runtime']
        args.serving_default = serving.get('chosen_by', {}).get('point', 'serving.json')
        if rt.get('sparsity_enabled', True) and rt.get('gate_source', 'pruner') != 'dense':
            args.gates = rt.get('gate_source', 'pruner')
            args.sparsity = rt.get('target_sparsity', -1.0)
        else:  # a dense serving default: bench its schedule, sparse at the usual dial
            args.gates, args.sparsity = None, None
        schedule = (args.sampler or rt.get('sampler'),
                    args.steps or rt.get('num_inference_steps'))
        pruned = pruner_dirs(args.model)
        if args.gates is None and schedule not in pruned and None not in pruned:
            # Dense on a schedule without a pruner: the sparse column needs one, so bench
            # the model's own schedule (the user's --sampler/--steps still win).
            print(f'bench: the serving default {args.serving_default} is dense on '
                  f'{schedule[0]}-{schedule[1]}, which has no pruner; benching dense vs '
                  f'sparse on the schedule of the model config instead', file=sys.stderr)
        else:
            args.sampler, args.steps = schedule
        if args.rollout_max_age is None:
            args.rollout_max_age = rt.get('rollout_max_age', 0)
    args.gates = args.gates or 'pruner'
    args.sparsity = MATCHED_SPARSITY if args.sparsity is None else args.sparsity
    args.rollout_max_age = args.rollout_max_age or 0


def run_baselines(policy, pruner, args, obs, directions, steps, sampler, dense_ms,
                  sparsity) -> list:
    """Time the baselines round-robin on the same observation; speedups vs ``dense_ms``."""
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
    if pruner and (not isinstance(pruner, dict) or (sampler, steps) in pruner
                   or None in pruner):
        variants.append((f'pruner dial {sparsity}', RuntimeConfig(
            gate_source='pruner', target_sparsity=sparsity, directions=directions,
            sampler=sampler, num_inference_steps=steps)))
    engines = [(name, SparseEngine(policy, pruner, replace(rt, backend=args.backend[0]),
                                   model_dir=args.model)) for name, rt in variants]
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
    check_args(args)
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
