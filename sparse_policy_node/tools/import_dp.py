"""``sparse-policy import-dp``: convert a Diffusion Policy DP-T checkpoint to a model directory.

Accepted weights (no unpickling unless asked):

- a ``.safetensors`` file holding the policy state dict (the ``ema_model`` entry);
- a ``.ckpt`` / ``.pt`` file loadable with ``torch.load(weights_only=True)``: a state dict or
  a workspace payload with ``state_dicts['ema_model']`` (or ``['model']``);
- a Diffusion Policy workspace ``.ckpt`` (pickled Hydra config) with ``--trust-pickle``: it
  is unpickled, which can run arbitrary code, so only for files you trust.

The policy config (observation order, sizes, crop, sampler and K, n_action_steps) comes from
``--config`` (JSON or YAML: the run's ``.hydra/config.yaml`` or the export of ``EXPORT_HINT``)
or, with ``--trust-pickle``, from the checkpoint itself. Without either it is guessed.
"""

import argparse
import json
import os
import sys
import zipfile

from sparse_policy_node.tools.args import CommandError

EXPORT_ONE_LINER = (
    'python -c "import sys,json,torch,dill;from omegaconf import OmegaConf as O;'
    'from safetensors.torch import save_file;'
    "p=torch.load(sys.argv[1],pickle_module=dill,map_location='cpu');"  # noqa: Q000
    "json.dump(O.to_container(p['cfg']),open('dp_config.json','w'));"  # noqa: Q000
    "save_file({k:v.contiguous() for k,v in p['state_dicts']['ema_model'].items()},"  # noqa
    "'ema.safetensors')\" IN.ckpt")  # noqa: Q000
EXPORT_HINT = (
    'export the config and the EMA weights once in your Diffusion Policy environment: '
    f'{EXPORT_ONE_LINER}  -- then: sparse-policy import-dp ema.safetensors OUT '
    '--config dp_config.json (or pass --trust-pickle to unpickle IN.ckpt here)')
PICKLE_WARNING = ('import-dp: WARNING: --trust-pickle unpickles {path}; unpickling can run '
                  'arbitrary code. Use it only for checkpoints you made or trust.')


def add_arguments(parser):
    """Register the command's options."""
    parser.add_argument('checkpoint', help='.safetensors state dict, or a .ckpt')
    parser.add_argument('out', help='output model directory')
    parser.add_argument('--config', default=None,
                        help='Diffusion Policy config as JSON or YAML (.hydra/config.yaml of '
                             'the run, or exported from the .ckpt); sets observation order, '
                             'sizes, crop, sampler, K and n_action_steps')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='unpickle a workspace .ckpt (runs code from the file!) to read '
                             'its weights and config')
    parser.add_argument('--use-raw', action='store_true',
                        help='take state_dicts["model"] instead of the EMA weights')
    parser.add_argument('--n-head', type=int, default=4,
                        help='attention heads (without --config only)')
    parser.add_argument('--lowdim-order', default='robot0_eef_pos,robot0_eef_quat,'
                        'robot0_gripper_qpos',
                        help='order of low-dim keys (without --config only)')
    parser.add_argument('--image-size', default=(84, 84), type=_size, metavar='H,W',
                        help='H,W of the camera images (without --config only)')
    parser.add_argument('--crop', default=None, type=_size, metavar='H,W',
                        help='H,W crop, default 76,76 for 84x84 (without --config only)')


def _size(text: str):
    """``'84,84'`` -> ``(84, 84)`` (argparse type of --image-size and --crop)."""
    try:
        size = tuple(int(v) for v in text.split(','))
    except ValueError:
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not H,W (two positive integers, e.g. '
                                         f'84,84)')
    return size


