"""``sparse-policy import-dp``: convert a Diffusion Policy DP-T checkpoint to a model directory.

Accepted inputs (no arbitrary unpickling):

- a ``.safetensors`` file holding the policy state dict (e.g. the ``ema_model`` entry);
- a ``.ckpt`` / ``.pt`` file loadable with ``torch.load(weights_only=True)``: either a state
  dict or a workspace payload with ``state_dicts['ema_model']`` (or ``['model']``).

DP workspace checkpoints also pickle their Hydra config; ``weights_only`` refuses those, and
the error explains how to extract the state dict with DP's own environment.
"""

import os

EXTRACT_HINT = (
    'extract the weights once in your Diffusion Policy environment, e.g. with '
    'torch.load(IN.ckpt, pickle_module=dill)["state_dicts"]["ema_model"] written by '
    'safetensors.torch.save_file (tensors made contiguous), and import that .safetensors file')


def add_arguments(parser):
    """Register the command's options."""
    parser.add_argument('checkpoint', help='.safetensors state dict, or a weights-only .ckpt')
    parser.add_argument('out', help='output model directory')
    parser.add_argument('--use-raw', action='store_true',
                        help='take state_dicts["model"] instead of the EMA weights')
    parser.add_argument('--n-head', type=int, default=4, help='attention heads of the DP-T')
    parser.add_argument('--lowdim-order', default='robot0_eef_pos,robot0_eef_quat,'
                        'robot0_gripper_qpos', help='order of low-dim keys in the obs vector')
    parser.add_argument('--image-size', default='84,84', help='H,W of the camera images')
    parser.add_argument('--crop', default=None, help='H,W crop (default 76,76 for 84x84)')


def load_state_dict(path: str, use_raw: bool):
    """Load an upstream state dict without executing pickled code."""
    import torch
    if not os.path.isfile(path):
        raise SystemExit(f'import-dp: {path} does not exist')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        return load_file(path)
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: B902 - torch raises several unpickling error types
        raise SystemExit(f'import-dp: {path} cannot be loaded safely ({exc.__class__.__name__})'
                         f'; {EXTRACT_HINT}') from exc
    if isinstance(payload, dict) and 'state_dicts' in payload:
        key = 'model' if use_raw else 'ema_model'
        if key not in payload['state_dicts']:
            raise SystemExit(f'import-dp: checkpoint has no state_dicts[{key!r}]')
        return payload['state_dicts'][key]
    return payload


def run(args) -> int:
    """Convert, verify by loading the result, and report."""
    from sparse_policy_node.core.checkpoint import load_policy
    from sparse_policy_node.core.checkpoint import save_policy
    from sparse_policy_node.core.dp_import import check_image_normalizer
    from sparse_policy_node.core.dp_import import convert_state_dict
    from sparse_policy_node.core.dp_import import DPImportError
    from sparse_policy_node.core.dp_import import infer_config
    from sparse_policy_node.core.policy import DiffusionPolicy

    state = load_state_dict(args.checkpoint, args.use_raw)
    image_size = tuple(int(v) for v in args.image_size.split(','))
    crop = tuple(int(v) for v in args.crop.split(',')) if args.crop else None
    try:
        config = infer_config(state, n_head=args.n_head,
                              lowdim_order=tuple(args.lowdim_order.split(',')),
                              crop_size=crop, image_size=image_size)
        check_image_normalizer(state)
        policy = DiffusionPolicy(config)
        converted = convert_state_dict(state)
        missing, unexpected = policy.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise DPImportError(f'missing {sorted(missing)[:6]}, unexpected '
                                f'{sorted(unexpected)[:6]}')
    except DPImportError as exc:
        raise SystemExit(f'import-dp: {exc}') from exc
    save_policy(policy, args.out, metadata={'imported_from': os.path.basename(args.checkpoint),
                                            'weights': 'model' if args.use_raw else 'ema'})
    load_policy(args.out)
    print(f'import-dp: wrote {args.out} ({sum(p.numel() for p in policy.parameters())} '
          f'parameters, {config.transformer.n_layer} layers)')
    return 0
