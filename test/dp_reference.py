"""A Diffusion Policy checkpoint in the upstream layout, and an independent forward pass.

The checkpoint is built from scratch; the forward pass is written from the upstream
semantics, not from this package's modules.

Layout (real-stanford/diffusion_policy ``DiffusionTransformerHybridImagePolicy``):

- ``obs_encoder.obs_nets.{key}.nets.0.nets.*``: robomimic ``ResNet18Conv`` (torchvision
  children 0..7, BatchNorm replaced by GroupNorm with C // 16 groups);
- ``...nets.1``: robomimic ``SpatialSoftmax`` (1x1 conv, buffers pos_x, pos_y, temperature);
- ``...nets.3``: the linear to the feature dimension;
- ``model.*``: ``TransformerForDiffusion``; its ``decoder`` is a stock
  ``nn.TransformerDecoder`` (pre-norm, GELU), so the reference uses torch's own module;
- ``normalizer.params_dict.{key}.{scale, offset, input_stats.*}``.

robomimic's ``ObservationEncoder.forward`` runs, per key in ``shape_meta`` order: randomizer
(eval: centre crop), the key's net, then ``feature_activation`` (ReLU) for keys that have a
net; then flattens and concatenates.
"""

import copy
import math

import torch
from torch import nn
import torch.nn.functional as F

RESNET_STAGES = ((4, 64, 64, 1), (5, 64, 128, 2), (6, 128, 256, 2), (7, 256, 512, 2))


def dp_config(obs_meta, action_dim=4, horizon=10, n_obs_steps=2, n_action_steps=6,
              crop=(36, 36), n_layer=2, n_head=4, n_emb=32, scheduler='DDIMScheduler',
              num_inference_steps=8, policy_target=None):
    """Return a DP workspace config as plain data with interpolations (``.hydra/config.yaml``).

    Args:
        obs_meta: ``{key: {'shape': [...], 'type': 'rgb' | 'low_dim'}}`` in shape_meta order.
    """
    noise = {'_target_': f'diffusers.schedulers.{scheduler}', 'num_train_timesteps': 100,
             'beta_start': 0.0001, 'beta_end': 0.02, 'beta_schedule': 'squaredcos_cap_v2',
             'clip_sample': True, 'prediction_type': 'epsilon'}
    if scheduler == 'DDPMScheduler':
        noise['variance_type'] = 'fixed_small'
    else:
        noise.update(set_alpha_to_one=True, steps_offset=0)
    return {
        'task': {'shape_meta': {'obs': copy.deepcopy(obs_meta),
                                'action': {'shape': [action_dim]}}},
        'shape_meta': '${task.shape_meta}',
        'horizon': horizon, 'n_obs_steps': n_obs_steps, 'n_action_steps': n_action_steps,
        'n_latency_steps': 0,
        'policy': {
            '_target_': policy_target or ('diffusion_policy.policy.diffusion_transformer_'
                                          'hybrid_image_policy.'
                                          'DiffusionTransformerHybridImagePolicy'),
            'shape_meta': '${shape_meta}', 'noise_scheduler': noise,
            'horizon': '${horizon}', 'n_obs_steps': '${n_obs_steps}',
            'n_action_steps': "${eval:'${n_action_steps}+${n_latency_steps}'}",
            'num_inference_steps': num_inference_steps,
            'crop_shape': list(crop) if crop else None, 'obs_encoder_group_norm': True,
            'eval_fixed_crop': True, 'n_layer': n_layer, 'n_cond_layers': 0,
            'n_head': n_head, 'n_emb': n_emb, 'p_drop_emb': 0.0, 'p_drop_attn': 0.3,
            'causal_attn': True, 'time_as_cond': True, 'obs_as_cond': '${obs_as_cond}'},
        'obs_as_cond': True,
    }


def _conv(g, out_ch, in_ch, k):
    return torch.randn(out_ch, in_ch, k, k, generator=g) * math.sqrt(2.0 / (in_ch * k * k))


def _norm(g, prefix, ch, out):
    out[prefix + '.weight'] = 1.0 + 0.1 * torch.randn(ch, generator=g)
    out[prefix + '.bias'] = 0.1 * torch.randn(ch, generator=g)