def checkpoint_kind(path: str) -> str:
    """Tell a weights file's kind from its first bytes (nothing is unpickled).

    Returns:
        ``'safetensors'``, ``'torch-zip'`` (``torch.save``'s zip archive: the zip magic
        ``PK 03 04`` and a ``data.pkl`` inside), ``'pickle'`` (protocol 2+: first byte
        ``0x80``, also the legacy ``torch.save`` format) or ``''``: not a checkpoint.
    """
    with open(path, 'rb') as f:
        head = f.read(16)
    if head.startswith(b'PK\x03\x04'):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return ''
        return 'torch-zip' if any(n.rpartition('/')[2] == 'data.pkl' for n in names) else ''
    if head[:1] == b'\x80':
        return 'pickle'
    if len(head) > 8 and head[8:9] == b'{':  # u64 header length, then the JSON header
        return 'safetensors'
    return ''


def _unpickle(path: str):
    """torch.load with full unpickling (dill when installed, as DP saves with it)."""
    import torch
    print(PICKLE_WARNING.format(path=path), file=sys.stderr)
    try:
        import dill as pickle_module
    except ImportError:
        import pickle as pickle_module
    try:
        return torch.load(path, map_location='cpu', weights_only=False,
                          pickle_module=pickle_module)
    except ModuleNotFoundError as exc:
        raise SystemExit(f'import-dp: unpickling {path} needs the module {exc.name!r} '
                         f'(pip install omegaconf dill); or {EXPORT_HINT}') from exc


def load_checkpoint(path: str, use_raw: bool, trust_pickle: bool = False):
    """Load an upstream state dict and, when the file carries one, its config.

    Returns:
        (state dict, config as plain data or None).
    """
    import torch
    if not os.path.isfile(path):
        raise CommandError(f'checkpoint {path!r} does not exist; pass the Diffusion Policy '
                           f'.ckpt or its exported .safetensors')
    kind = checkpoint_kind(path)
    if path.endswith('.safetensors') or kind == 'safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path), None
        except (SafetensorError, OSError, ValueError) as exc:
            raise CommandError(f'{path} is not a readable safetensors file ({exc}); pass the '
                               f'ema.safetensors exported from a Diffusion Policy .ckpt, or the '
                               f'.ckpt itself') from exc
    if not kind:
        raise CommandError(f'{path} is not a checkpoint (neither a safetensors file, a torch '
                           f'zip archive nor a pickle); pass the Diffusion Policy .ckpt or its '
                           f'exported .safetensors')
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: B902 - torch raises several unpickling error types
        if not trust_pickle:
            raise SystemExit(f'import-dp: {path} cannot be loaded without unpickling '
                             f'({exc.__class__.__name__}); {EXPORT_HINT}') from exc
        payload = _unpickle(path)
    cfg = None
    if isinstance(payload, dict) and 'cfg' in payload:
        cfg = plain_config(payload['cfg'])
    if isinstance(payload, dict) and 'state_dicts' in payload:
        key = 'model' if use_raw else 'ema_model'
        if key not in payload['state_dicts']:
            raise SystemExit(f'import-dp: checkpoint has no state_dicts[{key!r}]')
        return payload['state_dicts'][key], cfg
    return payload, cfg


def plain_config(cfg):
    """Return an OmegaConf ``DictConfig`` (unresolved) or plain data as dicts and lists."""
    if type(cfg).__module__.startswith('omegaconf'):
        from omegaconf import OmegaConf
        return OmegaConf.to_container(cfg, resolve=False)
    return cfg


def read_config_file(path: str) -> dict:
    """Read a JSON or YAML config file (mapping order kept: it is the observation order)."""
    if not os.path.isfile(path):
        raise SystemExit(f'import-dp: config {path} does not exist')
    with open(path) as f:
        text = f.read()
    import yaml
    try:
        return json.loads(text) if path.endswith('.json') else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise SystemExit(f'import-dp: config {path} cannot be parsed: {exc}') from exc


