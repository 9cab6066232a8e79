"""``sparse-policy info``: describe a model (sizes, FLOPs) and time one dense smoke chunk."""

import json
import time

from sparse_policy_node.tools.args import add_model_argument
from sparse_policy_node.tools.args import check_model_dir
from sparse_policy_node.tools.common import build_model
from sparse_policy_node.tools.common import random_obs
from sparse_policy_node.tools.common import set_threads


def add_arguments(parser):
    """Register the command's options."""
    add_model_argument(parser, help_text='model directory (default: a random-weight --preset)')
    parser.add_argument('--preset', default='small',
                        help='preset to describe when --model is not given')
    parser.add_argument('--device', default='cpu', help='torch device of the smoke chunk')
    parser.add_argument('--threads', type=int, default=2, help='torch threads (0: default)')
    parser.add_argument('--json', action='store_true', help='print one JSON object only')


def serving_point(model_dir) -> object:
    """Return the serving default's point name and runtime knobs, None without one."""
    from sparse_policy_node.core.checkpoint import read_serving_config
    serving = read_serving_config(model_dir) if model_dir else None
    if serving is None:
        return None
    return {'point': serving.get('chosen_by', {}).get('point'), **serving['runtime']}


def describe(args) -> dict:
    """Build the model, run one dense chunk on random observations and summarise."""
    import torch

    from sparse_policy_node.core.config import config_to_dict
    from sparse_policy_node.core.flops import chunk_macs

    threads = set_threads(args.threads)
    policy, pruner, description = build_model(args.model, args.preset, args.device,
                                              with_pruner=False)
    cfg = policy.config
    obs = random_obs(policy, 0, args.device)
    policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    out = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    ms = (time.perf_counter() - t0) * 1e3
    n_params = sum(p.numel() for p in policy.parameters())
    n_transformer = sum(p.numel() for p in policy.transformer.parameters())
    macs = chunk_macs(cfg.transformer, cfg.obs.obs_feature_dim,
                      cfg.scheduler.num_inference_steps)
    return {
        'model': description,
        'parameters_total': n_params,
        'parameters_transformer': n_transformer,
        'units': policy.transformer.num_units,
        'has_pruner': bool(pruner),
        'pruner_schedules': sorted(f'{s[0]}-{s[1]}' for s in pruner if s is not None)
        if isinstance(pruner, dict) else [],
        'serving_default': serving_point(args.model),
        'gflops_dense_chunk': round(macs['total'] / 1e9, 4),
        'dense_chunk_schedule': f'{cfg.scheduler.sampler}-{cfg.scheduler.num_inference_steps}'
                                ' (the config schedule; the serving default may differ)',
        'dense_chunk_ms': round(ms, 2),
        'threads': threads,
        'action_chunk_shape': list(out['action'].shape),
        'action_finite': bool(torch.isfinite(out['action']).all()),
        'config': config_to_dict(cfg),
    }


def check_args(args) -> None:
    """Check the model directory or preset before building anything."""
    if args.model:
        check_model_dir(args.model, weights=False)
    else:
        from sparse_policy_node.core.config import make_preset
        make_preset(args.preset)


def run(args) -> int:
    """Print the model summary."""
    check_args(args)
    info = describe(args)
    if args.json:
        print(json.dumps(info))
        return 0 if info['action_finite'] else 1
    for key, value in info.items():
        if key != 'config':
            print(f'{key:<24} {value}')
    return 0 if info['action_finite'] else 1