def _visual_core(g, prefix, crop, num_kp, feature_dim, out):
    trunk = prefix + '.nets.0.nets'
    out[trunk + '.0.weight'] = _conv(g, 64, 3, 7)
    _norm(g, trunk + '.1', 64, out)
    for index, in_ch, out_ch, stride in RESNET_STAGES:
        for block in (0, 1):
            b = f'{trunk}.{index}.{block}'
            c_in = in_ch if block == 0 else out_ch
            out[b + '.conv1.weight'] = _conv(g, out_ch, c_in, 3)
            _norm(g, b + '.bn1', out_ch, out)
            out[b + '.conv2.weight'] = _conv(g, out_ch, out_ch, 3)
            _norm(g, b + '.bn2', out_ch, out)
            if block == 0 and (stride != 1 or in_ch != out_ch):
                out[b + '.downsample.0.weight'] = _conv(g, out_ch, in_ch, 1)
                _norm(g, b + '.downsample.1', out_ch, out)
    h, w = (math.ceil(c / 32) for c in crop)
    out[prefix + '.nets.1.nets.weight'] = torch.randn(num_kp, 512, 1, 1, generator=g) * 0.05
    out[prefix + '.nets.1.nets.bias'] = torch.zeros(num_kp)
    out[prefix + '.nets.1.pos_x'] = torch.zeros(1, h * w)  # values recomputed by importers
    out[prefix + '.nets.1.pos_y'] = torch.zeros(1, h * w)
    out[prefix + '.nets.1.temperature'] = torch.ones(1)
    out[prefix + '.nets.3.weight'] = torch.randn(feature_dim, 2 * num_kp, generator=g) * 0.5
    out[prefix + '.nets.3.bias'] = 0.1 * torch.randn(feature_dim, generator=g)


def dp_state_dict(cfg, seed=0, num_kp=8, feature_dim=16):
    """Random weights in the upstream layout for the policy described by ``cfg``."""
    g = torch.Generator().manual_seed(seed)
    policy = cfg['policy']
    meta = cfg['task']['shape_meta']
    D, L, A = policy['n_emb'], policy['n_layer'], meta['action']['shape'][0]
    T_a, T_o = cfg['horizon'], cfg['n_obs_steps']
    crop = policy['crop_shape']
    out = {}
    D_o = 0
    for key, attr in meta['obs'].items():
        pre = f'normalizer.params_dict.{key}'
        if attr.get('type', 'low_dim') == 'rgb':
            _visual_core(g, f'obs_encoder.obs_nets.{key}', crop or attr['shape'][1:], num_kp,
                         feature_dim, out)
            out[pre + '.scale'] = torch.full((3, 1, 1), 2.0)
            out[pre + '.offset'] = torch.full((3, 1, 1), -1.0)
            D_o += feature_dim
        else:
            d = attr['shape'][0]
            out[pre + '.scale'] = 0.5 + torch.rand(d, generator=g)
            out[pre + '.offset'] = 0.2 * torch.randn(d, generator=g)
            out[pre + '.input_stats.min'] = -torch.ones(d)
            out[pre + '.input_stats.max'] = torch.ones(d)
            D_o += d
    out['normalizer.params_dict.action.scale'] = 0.5 + torch.rand(A, generator=g)
    out['normalizer.params_dict.action.offset'] = 0.1 * torch.randn(A, generator=g)

    torch.manual_seed(seed)
    decoder = reference_decoder(D, policy['n_head'], L)
    for name, value in decoder.state_dict().items():
        out['model.decoder.' + name] = value + 0.02 * torch.randn(value.shape, generator=g)
    for name, shape in (('input_emb', (D, A)), ('cond_obs_emb', (D, D_o)),
                        ('encoder.0', (4 * D, D)), ('encoder.2', (D, 4 * D)),
                        ('head', (A, D))):
        out[f'model.{name}.weight'] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        out[f'model.{name}.bias'] = 0.02 * torch.randn(shape[0], generator=g)
    out['model.pos_emb'] = 0.02 * torch.randn(1, T_a, D, generator=g)
    out['model.cond_pos_emb'] = 0.02 * torch.randn(1, 1 + T_o, D, generator=g)
    out['model.ln_f.weight'] = 1.0 + 0.1 * torch.randn(D, generator=g)
    out['model.ln_f.bias'] = 0.1 * torch.randn(D, generator=g)
    out['model.mask'] = torch.zeros(T_a, T_a)
    out['model.memory_mask'] = torch.zeros(T_a, 1 + T_o)
    out['model._dummy_variable'] = torch.zeros(1)
    return out


# ==== independent forward pass ====

def _gn(x, p, prefix):
    return F.group_norm(x, max(1, x.shape[1] // 16), p[prefix + '.weight'], p[prefix + '.bias'])


def _basic_block(x, p, b, stride):
    out = F.relu(_gn(F.conv2d(x, p[b + '.conv1.weight'], stride=stride, padding=1), p, b + '.bn1'))
    out = _gn(F.conv2d(out, p[b + '.conv2.weight'], padding=1), p, b + '.bn2')
    if b + '.downsample.0.weight' in p:
        x = _gn(F.conv2d(x, p[b + '.downsample.0.weight'], stride=stride), p, b + '.downsample.1')
    return F.relu(out + x)


def visual_core(p, prefix, image):
    """Run robomimic's VisualCore: (N, 3, h, w) in [-1, 1] -> (N, F), before the activation."""
    t = prefix + '.nets.0.nets'
    x = F.relu(_gn(F.conv2d(image, p[t + '.0.weight'], stride=2, padding=3), p, t + '.1'))
    x = F.max_pool2d(x, 3, 2, 1)
    for index, _, _, stride in RESNET_STAGES:
        x = _basic_block(x, p, f'{t}.{index}.0', stride)
        x = _basic_block(x, p, f'{t}.{index}.1', 1)
    maps = F.conv2d(x, p[prefix + '.nets.1.nets.weight'], p[prefix + '.nets.1.nets.bias'])
    N, K, H, W = maps.shape
    # robomimic: pos_x, pos_y = np.meshgrid(linspace(-1, 1, W), linspace(-1, 1, H))
    pos_y, pos_x = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W),
                                  indexing='ij')
    attention = torch.softmax(maps.reshape(N * K, H * W), dim=-1)
    xy = torch.stack(((attention * pos_x.reshape(1, -1)).sum(1),
                      (attention * pos_y.reshape(1, -1)).sum(1)), dim=1)  # (N K, 2)
    keypoints = xy.reshape(N, K * 2)
    return F.linear(keypoints, p[prefix + '.nets.3.weight'], p[prefix + '.nets.3.bias'])