def dp_card(config, dp_cfg) -> dict:
    """Model card of an imported Diffusion Policy: action space from ``task.abs_action``.

    DP's robomimic tasks train on OSC deltas (``abs_action: false``, 7-D) or absolute poses
    with a 6-D rotation (``abs_action: true``, 10-D, ``rotation_6d``); real-robot tasks state
    their rate in ``task.frequency`` (robomimic: 20 Hz). Anything else is recorded as an
    end-effector-free ``joint_pos`` card the user must check.
    """
    from sparse_policy_node.core import model_card as mc
    task = (dp_cfg or {}).get('task') or {}
    rate = float(task.get('frequency') or (dp_cfg or {}).get('frequency') or 20.0)
    dim = config.transformer.action_dim
    common = {'flip_vertical': False, 'resize': 'as in the Diffusion Policy dataset',
              'source': 'import-dp (Diffusion Policy); check rate, frames and gripper'}
    gripper = {'gripper_index': dim - 1, 'gripper_semantics': '-1 open, +1 closed (robomimic)'}
    if task.get('abs_action') and dim == 10:
        return mc.build_card(config, 'abs_eef_pose', rate, 'base',
                             rotation_format='rotation_6d', **gripper, **common)
    if dim == 7 and not task.get('abs_action'):
        return mc.build_card(config, 'delta_eef', rate, 'base',
                             names=mc.ROBOSUITE_DELTA_NAMES,
                             position_scale=mc.ROBOSUITE_POSITION_SCALE,
                             rotation_scale=mc.ROBOSUITE_ROTATION_SCALE, **gripper, **common)
    return mc.build_card(config, 'joint_pos', rate, 'base', **common)


def run(args) -> int:
    """Convert, verify by loading the result, and report."""
    from sparse_policy_node.core.checkpoint import load_policy
    from sparse_policy_node.core.checkpoint import save_policy
    from sparse_policy_node.core.config import ConfigError
    from sparse_policy_node.core.dp_config import DPConfigError
    from sparse_policy_node.core.dp_config import spec_from_config
    from sparse_policy_node.core.dp_import import check_image_normalizer
    from sparse_policy_node.core.dp_import import convert_state_dict
    from sparse_policy_node.core.dp_import import infer_config
    from sparse_policy_node.core.model_card import write_card
    from sparse_policy_node.core.policy import DiffusionPolicy

    if os.path.isfile(args.out):
        raise CommandError(f'output {args.out!r} is a file; give a directory for the model')
    state, cfg = load_checkpoint(args.checkpoint, args.use_raw, args.trust_pickle)
    if args.config:
        cfg = read_config_file(args.config)
    try:
        spec = spec_from_config(cfg) if cfg is not None else None
        if spec is None:
            print('import-dp: no policy config (--config): observation order, sampler and '
                  'n_action_steps are guessed; ' + EXPORT_HINT, file=sys.stderr)
            config = infer_config(state, n_head=args.n_head,
                                  lowdim_order=tuple(args.lowdim_order.split(',')),
                                  crop_size=args.crop, image_size=tuple(args.image_size))
        else:
            config = infer_config(state, spec)
        check_image_normalizer(state)
        policy = DiffusionPolicy(config)
        converted = convert_state_dict(state)
        missing, unexpected = policy.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise DPConfigError(f'missing {sorted(missing)[:6]}, unexpected '
                                f'{sorted(unexpected)[:6]}')
    except (DPConfigError, ConfigError) as exc:
        raise SystemExit(f'import-dp: {exc}') from exc
    metadata = {'imported_from': os.path.basename(args.checkpoint),
                'weights': 'model' if args.use_raw else 'ema',
                'config': 'guessed' if spec is None else 'from the Diffusion Policy config'}
    if spec is not None:
        metadata['dp_obs_keys'] = [k for k, _, _ in spec.obs]
    save_policy(policy, args.out, metadata=metadata)
    write_card(args.out, dp_card(config, cfg))
    load_policy(args.out)
    s = config.scheduler
    print(f'import-dp: wrote {args.out} ({sum(p.numel() for p in policy.parameters())} '
          f'parameters, {config.transformer.n_layer} layers, cameras '
          f'{list(config.obs.vision.cameras)}, {s.sampler}-{s.num_inference_steps}, '
          f'{config.n_action_steps} actions per chunk)')
    return 0