def obs_features(p, cfg, obs, relu=True, order=None):
    """Compute DP's ``obs_encoder(normalizer(obs))``; ``obs`` (B, T_o, ...) keyed by DP keys.

    Returns:
        (B, T_o, D_o) features in ``shape_meta`` order (or ``order``).
    """
    meta = cfg['task']['shape_meta']['obs']
    crop = cfg['policy']['crop_shape']
    feats = []
    for key in order or list(meta):
        x = obs[key]
        B, T = x.shape[:2]
        scale = p[f'normalizer.params_dict.{key}.scale']
        offset = p[f'normalizer.params_dict.{key}.offset']
        if meta[key].get('type', 'low_dim') == 'rgb':
            img = (x.float() / 255.0).reshape(B * T, *x.shape[2:]) * scale + offset
            H, W = img.shape[-2:]
            ch, cw = crop or (H, W)
            top, left = int((H - ch) / 2), int((W - cw) / 2)  # robomimic center_crop
            img = img[..., top:top + ch, left:left + cw]
            f = visual_core(p, f'obs_encoder.obs_nets.{key}', img)
            feats.append((F.relu(f) if relu else f).reshape(B, T, -1))
        else:
            feats.append(x.float() * scale + offset)
    return torch.cat(feats, dim=-1)


def reference_decoder(n_emb, n_head, n_layer):
    """Build the decoder stack of DP's TransformerForDiffusion, as DP builds it."""
    layer = nn.TransformerDecoderLayer(d_model=n_emb, nhead=n_head, dim_feedforward=4 * n_emb,
                                       dropout=0.0, activation='gelu', batch_first=True,
                                       norm_first=True)
    return nn.TransformerDecoder(layer, num_layers=n_layer)


def transformer_eps(p, cfg, sample, timestep, cond):
    """TransformerForDiffusion.forward (time_as_cond, obs_as_cond, n_cond_layers 0).

    Args:
        sample: (B, T_a, A) noisy actions; timestep: int; cond: (B, T_o, D_o).

    Returns:
        (B, T_a, A) predicted noise.
    """
    pol = cfg['policy']
    D = pol['n_emb']
    T_a, T_o = sample.shape[1], cond.shape[1]
    half = D // 2
    freqs = torch.exp(torch.arange(half) * -(math.log(10000) / (half - 1)))
    t = torch.full((sample.shape[0],), float(timestep))
    time_emb = torch.cat(((t[:, None] * freqs[None]).sin(), (t[:, None] * freqs[None]).cos()),
                         dim=-1)[:, None]  # (B, 1, D)
    cond_emb = torch.cat([time_emb, F.linear(cond, p['model.cond_obs_emb.weight'],
                                             p['model.cond_obs_emb.bias'])], dim=1)
    x = cond_emb + p['model.cond_pos_emb'][:, :1 + T_o]
    x = F.linear(F.mish(F.linear(x, p['model.encoder.0.weight'], p['model.encoder.0.bias'])),
                 p['model.encoder.2.weight'], p['model.encoder.2.bias'])  # memory (B, T_c, D)
    decoder = reference_decoder(D, pol['n_head'], pol['n_layer']).eval()
    decoder.load_state_dict({k[len('model.decoder.'):]: v for k, v in p.items()
                             if k.startswith('model.decoder.')})
    # DP's masks: causal over actions; action i sees cond token s iff i >= s - 1.
    mask = torch.triu(torch.full((T_a, T_a), float('-inf')), diagonal=1)
    i, s = torch.meshgrid(torch.arange(T_a), torch.arange(1 + T_o), indexing='ij')
    memory_mask = torch.zeros(T_a, 1 + T_o).masked_fill(~(i >= s - 1), float('-inf'))
    h = F.linear(sample, p['model.input_emb.weight'], p['model.input_emb.bias'])
    h = h + p['model.pos_emb'][:, :T_a]
    with torch.no_grad():
        h = decoder(h, x, tgt_mask=mask, memory_mask=memory_mask)
    h = F.layer_norm(h, (D,), p['model.ln_f.weight'], p['model.ln_f.bias'])
    return F.linear(h, p['model.head.weight'], p['model.head.bias'])
